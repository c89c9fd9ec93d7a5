"""Asynchronous scheduling end to end on CPU: the same outputs as the synchronous engine and as transformers.

A tiny random Llama (no tokenizer: EOS is token 2, and tests set their own EOS per request through the core).
Every engine here is forced to ``async_scheduling=True`` (CPU defaults to off) and compared token for token with
the synchronous engine on the same requests.
"""

from __future__ import annotations

import argparse

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.cli.engine_args import add_engine_arguments, engine_kwargs
from pdserve.engine.config import EngineConfig, SchedulerConfig
from pdserve.engine.engine_core import EngineCore, EngineCoreRequest
from tests.engine.test_llm_parity import hf_greedy
from tests.helpers.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return make_tiny_model("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(3, 200, (24,), generator=g).tolist()  # a prefix for the prefix cache to hit
    out = [shared + torch.randint(3, 200, (n,), generator=g).tolist() for n in (1, 9, 17)]
    return out + [torch.randint(3, 200, (n,), generator=g).tolist() for n in (5, 40)]


def core(model_dir: str, async_scheduling: bool, **kwargs) -> EngineCore:
    kwargs.setdefault("device", "cpu")
    c = EngineCore(EngineConfig.create(model_dir, async_scheduling=async_scheduling, **kwargs))
    assert c.async_scheduling == async_scheduling
    return c


def run(c: EngineCore, requests: list[EngineCoreRequest], on_step=None) -> dict[str, dict]:
    """Step until done; per request: its tokens, finish and stop reasons, logprob rows."""
    got = {r.request_id: dict(tokens=[], finish=None, stop=None, logprobs=[]) for r in requests}
    for r in requests:
        c.add_request(r)
    while c.has_unfinished_requests():
        for out in c.step():
            g = got[out.request_id]
            assert g["finish"] is None, "no output after a request finished"
            g["tokens"] += out.new_token_ids
            g["logprobs"] += out.new_logprobs or []
            g["finish"], g["stop"] = out.finish_reason, out.stop_reason
        if on_step is not None:
            on_step(c)
    assert c.get_stats().num_free_blocks == c.scheduler.num_blocks  # nothing leaked
    return got


def both(model_dir: str, requests, **kwargs) -> tuple[dict, dict]:
    return run(core(model_dir, False, **kwargs), requests), run(core(model_dir, True, **kwargs), requests)


def greedy(prompts, max_tokens=12, eos=None, **params) -> list[EngineCoreRequest]:
    return [EngineCoreRequest(f"r{i}", p, SamplingParams(max_tokens=max_tokens, temperature=0.0, **params),
                              eos_token_id=eos) for i, p in enumerate(prompts)]


CONFIGS = {
    "default": {},
    "chunked-16": {"max_num_batched_tokens": 16},
    "no-prefix-cache": {"enable_prefix_caching": False},
    "preemption": {"num_blocks": 14, "block_size": 4, "max_num_batched_tokens": 32},
}


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_matches_transformers(model_dir: str, prompts, name: str) -> None:
    llm = LLM(model_dir, async_scheduling=True, device="cpu", **CONFIGS[name])
    runner = llm.engine.core.runner
    fills = []
    execute = runner.execute_model
    runner.execute_model = lambda out, sampled=None: (fills.append(sampled is not None), execute(out, sampled))[1]
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0))
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(model_dir, prompts, 12)
    assert sum(fills) > len(fills) // 2, "most steps should decode on the step in flight's tokens"
    stats = llm.engine.core.get_stats()
    if name == "preemption":
        assert stats.num_preemptions > 0
    if name == "default":
        assert stats.prefix_cache_hits > 0


def test_prefix_hits_on_blocks_completed_by_pending_tokens(model_dir: str, prompts) -> None:
    llm = LLM(model_dir, async_scheduling=True, device="cpu", block_size=4)
    params = SamplingParams(max_tokens=20, temperature=0.0)
    first = llm.generate([prompts[4]], params)[0].outputs[0].token_ids
    # Blocks holding the first request's outputs were filled from placeholders and cached one step later.
    again = llm.generate([prompts[4] + first[:10]], SamplingParams(max_tokens=8, temperature=0.0))[0]
    assert again.num_cached_tokens >= len(prompts[4]) + 8
    assert again.outputs[0].token_ids == first[10:18]


