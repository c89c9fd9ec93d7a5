"""Issue 11: one bad request never takes the engine down; it is refused or aborted alone, and nothing leaks.

Every poisonous request of the issue is reproduced on the real engine (a tiny model on the CPU): each is
refused with a clear ``ValueError`` before it joins a batch, and the engine serves the next good request with
every block free. A failure inside a step that validation did not foresee (a parameter changed after the request
was accepted) aborts exactly that request; the requests batched with it get the tokens they get alone.
"""

from __future__ import annotations

import pytest

from pdserve.engine.engine_core import EngineCoreRequest
from pdserve.engine.faults import is_device_fault
from pdserve.engine.frontend.fanout import child_params
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import INT64_MAX, INT64_MIN, SamplingParams
from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def eng(tmp_path_factory) -> LLMEngine:
    model = make_tiny_model("llama", tmp_path_factory.mktemp("m"), max_position_embeddings=128)
    return LLMEngine.from_kwargs(model, device="cpu", num_blocks=32, block_size=16)


def run(eng: LLMEngine, ids: list[str]) -> dict:
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
    assert set(ids) <= set(done)
    return done


def assert_idle(eng: LLMEngine) -> None:
    stats = eng.core.get_stats()
    assert stats.num_running == stats.num_waiting == 0
    assert stats.num_free_blocks == stats.num_total_blocks


def greedy(**kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.0, "ignore_eos": True, "max_tokens": 4, **kw})


@pytest.mark.parametrize("kwargs, param", [
    ({"stop_token_ids": [1_000_000_000], "min_tokens": 1}, "stop_token_ids"),  # IndexError in the sampler
    ({"stop_token_ids": [1_000_000_000]}, "stop_token_ids"),
])
def test_token_ids_outside_the_vocabulary_are_refused(eng: LLMEngine, kwargs, param) -> None:
    with pytest.raises(ValueError, match=param):
        eng.add_request([3, 4, 5], greedy(**kwargs), request_id="bad")
    assert not eng.has_unfinished_requests()
    eng.add_request([3, 4, 5], greedy(), request_id="good")
    assert len(run(eng, ["good"])["good"].token_ids) == 4
    assert_idle(eng)


@pytest.mark.parametrize("kwargs, param", [
    ({"top_k": 2 ** 63}, "top_k"),
    ({"top_k": 2 ** 64 - 1}, "top_k"),
    ({"seed": 2 ** 64}, "seed"),
    ({"seed": INT64_MIN - 1}, "seed"),
    ({"max_tokens": 2 ** 64}, "max_tokens"),
    ({"min_tokens": 2 ** 63}, "min_tokens"),
    ({"stop_token_ids": list(range(257))}, "stop_token_ids"),
    ({"stop": ["\ud800"]}, "stop"),
    ({"cache_salt": ""}, "cache_salt"),
])
def test_integers_beyond_int64_and_unbounded_counts_are_refused(kwargs, param) -> None:
    with pytest.raises(ValueError, match=param):
        SamplingParams(**kwargs)


def test_a_lone_surrogate_in_a_text_prompt_is_refused() -> None:
    from pdserve.engine.frontend.validation import tokenize_prompt

    with pytest.raises(ValueError, match="Unicode"):
        tokenize_prompt(lambda text: text.encode("utf-8"), "a\ud800b")


def test_child_seeds_stay_within_int64() -> None:
    params = SamplingParams(n=3, seed=INT64_MAX - 1)
    assert [child_params(params, i).seed for i in range(3)] == [INT64_MAX - 1, INT64_MAX, INT64_MIN]
    assert child_params(SamplingParams(n=2, seed=5), 1).seed == 6


def test_largest_int64_values_are_served(eng: LLMEngine) -> None:
    eng.add_request([3, 4, 5], greedy(top_k=INT64_MAX, seed=INT64_MAX, temperature=1.0), request_id="big")
    assert len(run(eng, ["big"])["big"].token_ids) == 4
    assert_idle(eng)


