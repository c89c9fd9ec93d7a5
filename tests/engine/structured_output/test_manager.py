"""The structured-output manager with the bundled model's real tokenizer, the scheduler's wait for a grammar, and
the sampler applying a bitmask. Exact: token ids, counters, rows."""

from __future__ import annotations

from concurrent.futures import Future

import pytest
import torch

from pdserve.engine.core.scheduler import Scheduler
from pdserve.engine.frontend.tokenizer import load_tokenizer
from pdserve.engine.model_loader.resolve import resolve_model
from pdserve.engine.request import Request
from pdserve.engine.sampler import Sampler
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.structured_output.backend import XgrammarBackend
from pdserve.engine.structured_output.bitmask import unpack_bitmask
from pdserve.engine.structured_output.manager import RequestGrammar, StructuredOutputManager

VOCAB = 49152  # smollm2's


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model("smollm2-135m-instruct", "auto").tokenizer_path)


@pytest.fixture(scope="module")
def manager(tokenizer):
    mgr = StructuredOutputManager(lambda: XgrammarBackend(tokenizer, VOCAB))
    yield mgr
    mgr.shutdown()


def request(rid: str, prompt: list[int], eos: int, **structured) -> Request:
    params = SamplingParams(max_tokens=8, structured_outputs=structured) if structured else SamplingParams()
    return Request(rid, prompt, params, eos_token_id=eos)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def allowed(mask: torch.Tensor, row: int) -> set[int]:
    return set(unpack_bitmask(mask, VOCAB)[row].nonzero().flatten().tolist())


def test_cache_hits_and_bitmask_follow_tokens(manager, tokenizer) -> None:
    eos = tokenizer.eos_token_id
    a = request("a", [1, 2, 3], eos, choice=["yes", "no"])
    b = request("b", [1, 2, 3], eos, choice=["yes", "no"])
    plain = request("p", [1, 2], eos)
    before = manager.stats.to_dict()
    for r in (a, b, plain):
        manager.add_request(r)
    assert plain.grammar is None
    assert manager.stats.num_requests - before["num_requests"] == 2
    assert manager.stats.cache_hits - before["cache_hits"] == 1  # b reuses a's compile
    a.grammar._compiled.result(timeout=60)
    mask, errors = manager.fill_bitmask([plain, a])
    assert errors == {}
    assert len(allowed(mask, 0)) == VOCAB  # unconstrained row: everything
    first = allowed(mask, 1)
    assert ids(tokenizer, "yes")[0] in first and ids(tokenizer, "no")[0] in first
    assert eos not in first
    a.append_output_token(ids(tokenizer, "yes")[0])
    if len(ids(tokenizer, "yes")) == 1:
        mask, _ = manager.fill_bitmask([a])
        assert allowed(mask, 0) == {eos}  # "yes" is complete: only the end
    a.output_token_ids.clear()  # taken back (as rejected draft tokens would be): the matcher rolls back
    mask, _ = manager.fill_bitmask([a])
    assert allowed(mask, 0) == first


def test_prefix_tokens_generated_elsewhere_advance_the_matcher(manager, tokenizer) -> None:
    """A decode pod's request: its prompt ends with the prefill pod's first token (num_prefix_tokens=1)."""
    eos = tokenizer.eos_token_id
    yes = ids(tokenizer, "yes")
    fresh = request("f", [5, 6], eos, regex="(yes|no)!")
    cont = request("c", [5, 6] + yes, eos, regex="(yes|no)!", num_prefix_tokens=len(yes))
    for r in (fresh, cont):
        manager.add_request(r)
        r.grammar._compiled.result(timeout=60)
    mask, errors = manager.fill_bitmask([fresh, cont])
    assert errors == {}
    assert ids(tokenizer, "!")[0] in allowed(mask, 1) and ids(tokenizer, "!")[0] not in allowed(mask, 0)


def test_a_token_the_grammar_refuses_fails_only_its_row(manager, tokenizer) -> None:
    eos = tokenizer.eos_token_id
    good = request("g", [1], eos, choice=["yes"])
    bad = request("b", [1], eos, choice=["yes"])
    for r in (good, bad):
        manager.add_request(r)
        r.grammar._compiled.result(timeout=60)
    bad.append_output_token(ids(tokenizer, "zebra")[0])
    _, errors = manager.fill_bitmask([good, bad])
    assert list(errors) == [1] and "does not follow the request's choice constraint" in errors[1]


def test_bad_grammar_in_the_engine_is_a_row_error(manager, tokenizer) -> None:
    r = request("x", [1], tokenizer.eos_token_id, regex="a(b")
    manager.add_request(r)
    r.grammar._compiled.exception(timeout=60)
    assert r.grammar.ready
    _, errors = manager.fill_bitmask([r])
    assert errors == {0: "invalid structured_outputs.regex: Regex parsing error at position 4: "
                         "The parenthesis is not closed."}


def test_scheduler_admits_a_request_only_once_its_grammar_is_ready() -> None:
    s = Scheduler(block_size=4, num_blocks=16, max_num_batched_tokens=64, max_num_seqs=8, max_model_len=64)
    waiting = Request("w", [1, 2, 3], SamplingParams(structured_outputs={"regex": "a"}))
    compiled: Future = Future()
    waiting.grammar = RequestGrammar(waiting.sampling_params.structured_outputs, compiled)
    other = Request("o", [4, 5], SamplingParams())
    s.add_request(waiting)
    s.add_request(other)
    out = s.schedule()
    assert [c.request_id for c in out.chunks] == ["o"]  # behind a compiling grammar, the other one goes first
    s.update_from_output(out, {"o": 7})
    compiled.set_result(object())
    out = s.schedule()
    assert sorted(c.request_id for c in out.chunks) == ["o", "w"]


def test_sampler_applies_the_bitmask_on_every_row_kind() -> None:
    """Greedy and random rows pick only allowed tokens; logprobs stay the model's."""
    logits = torch.tensor([[5.0, 1.0, 0.0, 0.0], [5.0, 1.0, 0.0, 0.0], [5.0, 1.0, 0.0, 0.0]])
    reqs = [Request(str(i), [1], SamplingParams(temperature=t, logprobs=0)) for i, t in enumerate((0.0, 1.0, 0.0))]
    mask = torch.tensor([[0b0100], [0b1010], [-1]], dtype=torch.int32)
    for _ in range(5):
        res = Sampler().sample(logits, reqs, mask)
        assert res.token_ids[0] == 2 and res.token_ids[1] in (1, 3) and res.token_ids[2] == 0
    lp = torch.log_softmax(logits[0], -1)
    assert res.logprobs[0][0].logprob == pytest.approx(lp[2].item())
