"""Engines in the prefill and decode roles in one process, and the proxy's job between them (for tests).

Configs are built once per model and copied with another ``kv_transfer`` section, so a test pays for the engines
it starts, not for resolving the model again.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import time
from typing import Any

from pdserve.engine.config import EngineConfig, KVTransferConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.security import load_cluster_secret

MAX_TOKENS = 6
BLOCK = 16


@functools.lru_cache(maxsize=8)
def base_config(model: str, **overrides: Any) -> EngineConfig:
    kw = dict(device="cpu", num_blocks=64, block_size=BLOCK, max_model_len=256, max_num_batched_tokens=256)
    return EngineConfig.create(model, **{**kw, **overrides})


def engine(model: str, role: str = "both", connector: str | None = None, config_overrides: dict | None = None,
           asynchronous: bool = False, **options: Any) -> LLMEngine:
    """An engine in ``role``; ``asynchronous`` forces asynchronous scheduling (off by default on CPU)."""
    overrides = {**(config_overrides or {}), **({"async_scheduling": True} if asynchronous else {})}
    cfg = base_config(model, **overrides)
    kvt = KVTransferConfig(role=role, connector=connector, options=tuple(sorted(options.items())),
                           cluster_secret=load_cluster_secret())
    eng = LLMEngine(dataclasses.replace(cfg, kv_transfer=kvt))
    STARTED.append(eng)
    assert eng.core.async_scheduling == asynchronous
    return eng


# Engines started by :func:`engine` and not shut down yet. A connector's threads and servers keep an engine (its
# weights and KV cache) alive, so the tests' conftest shuts these down after each test.
STARTED: list[LLMEngine] = []


def shut_down_started() -> None:
    """Shut down every engine :func:`engine` started (their connectors' threads and servers), so they can be freed."""
    while STARTED:
        STARTED.pop().core.shutdown()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def run_all(eng: LLMEngine, ids: list[str], timeout_s: float = 60.0) -> dict:
    """Step until every request of ``ids`` finished; request id -> final output.

    (A prefill engine may still hold blocks for a peer afterwards: ``has_unfinished_requests`` stays true.)
    """
    done, deadline = {}, time.monotonic() + timeout_s
    while len(done) < len(ids):
        assert time.monotonic() < deadline, "engine did not finish"
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    return done


def prefill_all(prefill: LLMEngine, prompts: list[list[int]], tag: str = "p") -> dict:
    for i, p in enumerate(prompts):
        prefill.add_request(p, greedy(1), request_id=f"{tag}{i}")
    out = run_all(prefill, [f"{tag}{i}" for i in range(len(prompts))])
    if prefill.has_unfinished_requests():
        prefill.step()  # as a pod's engine loop does next: the grpc worker registers the finished transfers
    return out


def decode_all(decode: LLMEngine, prompts: list[list[int]], firsts: dict, tag: str = "p",
               max_tokens: int = MAX_TOKENS) -> dict:
    for i, p in enumerate(prompts):
        first = firsts[f"{tag}{i}"]
        decode.add_request(p + first.outputs[0].token_ids, greedy(max_tokens - 1), request_id=f"{tag}{i}",
                           kv_transfer_params=first.kv_transfer_params)
    return run_all(decode, [f"{tag}{i}" for i in range(len(prompts))])


def disagg(prefill: LLMEngine, decode: LLMEngine, prompts: list[list[int]], tag: str = "p",
           max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    """The proxy's job: the first token from the prefill engine, the rest from the decode engine."""
    firsts = prefill_all(prefill, prompts, tag)
    rest = decode_all(decode, prompts, firsts, tag, max_tokens)
    return [firsts[f"{tag}{i}"].outputs[0].token_ids + rest[f"{tag}{i}"].outputs[0].token_ids
            for i in range(len(prompts))]


@functools.lru_cache(maxsize=16)
def _monolithic(model: str, prompts: tuple[tuple[int, ...], ...], max_tokens: int) -> tuple:
    eng = engine(model)
    for i, p in enumerate(prompts):
        eng.add_request(list(p), greedy(max_tokens), request_id=f"m{i}")
    out = run_all(eng, [f"m{i}" for i in range(len(prompts))])
    return tuple(tuple(out[f"m{i}"].outputs[0].token_ids) for i in range(len(prompts)))


def monolithic(model: str, prompts: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    """Greedy outputs of the monolithic engine (cached per model and prompts)."""
    return [list(o) for o in _monolithic(model, tuple(map(tuple, prompts)), max_tokens)]


def prompts_of(lengths: list[int], vocab: int = 500, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def options_for(connector: str, tmp_path: Any, redis_url: str, **extra: Any) -> dict:
    opts = {"kv_load_timeout_s": 2.0, **extra}
    if connector == "shared-fs":
        opts["kv_path"] = str(tmp_path / "kv")
    if connector == "redis":
        opts["redis_url"] = redis_url
    return opts


def settle(*engines: LLMEngine, timeout_s: float = 10.0) -> None:
    """Step until every engine has finished its transfers and holds, then check no block is left in use."""
    deadline = time.monotonic() + timeout_s
    for eng in engines:
        while eng.has_unfinished_requests() and time.monotonic() < deadline:
            eng.step()
        assert eng.core.scheduler.kv_cache_manager.usage == 0.0, "blocks leaked"


def connector_stats(eng: LLMEngine) -> Any:
    return eng.core.scheduler.kv_connector.stats.snapshot()


def prefill_server_process(conn: Any, config: EngineConfig, prompts: list[list[int]], ids: list[str]) -> None:
    """A prefill engine in its own process (for CUDA IPC, which needs two processes): prefills ``prompts``, sends
    ``{id: (first token ids, kv_transfer_params)}``, keeps stepping (so peers' releases free blocks) until told to
    stop, then sends its KV cache usage once every held block is free."""
    eng = LLMEngine(config)
    try:
        for rid, prompt in zip(ids, prompts):
            eng.add_request(prompt, greedy(1), request_id=rid)
        firsts = run_all(eng, ids)
        conn.send({rid: (list(out.outputs[0].token_ids), out.kv_transfer_params) for rid, out in firsts.items()})
        while not conn.poll(0.005):
            if eng.has_unfinished_requests():
                eng.step()
        deadline = time.monotonic() + 30
        while eng.has_unfinished_requests() and time.monotonic() < deadline:
            eng.step()
        conn.send(eng.core.scheduler.kv_cache_manager.usage)
    finally:
        eng.core.shutdown()
