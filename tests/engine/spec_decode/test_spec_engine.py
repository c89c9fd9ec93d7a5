"""Speculative decoding end to end in the engine core on CPU (torch attention): greedy outputs are token-identical
with speculation on and off for every proposer, with chunked prefill, prefix caching and preemption; sampling
keeps its distribution (two-sample chi-square on a tiny-vocabulary model); per-request opt-out; metrics."""

from __future__ import annotations

import json

import pytest
import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.engine_core import EngineCore, EngineCoreRequest
from pdserve.engine.sampling_params import SamplingParams
from tests.engine.spec_decode.chi_square import two_sample
from tests.helpers.tiny_models import make_tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures: conftest.py


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(3, 200, (24,), generator=g).tolist()  # a prefix for the prefix cache to hit
    out = [shared + torch.randint(3, 200, (n,), generator=g).tolist() for n in (1, 17)]
    return out + [torch.randint(3, 200, (n,), generator=g).tolist() for n in (40,)]


def engine(model: str, spec: dict | None = None, **kw) -> EngineCore:
    kw.setdefault("max_num_batched_tokens", 32)  # prompts of 25 to 41 tokens: chunked prefill happens
    return EngineCore(EngineConfig.create(model, device="cpu", attention_backend="torch",
                                          speculative_config=spec, **kw))


def run(core: EngineCore, requests: list[tuple[list[int], SamplingParams]]) -> list[list[int]]:
    """Step until done; each request's output tokens (checks that no block leaked)."""
    got: dict[str, list[int]] = {}
    for i, (prompt, params) in enumerate(requests):
        core.add_request(EngineCoreRequest(f"r{i}", prompt, params, eos_token_id=2))
        got[f"r{i}"] = []
    while core.has_unfinished_requests():
        for out in core.step():
            got[out.request_id] += out.new_token_ids
    assert core.get_stats().num_free_blocks == core.scheduler.num_blocks
    return list(got.values())


GREEDY = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)


def greedy_matrix(model: str, tmp_path, configs: list[tuple[dict, list[dict]]], **kw) -> None:
    """For each engine config: outputs with each speculative config equal those without, and drafts were
    accepted and rejected along the way."""
    requests = [(p, GREEDY) for p in prompts()]
    for config, specs in configs:
        base = run(engine(model, **config, **kw), requests)
        oracle = tmp_path / "oracle.json"
        oracle.write_text(json.dumps([{"prompt_token_ids": p, "output_token_ids": o}
                                      for (p, _), o in zip(requests, base)]))
        for spec in specs:
            spec = {**spec, "oracle_path": str(oracle)} if spec["method"] == "oracle" else spec
            core = engine(model, spec, **config, **kw)
            assert run(core, requests) == base, (config, spec)
            stats = core.get_stats()
            assert stats.spec_decode["num_accepted_tokens"] > 0, (config, spec)
            assert stats.spec_decode["num_accepted_tokens"] < stats.spec_decode["num_draft_tokens"]
            if config.get("num_blocks"):
                assert stats.num_preemptions > 0


def assert_sampling_distribution_unchanged(model: str, spec: dict, prompt: list[int], sp: SamplingParams,
                                           n: int) -> None:
    """``n`` continuations of ``prompt`` sampled with ``sp`` (at least 4 tokens; ``model`` has an 8-token
    vocabulary) without and with ``spec``, each run from seed 0: tokens 2 to 4 have the same distribution (a
    two-sample chi-square test), and with ``spec`` there were at least ``n`` drafts, some but not all accepted."""
    outs = []
    for config in (None, spec):
        torch.manual_seed(0)
        core = engine(model, config, max_num_seqs=n, max_num_batched_tokens=8192)
        outs.append(torch.tensor(run(core, [(prompt, sp)] * n)))
        if config:
            stats = core.get_stats().spec_decode
            assert stats["num_drafts"] >= n and 0.05 < stats["num_accepted_tokens"] / stats["num_draft_tokens"] < 0.95
    for pos in (1, 2, 3):
        counts = [torch.bincount(o[:, pos], minlength=8) for o in outs]
        assert two_sample(*counts) > 1e-3, (pos, counts)


ORACLE = {"method": "oracle", "num_speculative_tokens": 3, "oracle_acceptance": 0.5}
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


def test_greedy_identity_llama_chunked_prefill_prefix_caching_preemption(llama, tmp_path) -> None:
    # Default pool (prefix hits on the shared prefix), a pool so small that requests are preempted, and
    # asynchronous scheduling (speculating steps run synchronously, the others overlap).
    greedy_matrix(llama, tmp_path, [({}, [ORACLE, NGRAM]), ({"num_blocks": 6}, [ORACLE]),
                                    ({"async_scheduling": True}, [ORACLE])])


def test_greedy_identity_qwen3(qwen3, tmp_path) -> None:
    greedy_matrix(qwen3, tmp_path, [({}, [ORACLE])], enable_prefix_caching=False)


