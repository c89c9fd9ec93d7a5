"""Side-by-side offline benchmarks (``pdserve bench throughput|latency --peer vllm``): one workload, written once,
run by pdserve and then by the peer, each engine in a process of its own (bench/peer_worker.py) so each starts on
an empty GPU, with identical token-id prompts, output lengths, greedy sampling and EOS ignored.

``--peer pdserve`` runs pdserve on both sides through the same path: a self-check of the harness (the ratio should
be about 1), which is what the CPU tests run; vLLM itself runs only where it is installed (a CUDA machine).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from pdserve.bench.peer_process import (PeerError, check_importable, peer_env, run_to_completion, terminate_as_exit,
                                       worker_command)

# Peers that run in a process of their own (the transformers peer, "hf", runs in the benchmark's process).
PROCESS_PEERS = ("vllm", "pdserve")
DEFAULT_TIMEOUT_S = 1800.0
# Flags that only mean something with a process peer (their defaults are None / False, so "given" is visible).
PROCESS_FLAGS = ("peer_python", "peer_pythonpath", "peer_log_dir", "peer_timeout")
OFFLINE_FLAGS = (*PROCESS_FLAGS, "peer_engine_args")
PEER_HELP = ("also run the same workload through a peer engine: hf (transformers, in this process), vllm (in a "
             "process of its own, as is pdserve then), or pdserve (a self-check of that two-process path)")


def peer_label(peer: str) -> str:
    """The peer's name in tables (the self-check's second pdserve is told apart from the first)."""
    return "self-check" if peer == "pdserve" else peer


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"enforce_eager\": true}'")
    return value


_json_object.__name__ = "JSON object"


def add_process_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Flags of the peer's process, shared by the offline benchmarks and ``bench serve``."""
    g = parser.add_argument_group("peer process (--peer vllm | pdserve)")
    g.add_argument("--peer-python", default=None, help="interpreter of the peer's process (default: this one)")
    g.add_argument("--peer-pythonpath", default=None,
                   help="prepended to PYTHONPATH for the peer's process only, e.g. the directory vLLM is unpacked "
                        "into (its pinned dependencies then come before pdserve's)")
    g.add_argument("--peer-log-dir", default=None,
                   help="where each engine's log (and the shared workload) goes (default: a new temporary "
                        "directory, printed at the end)")
    g.add_argument("--peer-timeout", type=float, default=None,
                   help="seconds each engine may run before it is killed: offline its whole process, start-up "
                        f"included; bench serve its trials after /health (default {DEFAULT_TIMEOUT_S:g})")
    return g


def add_offline_arguments(parser: argparse.ArgumentParser) -> None:
    g = add_process_arguments(parser)
    g.add_argument("--peer-engine-args", type=_json_object, default=None,
                   help="with --peer vllm: more keyword arguments for vllm.LLM, as a JSON object "
                        "(e.g. '{\"enforce_eager\": true}')")


def refuse_unused_peer_flags(args: argparse.Namespace, peers: tuple[str, ...],
                             names: tuple[str, ...] = OFFLINE_FLAGS) -> None:
    """A peer flag given without a peer that uses it is an error, not silently ignored."""
    if args.peer in peers:
        return
    given = [name for name in names if getattr(args, name) not in (None, False)]
    if given:
        raise SystemExit(f"{', '.join('--' + n.replace('_', '-') for n in sorted(given))}: only with "
                         f"--peer {' or '.join(peers)}")