def test_eos_stop_tokens_and_lengths_mid_batch(model_dir: str, prompts) -> None:
    plain = run(core(model_dir, False), greedy(prompts, max_tokens=14))
    toks = [plain[f"r{i}"]["tokens"] for i in range(5)]
    # EOS at different steps (r1 on its very first token), a stop token, and two that run to their length.
    cut = {0: 3, 1: 0, 3: 4}
    eos = {0: toks[0][3], 1: toks[1][0]}
    requests = [EngineCoreRequest(f"r{i}", p, SamplingParams(max_tokens=5 if i == 4 else 14, temperature=0.0,
                                                             stop_token_ids=[toks[3][4]] if i == 3 else []),
                                  eos_token_id=eos.get(i, 2)) for i, p in enumerate(prompts)]
    sync, asyn = both(model_dir, requests)
    assert asyn == sync
    for i in range(5):
        end = toks[i].index(toks[i][cut[i]]) + 1 if i in cut else (5 if i == 4 else 14)
        assert sync[f"r{i}"]["tokens"] == toks[i][:end]
        assert sync[f"r{i}"]["finish"] == ("stop" if i in cut else "length")
    assert sync["r3"]["stop"] == toks[3][4]


def test_abort_while_a_step_is_in_flight(model_dir: str, prompts) -> None:
    requests = greedy(prompts[:3], max_tokens=10)
    sync = run(core(model_dir, False), requests)
    c = core(model_dir, True)
    state = {"aborted_at": None}

    def abort_once(c: EngineCore) -> None:
        if state["aborted_at"] is None and c._in_flight is not None and c.num_steps >= 3:
            assert "r1" in c._in_flight.sample_ids
            c.abort_requests(["r1"])
            state["aborted_at"] = c.num_steps

    asyn = run(c, requests, on_step=abort_once)
    assert state["aborted_at"] is not None
    assert asyn["r0"] == sync["r0"] and asyn["r2"] == sync["r2"]
    assert asyn["r1"]["finish"] is None and asyn["r1"]["tokens"] == sync["r1"]["tokens"][:len(asyn["r1"]["tokens"])]
    assert len(asyn["r1"]["tokens"]) < 10


def test_penalties_and_min_tokens_fall_back_to_synchronous_steps(model_dir: str, prompts) -> None:
    plain = run(core(model_dir, False), greedy(prompts[:3], max_tokens=8))
    first = plain["r1"]["tokens"][0]
    requests = [
        EngineCoreRequest("r0", prompts[0], SamplingParams(max_tokens=8, temperature=0.0, repetition_penalty=1.5,
                                                           frequency_penalty=0.5, presence_penalty=0.3)),
        # Its first greedy token is its EOS: min_tokens must mask it for four tokens.
        EngineCoreRequest("r1", prompts[1], SamplingParams(max_tokens=8, temperature=0.0, min_tokens=4),
                          eos_token_id=first),
        EngineCoreRequest("r2", prompts[2], SamplingParams(max_tokens=20, temperature=0.0)),
    ]
    sync = run(core(model_dir, False), requests)
    overlap = []
    asyn = run(core(model_dir, True), requests, on_step=lambda c: overlap.append(
        (c._in_flight is not None, c.scheduler.get_request("r0") is not None)))
    assert asyn == sync
    assert len(sync["r1"]["tokens"]) >= 4
    assert not any(flying for flying, penalized_alive in overlap if penalized_alive)
    assert any(flying for flying, _ in overlap), "async steps resume once no request needs host tokens"


def test_seeded_sampling_and_logprobs_match_the_synchronous_engine(model_dir: str, prompts) -> None:
    plain = run(core(model_dir, False), greedy(prompts, max_tokens=10))
    requests = [EngineCoreRequest(f"r{i}", p, SamplingParams(max_tokens=10, temperature=0.9, seed=100 + i,
                                                             top_k=50 if i % 2 else 0, top_p=0.95, logprobs=2),
                                  eos_token_id=plain["r0"]["tokens"][2] if i == 0 else None)
                for i, p in enumerate(prompts)]
    sync, asyn = both(model_dir, requests)
    for rid in sync:
        assert asyn[rid]["tokens"] == sync[rid]["tokens"], rid
        assert asyn[rid]["finish"] == sync[rid]["finish"]
        for a_row, s_row in zip(asyn[rid]["logprobs"], sync[rid]["logprobs"]):
            assert [(lp.token_id, lp.rank) for lp in a_row] == [(lp.token_id, lp.rank) for lp in s_row]
            assert [lp.logprob for lp in a_row] == pytest.approx([lp.logprob for lp in s_row], abs=1e-4)
        assert len(asyn[rid]["logprobs"]) == len(asyn[rid]["tokens"])


def test_step_stats_count_completed_steps(model_dir: str, prompts) -> None:
    c = core(model_dir, True)
    c.record_step_stats()
    run(c, greedy(prompts[:2], max_tokens=5))
    assert len(c.step_stats) == c.num_steps > 0
    assert all(s.duration_s > 0 for s in c.step_stats)
    assert sum(s.num_tokens for s in c.step_stats) == c.num_computed_tokens_total


