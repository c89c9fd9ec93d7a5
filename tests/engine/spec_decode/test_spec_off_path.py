"""While adaptive k proposes nothing (a batch of ``disable_by_batch_size`` or more) a speculating engine runs
exactly the non-speculative engine's step: the same scheduler outputs, the plain sampler on the same logits rows,
no proposer call, no verification, no hidden states kept, and a per-step decision that visits no request."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.spec_decode.config import SpeculativeConfig
from pdserve.engine.spec_decode.decoder import SpecDecoder
from pdserve.engine.spec_decode.proposers import Proposer
from tests.engine.spec_decode.test_spec_engine import engine
from tests.helpers.spec_heads import make_medusa_heads

pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures: conftest.py

PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "disable_by_batch_size": 3}


def repetitive_prompts() -> list[list[int]]:
    """Prompts the n-gram proposer would find matches in (so a silent proposer is adaptive k's doing)."""
    return [[5, 6, 7, 8] * 4, [9, 10, 11] * 5, [20 + i % 4 for i in range(14)]]


def traced_run(core, prompts: list[list[int]]) -> tuple[list, list, list[list[int]]]:
    """Step until done, recording every step's chunks and what the plain sampler was given."""
    from pdserve.engine.engine_core import EngineCoreRequest

    steps: list = []
    sampled: list = []
    schedule, sample = core.scheduler.schedule, core.sampler.sample

    def traced_schedule():
        out = schedule()
        steps.append([dataclasses.astuple(c) for c in out.chunks])
        return out

    def traced_sample(logits, requests, bitmask=None):
        sampled.append(([r.request_id for r in requests], tuple(logits.shape), logits.clone()))
        return sample(logits, requests, bitmask)

    core.scheduler.schedule, core.sampler.sample = traced_schedule, traced_sample
    got: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        core.add_request(EngineCoreRequest(f"r{i}", prompt, PARAMS, eos_token_id=2))
        got[f"r{i}"] = []
    while core.has_unfinished_requests():
        for out in core.step():
            got[out.request_id] += out.new_token_ids
    return steps, sampled, list(got.values())


def count_calls(obj, name: str) -> list[int]:
    calls = [0]
    original = getattr(obj, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    setattr(obj, name, counted)
    return calls


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_batch_adaptive_k_turns_off_runs_the_plain_step(llama, async_scheduling) -> None:
    kw = dict(max_num_batched_tokens=256, async_scheduling=async_scheduling)
    plain_steps, plain_sampled, plain_out = traced_run(engine(llama, **kw), repetitive_prompts())
    core = engine(llama, NGRAM, **kw)
    assert core.async_scheduling == async_scheduling
    proposals = count_calls(core.spec.proposer, "propose_batch")
    verifies = count_calls(core.spec, "verify")
    steps, sampled, out = traced_run(core, repetitive_prompts())
    assert out == plain_out
    assert steps == plain_steps  # same chunks: no drafts, no lookahead slots
    assert [(ids, shape) for ids, shape, _ in sampled] == [(ids, shape) for ids, shape, _ in plain_sampled]
    assert all(torch.equal(a[2], b[2]) for a, b in zip(sampled, plain_sampled))
    assert proposals == [0] and verifies == [0]
    assert core.get_stats().spec_decode["num_drafts"] == 0


def test_the_same_engine_speculates_below_the_threshold(llama) -> None:
    """The control: with the batch under ``disable_by_batch_size`` the same prompts do get drafts."""
    core = engine(llama, {**NGRAM, "disable_by_batch_size": 4}, max_num_batched_tokens=256)
    proposals = count_calls(core.spec.proposer, "propose_batch")
    traced_run(core, repetitive_prompts())
    assert proposals[0] > 0 and core.get_stats().spec_decode["num_drafts"] > 0


class _NoIteration:
    def __iter__(self):
        raise AssertionError("a step without proposals visited the requests")


class _HiddenReader(Proposer):
    hidden_states = "last"

    def propose(self, request, k: int) -> list[int]:
        raise AssertionError("not called while adaptive k is off")


class _Runner:
    keep_hidden = True


class _Request:
    def __init__(self) -> None:
        self.spec_token_ids = [1, 2]


def test_the_off_decision_is_o1_and_clears_drafts_once() -> None:
    spec = SpecDecoder(SpeculativeConfig.parse(NGRAM), vocab_size=64, runner=_Runner())
    spec.proposer = _HiddenReader()
    left = [_Request(), _Request()]
    spec.num_proposed = 2  # the last proposal gave drafts: the first step off clears what is left of them
    spec.propose(left, num_running=3)
    assert [r.spec_token_ids for r in left] == [[], []] and not spec.drafting
    assert spec.runner.keep_hidden is False  # the runner stops copying hidden states
    spec.propose(_NoIteration(), num_running=64)  # then no request is visited at all
    spec.observe(None, object(), None, num_running=64)  # nor the step's chunks
    spec.propose([], num_running=1)
    assert spec.runner.keep_hidden is True


def test_no_hidden_states_are_kept_while_off(llama, tmp_path) -> None:
    spec = {"method": "medusa", "model": make_medusa_heads(llama, tmp_path / "medusa"), "num_speculative_tokens": 3,
            "disable_by_batch_size": 3}
    core = engine(llama, spec, max_num_batched_tokens=256)
    hidden = []
    execute = core.runner.execute_model

    def traced(*args, **kwargs):
        logits = execute(*args, **kwargs)
        hidden.append(core.runner.last_hidden)
        return logits

    core.runner.execute_model = traced
    plain = traced_run(engine(llama, max_num_batched_tokens=256), repetitive_prompts())[2]
    assert traced_run(core, repetitive_prompts())[2] == plain
    assert hidden[0] is not None  # the first step: keep_hidden starts on (nothing decided yet)
    assert all(h is None for h in hidden[1:])