def log_dir(args: argparse.Namespace) -> Path:
    path = Path(args.peer_log_dir or tempfile.mkdtemp(prefix="pdserve-peer-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def vllm_llm_kwargs(kw: dict[str, Any], model_dir: str, dtype: str, max_model_len: int,
                    extra: dict[str, Any]) -> dict[str, Any]:
    """vllm.LLM's arguments for the engine pdserve ran with ``kw`` (its :func:`engine_kwargs`): the same model
    shapes, dtype and context length (as pdserve resolved them), batch limits, memory share and prefix caching."""
    out: dict[str, Any] = dict(
        model=model_dir, load_format="dummy" if kw["load_format"] == "dummy" else "auto", skip_tokenizer_init=True,
        dtype=dtype, max_model_len=max_model_len, max_num_seqs=kw["max_num_seqs"],
        max_num_batched_tokens=kw["max_num_batched_tokens"], gpu_memory_utilization=kw["gpu_memory_utilization"],
        enable_prefix_caching=kw["enable_prefix_caching"], enable_chunked_prefill=kw["enable_chunked_prefill"],
        block_size=kw["block_size"], seed=kw["seed"], enforce_eager=kw["enforce_eager"],
        tensor_parallel_size=kw["tensor_parallel_size"], pipeline_parallel_size=kw["pipeline_parallel_size"])
    if kw.get("num_blocks"):
        out["num_gpu_blocks_override"] = kw["num_blocks"]
    if kw.get("kv_cache_dtype", "auto") != "auto":
        out["kv_cache_dtype"] = kw["kv_cache_dtype"]
    if kw.get("async_scheduling") is not None:
        out["async_scheduling"] = kw["async_scheduling"]
    out.update(extra)
    return out


def _run_engine(engine: str, engine_kwargs: dict[str, Any], python: str, env: dict[str, str], workload: Path,
                directory: Path, tag: str, timeout_s: float) -> dict[str, Any]:
    spec_path, result_path = directory / f"{tag}.spec.json", directory / f"{tag}.result.json"
    log = directory / f"{tag}.log"
    spec_path.write_text(json.dumps({"engine": engine, "engine_kwargs": engine_kwargs, "workload": str(workload)}))
    result_path.unlink(missing_ok=True)
    run_to_completion(worker_command(python, spec_path, result_path), env, log, timeout_s, f"the {tag} process")
    if not result_path.is_file():
        raise PeerError(f"the {tag} process exited without a result; its log: {log}")
    result: dict[str, Any] = json.loads(result_path.read_text())
    return result


def side_by_side(args: argparse.Namespace, kw: dict[str, Any], workload: dict[str, Any]) -> tuple[dict, dict]:
    """Run ``workload`` through pdserve (engine arguments ``kw``) and then through ``args.peer``; returns both
    result records (bench/peer_worker.py). Raises :class:`PeerError` when either process fails or the two
    engines were not given the same requests."""
    with terminate_as_exit():
        return _side_by_side(args, kw, workload)


def _side_by_side(args: argparse.Namespace, kw: dict[str, Any], workload: dict[str, Any]) -> tuple[dict, dict]:
    if kw.get("speculative_config") is not None:
        raise PeerError("--speculative-config is not compared with a peer (run it without --peer)")
    peer = args.peer
    env = peer_env(args.peer_pythonpath, peer)
    python, timeout_s = args.peer_python or sys.executable, args.peer_timeout or DEFAULT_TIMEOUT_S
    check_importable(peer, python, env)
    directory = log_dir(args)
    workload_path = directory / "workload.json"
    workload_path.write_text(json.dumps(workload))
    pd_kw = {k: v for k, v in kw.items() if k != "speculative_config"}
    print(f"running pdserve, then {peer}, each in its own process (logs in {directory})", flush=True)
    ours = _run_engine("pdserve", pd_kw, sys.executable, peer_env(None, "pdserve"), workload_path, directory,
                       "pdserve", timeout_s)
    if peer == "vllm":
        from pdserve.bench.model_dir import model_directory

        model_dir = model_directory(kw["model"], kw["load_format"], directory / "model")
        peer_kw = vllm_llm_kwargs(kw, model_dir, ours["dtype"], ours["max_model_len"], args.peer_engine_args or {})
    else:
        if args.peer_engine_args:
            raise PeerError("--peer-engine-args is for --peer vllm")
        peer_kw = pd_kw
    theirs = _run_engine(peer, peer_kw, python, env, workload_path, directory, peer_label(peer), timeout_s)
    if ours["workload_digest"] != theirs["workload_digest"]:
        raise PeerError(f"the engines ran different requests (digests {ours['workload_digest']} and "
                        f"{theirs['workload_digest']}); see {directory}")
    print(f"start-up: pdserve {ours['startup_s']:.1f} s, {peer_label(peer)} {theirs['startup_s']:.1f} s; "
          f"identical requests (digest {ours['workload_digest'][:16]}); logs in {directory}", flush=True)
    return ours, theirs


def ratio(ours: float, theirs: float) -> float:
    """pdserve's speed over the peer's (> 1: pdserve faster); NaN when the peer's figure is missing or zero."""
    return ours / theirs if theirs and theirs == theirs else float("nan")