def test_draft_model_proposer(llama, qwen3) -> None:
    """The target itself as its draft model accepts everything; another model with the same vocabulary (a tiny
    Qwen3) guesses too; outputs equal plain decoding's either way, preemption included (the draft keeps its own
    KV cache, and gives every block back when requests finish)."""
    requests = [(p, GREEDY) for p in prompts()]
    base = run(engine(llama), requests)
    for draft, small in ((llama, False), (qwen3, True)):
        spec = {"method": "draft_model", "model": draft, "num_speculative_tokens": 3, "draft_kv_cache_gib": 0.01}
        core = engine(llama, spec, **({"num_blocks": 6} if small else {}))
        assert run(core, requests) == base
        stats = core.get_stats().spec_decode
        if small:
            assert stats["num_draft_tokens"] > 0  # unrelated random weights: acceptance near 0, outputs still exact
            assert core.get_stats().num_preemptions > 0
        else:
            assert stats["num_accepted_tokens"] == stats["num_draft_tokens"] > 0
        proposer = core.spec.proposer
        assert not proposer._tables and len(proposer._free) == proposer.num_blocks  # every block returned


def test_draft_model_must_share_the_vocabulary(llama, tmp_path) -> None:
    other = make_tiny_model("llama", tmp_path / "v8", vocab_size=8)
    with pytest.raises(ValueError, match="same tokenizer|share the target"):
        engine(llama, {"method": "draft_model", "model": other})


def test_opt_out_and_oracle_sweep(llama) -> None:
    """One engine, as the latency benchmark drives it: a baseline that opts out (and is recorded by the oracle),
    then replays at 100 % and 0 % acceptance; the outputs stay the baseline's."""
    core = engine(llama, {"method": "oracle", "num_speculative_tokens": 4, "adaptive": False})
    requests = [(p, GREEDY) for p in prompts()[:2]]
    opted_out = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, disable_speculation=True)
    base = run(core, [(p, opted_out) for p, _ in requests])
    assert core.get_stats().spec_decode["num_drafts"] == 0
    steps = core.num_steps
    assert run(core, requests) == base
    stats = core.get_stats().spec_decode
    assert stats["num_accepted_tokens"] == stats["num_draft_tokens"] > 0
    assert core.num_steps - steps < 15  # 30 tokens each at 5 per step (plus the prefill steps)
    core.spec.proposer.acceptance = 0.0
    assert run(core, requests) == base
    assert core.get_stats().spec_decode["num_accepted_tokens"] == stats["num_accepted_tokens"]


@pytest.mark.parametrize("acceptance,kept", [(1.0, 4), (0.5, 2)])
def test_forced_oracle_accepts_its_share_of_any_record(llama, tmp_path, acceptance, kept) -> None:
    """``oracle_forced`` (bf16 benchmarks): a record the model would never produce is accepted at exactly the
    asked share; each step emits the kept drafts and then the target's own token."""
    prompt = prompts()[0]
    record = [(7 * i) % 150 + 3 for i in range(40)]  # tokens of the tiny vocabulary, in no order the model knows
    path = tmp_path / "record.json"
    path.write_text(json.dumps([{"prompt_token_ids": prompt, "output_token_ids": record}]))
    core = engine(llama, {"method": "oracle", "num_speculative_tokens": 4, "adaptive": False,
                          "oracle_path": str(path), "oracle_acceptance": acceptance, "oracle_forced": True})
    (out,) = run(core, [(prompt, GREEDY)])
    assert len(out) == 30
    # Token 0 comes from the prefill; then each step of kept + 1 tokens: kept from the record, one of the target's
    # (up to the last steps, whose proposals the length limit shortens).
    from_record = [i for i in range(1, 21) if (i - 1) % (kept + 1) < kept]
    assert [out[i] for i in from_record] == [record[i] for i in from_record]
    assert out[kept + 1] != record[kept + 1]  # the target's own token, not the record's
    stats = core.get_stats().spec_decode
    assert stats["num_accepted_tokens"] == pytest.approx(acceptance * stats["num_draft_tokens"], abs=2)


def test_oracle_forced_is_refused_for_real_proposers() -> None:
    from pdserve.engine.spec_decode.config import SpeculativeConfig

    with pytest.raises(ValueError, match="oracle_forced is for the \"oracle\" method"):
        SpeculativeConfig.parse({"method": "ngram", "oracle_forced": True})


def test_adaptive_k_turns_off_at_low_acceptance(llama) -> None:
    core = engine(llama, {"method": "oracle", "num_speculative_tokens": 4, "oracle_acceptance": 0.0,
                          "probe_interval": 100})
    requests = [(prompts()[0], GREEDY)]
    run(core, requests)  # recorded
    before = core.get_stats().spec_decode["num_drafts"]
    run(core, requests)
    assert 0 < core.get_stats().spec_decode["num_drafts"] - before <= 6  # backed off after a few misses


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.8, top_p=0.7),
                                    dict(temperature=1.0, frequency_penalty=1.5)])
def test_sampling_distribution_is_unchanged(tmp_path_factory, params) -> None:
    """Tokens 2 to 4 of many sampled continuations (emitted by verification when speculating) have the same
    distribution with and without speculation. An 8-token vocabulary keeps the bins few; the prompt holds every
    bigram, so the n-gram proposer always has a guess."""
    model = make_tiny_model("llama", tmp_path_factory.mktemp("v8"), vocab_size=8, initializer_range=0.2)
    prompt = [a for a in range(3, 8) for b in range(3, 8) for a in (a, b)]
    sp = SamplingParams(max_tokens=4, ignore_eos=True, **params)
    n = 600
    spec = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 1, "prompt_lookup_max": 2,
            "adaptive": False}
    assert_sampling_distribution_unchanged(model, spec, prompt, sp, n)