def test_step_trace_writes_one_line_per_step(model_dir: str, prompts, tmp_path, monkeypatch) -> None:
    """PDSERVE_STEP_TRACE: a JSON line per completed step, the same numbers as the recorded StepStats."""
    import json

    trace = tmp_path / "steps.jsonl"
    monkeypatch.setenv("PDSERVE_STEP_TRACE", str(trace))
    c = core(model_dir, True)
    c.record_step_stats()
    run(c, greedy(prompts[:2], max_tokens=5))
    c.shutdown()
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(lines) == c.num_steps == len(c.step_stats)
    assert [(d["tokens"], d["seqs"], d["decodes"], d["context"]) for d in lines] == [
        (s.num_tokens, s.num_seqs, s.num_decodes, s.total_context) for s in c.step_stats]
    assert [d["ms"] for d in lines] == [round(s.duration_s * 1e3, 3) for s in c.step_stats]
    assert {d["role"] for d in lines} == {"both"} and all(d["end"] > 1.7e9 for d in lines)
    assert lines == sorted(lines, key=lambda d: d["end"])


def test_step_trace_that_cannot_be_opened_is_refused(model_dir: str, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PDSERVE_STEP_TRACE", str(tmp_path / "missing" / "steps.jsonl"))
    with pytest.raises(ValueError, match="PDSERVE_STEP_TRACE=.*missing.*cannot append to it"):
        core(model_dir, True)


def test_async_scheduling_setting(model_dir: str) -> None:
    auto = SchedulerConfig()
    assert auto.use_async_scheduling("cuda")
    assert not auto.use_async_scheduling("cpu")
    assert SchedulerConfig(async_scheduling=True).use_async_scheduling("cpu")
    assert not SchedulerConfig(async_scheduling=False).use_async_scheduling("cuda")
    with pytest.raises(ValueError, match="async_scheduling"):
        SchedulerConfig(async_scheduling="yes")
    # With a KV connector too (prefill and decode pods; tests/kv_transfer/test_disagg_async.py).
    with_connector = EngineConfig.create(model_dir, async_scheduling=True, connector="shared-fs", role="decode")
    assert with_connector.scheduler.async_scheduling is True
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    for argv, want in (([], None), (["--async-scheduling"], True), (["--no-async-scheduling"], False)):
        assert engine_kwargs(parser.parse_args(argv))["async_scheduling"] is want
    assert EngineConfig.create(model_dir).scheduler.async_scheduling == "auto"


GPU_VARIANTS = {
    "triton+graphs": dict(attention_backend="triton"),
    "triton eager": dict(attention_backend="triton", enforce_eager=True),
    "torch": dict(attention_backend="torch"),
    "graphs, tiny budget, preemption": dict(attention_backend="triton", max_num_batched_tokens=16, num_blocks=20,
                                            block_size=4),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", GPU_VARIANTS)
def test_on_gpu_async_is_the_default_and_matches_transformers_and_sync(model_dir: str, prompts, name) -> None:
    """The CUDA paths: placeholders filled before graph replays and in eager inputs, sampled ids and logprobs
    copied through pinned memory behind an event, and the penalty fallback."""
    # A fixed pool: two engines live at once here, and a memory-sized second one would find the first's cache.
    kw = {**dict(device="cuda", dtype="float32", max_num_seqs=8, num_blocks=256), **GPU_VARIANTS[name]}
    c = EngineCore(EngineConfig.create(model_dir, **kw))
    assert c.async_scheduling  # "auto" on CUDA
    got = run(c, greedy(prompts, max_tokens=12, eos=2))
    assert [got[f"r{i}"]["tokens"] for i in range(len(prompts))] == hf_greedy(model_dir, prompts, 12)
    requests = [EngineCoreRequest(f"s{i}", p, SamplingParams(max_tokens=10, temperature=0.9, seed=i, top_p=0.9,
                                                             logprobs=2, repetition_penalty=1.2 if i == 1 else 1.0),
                                  eos_token_id=2) for i, p in enumerate(prompts)]
    sync = run(EngineCore(EngineConfig.create(model_dir, async_scheduling=False, **kw)), requests)
    asyn = run(c, requests)
    for rid in sync:
        assert asyn[rid]["tokens"] == sync[rid]["tokens"], rid
        assert [lp.logprob for row in asyn[rid]["logprobs"] for lp in row] == pytest.approx(
            [lp.logprob for row in sync[rid]["logprobs"] for lp in row], abs=1e-3)