def test_a_sampling_failure_aborts_only_its_request(eng: LLMEngine) -> None:
    prompts = {"a": [3, 4, 5, 6], "b": [7, 8, 9], "c": [10, 11, 12, 13, 14]}
    for rid, prompt in prompts.items():
        eng.add_request(prompt, greedy(max_tokens=6), request_id=f"solo-{rid}")
    alone = run(eng, [f"solo-{rid}" for rid in prompts])
    for rid, prompt in prompts.items():
        eng.add_request(prompt, greedy(max_tokens=6, min_tokens=2), request_id=rid)
    # A parameter that slipped through validation (changed after the request was accepted): the sampler's
    # min-tokens masking indexes past the vocabulary. Before, the IndexError ended the engine for everyone.
    eng.core.scheduler.get_request("b").sampling_params.stop_token_ids.append(10 ** 9)
    outs = run(eng, list(prompts))
    assert outs["b"].finish_reason == "abort" and outs["b"].token_ids == []
    assert "sampling failed for this request" in outs["b"].stop_reason and "IndexError" in outs["b"].stop_reason
    for rid in ("a", "c"):
        assert outs[rid].token_ids == alone[f"solo-{rid}"].token_ids
    assert_idle(eng)
    eng.add_request([3, 4, 5], greedy(), request_id="next")
    assert len(run(eng, ["next"])["next"].token_ids) == 4


def test_the_core_reports_a_failed_request_with_its_error(eng: LLMEngine) -> None:
    core = eng.core
    core.add_request(EngineCoreRequest("x", [3, 4, 5], greedy(min_tokens=1)))
    core.add_request(EngineCoreRequest("y", [3, 4, 5], greedy()))
    core.scheduler.get_request("x").sampling_params.stop_token_ids.append(10 ** 9)
    outs = []
    while core.has_unfinished_requests():
        outs.extend(core.step())
    failed = [o for o in outs if o.error is not None]
    assert [o.request_id for o in failed] == ["x"] and failed[0].finish_reason == "abort"
    assert sum(len(o.new_token_ids) for o in outs if o.request_id == "y") == 4
    assert_idle(eng)


def test_only_device_faults_are_fatal() -> None:
    assert is_device_fault(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert is_device_fault(MemoryError())
    assert is_device_fault(type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory"))
    assert not is_device_fault(IndexError("index 1000000000 is out of bounds for dimension 1 with size 256"))
    assert not is_device_fault(RuntimeError("Overflow when unpacking long"))


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_bad_temperature_aborts_only_its_request(tmp_path, async_scheduling: bool) -> None:
    """The same isolation with a step in flight (asynchronous scheduling, forced on for the CPU)."""
    model = make_tiny_model("llama", tmp_path / "m", max_position_embeddings=128)
    e = LLMEngine.from_kwargs(model, device="cpu", num_blocks=32, block_size=16, async_scheduling=async_scheduling)
    assert e.core.async_scheduling == async_scheduling
    prompts = {"a": [3, 4, 5, 6], "b": [7, 8, 9], "c": [10, 11, 12, 13, 14]}
    for rid, prompt in prompts.items():
        e.add_request(prompt, greedy(max_tokens=6), request_id=f"solo-{rid}")
    alone = run(e, [f"solo-{rid}" for rid in prompts])
    for rid, prompt in prompts.items():
        e.add_request(prompt, greedy(max_tokens=6), request_id=rid)
    e.core.scheduler.get_request("b").sampling_params.temperature = "hot"  # slipped through: fails in the sampler
    outs = run(e, list(prompts))
    assert outs["b"].finish_reason == "abort" and "sampling failed" in outs["b"].stop_reason
    assert {rid: outs[rid].token_ids for rid in "ac"} == {rid: alone[f"solo-{rid}"].token_ids for rid in "ac"}
    assert_idle(e)
