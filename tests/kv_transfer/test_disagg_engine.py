"""Prefill engine -> connector -> decode engine, in one process: greedy outputs equal the monolithic engine's.

Each connector moves the KV of a batch of prompts (many not a whole number of blocks) from an engine in the
``prefill`` role to one in the ``decode`` role; the decode engine must then compute nothing of the prompts (only
the prefill's first token), produce the monolithic engine's tokens, and both engines must end with every block
free. Faults (a dead prefill, corrupt or missing blocks, an incompatible peer, Redis down, an expired lease)
end in the same tokens under ``recompute`` and in a clear error under ``fail``.
"""

from __future__ import annotations

import time
import uuid

import pytest

from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from tests.helpers.tiny_models import make_tiny_model

CONNECTORS = ["shared-fs", "redis", "grpc"]
MAX_TOKENS = 6
BLOCK = 16


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(arch, root / arch) for arch in ("llama", "qwen3")}


def engine(model: str, role: str = "both", connector: str | None = None, **options) -> LLMEngine:
    opts = tuple(sorted(options.items()))
    cfg = EngineConfig.create(model, device="cpu", num_blocks=64, block_size=BLOCK, max_model_len=256,
                              max_num_batched_tokens=256, role=role, connector=connector, options=opts)
    return LLMEngine(cfg)


def run_all(eng: LLMEngine, timeout_s: float = 60.0) -> dict[str, list]:
    """Step until every request finished (and the connector settled); request id -> final output."""
    done, deadline = {}, time.monotonic() + timeout_s
    while eng.has_unfinished_requests():
        assert time.monotonic() < deadline, "engine did not finish"
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    return done


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def disagg(prefill: LLMEngine, decode: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    """The proxy's job: first token from the prefill engine, the rest from the decode engine."""
    for i, p in enumerate(prompts):
        prefill.add_request(p, greedy(1), request_id=f"p{i}")
    firsts = run_all(prefill)
    for i, p in enumerate(prompts):
        first = firsts[f"p{i}"]
        t0 = first.outputs[0].token_ids
        decode.add_request(p + t0, greedy(MAX_TOKENS - 1), request_id=f"p{i}",
                           kv_transfer_params=first.kv_transfer_params)
    rest = run_all(decode)
    return [firsts[f"p{i}"].outputs[0].token_ids + rest[f"p{i}"].outputs[0].token_ids for i in range(len(prompts))]


def monolithic(model: str, prompts: list[list[int]]) -> list[list[int]]:
    eng = engine(model)
    for i, p in enumerate(prompts):
        eng.add_request(p, greedy(MAX_TOKENS), request_id=f"m{i}")
    out = run_all(eng)
    return [out[f"m{i}"].outputs[0].token_ids for i in range(len(prompts))]


def prompts_of(lengths: list[int], vocab: int = 500, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def options_for(connector: str, tmp_path, redis_url: str, **extra) -> dict:
    opts = {"kv_load_timeout_s": 2.0, **extra}
    if connector == "shared-fs":
        opts["kv_path"] = str(tmp_path / "kv")
    if connector == "redis":
        opts["redis_url"] = redis_url
    return opts


def assert_no_leaks(*engines: LLMEngine, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    for eng in engines:
        while eng.has_unfinished_requests() and time.monotonic() < deadline:
            eng.step()
        assert eng.core.scheduler.kv_cache_manager.usage == 0.0


LENGTHS = [5, 16, 17, 40, 33, 64]  # whole blocks and partial ones


@pytest.mark.parametrize("connector", CONNECTORS)
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tiny_models_token_identical(connector, arch, tiny_dirs, tmp_path, redis_url):
    model, prompts = tiny_dirs[arch], prompts_of(LENGTHS)
    opts = options_for(connector, tmp_path, redis_url)
    p, d = engine(model, "prefill", connector, **opts), engine(model, "decode", connector, **opts)
    assert disagg(p, d, prompts) == monolithic(model, prompts)
    # The decode engine computed only the prefill's first token of each request.
    assert d.core.num_computed_tokens_total == len(prompts) * MAX_TOKENS - len(prompts)
    assert_no_leaks(p, d)


@pytest.mark.parametrize("connector", CONNECTORS)
def test_bundled_model_token_identical(connector, tmp_path, redis_url):
    model = "smollm2-135m-instruct"
    p = engine(model, "prefill", connector, **options_for(connector, tmp_path, redis_url))
    tok = p.tokenizer
    prompts = [tok(t).input_ids for t in ("The capital of France is", "Write a haiku about the sea and the moon.",
                                         "def fibonacci(n):", "Once upon a time in a small village by the "
                                         "mountains there lived an old clockmaker who")]
    d = engine(model, "decode", connector, **options_for(connector, tmp_path, redis_url))
    assert disagg(p, d, prompts) == monolithic(model, prompts)
    assert_no_leaks(p, d)
