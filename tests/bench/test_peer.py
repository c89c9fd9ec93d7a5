"""``--peer vllm`` of the offline benchmarks, on a CPU: everything but vLLM itself.

vLLM runs only on a CUDA machine (scripts/gpu_peer_runs.sh). Here: the peer's process handling (a failing peer →
its log's tail; a hanging one → killed with its children at the time limit), the mapping of pdserve's engine
arguments onto vllm.LLM's, the refusals, and ``--peer pdserve`` — the documented self-check that runs pdserve on
both sides of the very same two-process path — which shows both engines get one identical workload.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pdserve.bench.latency import case_prompts
from pdserve.bench.peer import vllm_llm_kwargs
from pdserve.bench.peer_process import (PeerError, check_importable, group_alive, peer_env, run_to_completion, start,
                                         stop_group)
from pdserve.bench.peer_worker import workload_digest
from pdserve.bench.workload import random_requests
from pdserve.cli.engine_args import engine_kwargs
from pdserve.cli.main import build_parser, main

pytestmark = pytest.mark.timeout(300)
# Like vLLM: the process we start spawns an engine core of its own; both hang.
HANGING_ENGINE = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
                  "time.sleep(120)']); print('child', child.pid, flush=True); time.sleep(120)")
CPU = ["--device", "cpu", "--attention-backend", "torch", "--max-model-len", "64"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from tests.helpers.tiny_models import make_tiny_model

    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.mark.parametrize("kind", ["throughput", "latency", "serve"])
def test_an_unknown_peer_is_refused(kind: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["bench", kind, "--peer", "sglang"])
    assert exc.value.code == 2
    assert "argument --peer: invalid choice: 'sglang'" in capsys.readouterr().err


def test_peer_flags_without_a_process_peer_are_refused() -> None:
    with pytest.raises(SystemExit, match=r"--peer-pythonpath: only with --peer vllm or pdserve"):
        main(["bench", "throughput", "--peer", "hf", "--peer-pythonpath", "/opt/vllm"])
    with pytest.raises(SystemExit, match=r"--peer-timeout: only with"):
        main(["bench", "latency", "--peer-timeout", "10"])
    with pytest.raises(SystemExit, match=r"--serve-model: only with --peer vllm or pdserve"):
        main(["bench", "serve", "--serve-model", "llama-3.1-8b"])


def test_a_failing_peer_gives_its_log_tail(tmp_path) -> None:
    code = "import sys; print('ImportError: libcudart.so.13: cannot open shared object file'); sys.exit(3)"
    with pytest.raises(PeerError) as exc:
        run_to_completion([sys.executable, "-c", code], peer_env(None, "vllm"), tmp_path / "peer.log", 60,
                          "the vllm process")
    message = str(exc.value)
    assert "the vllm process failed with exit code 3" in message and "libcudart.so.13" in message


def test_a_hanging_peer_is_killed_with_its_children(tmp_path) -> None:
    code, log = HANGING_ENGINE, tmp_path / "peer.log"
    start = time.monotonic()
    with pytest.raises(PeerError, match=r"did not finish within 3 s and was killed"):
        run_to_completion([sys.executable, "-c", code], peer_env(None, "vllm"), log, 3, "the vllm process")
    assert time.monotonic() - start < 30
    child = int(log.read_text().split("child")[1].split()[0])
    assert not _running(child), "the peer's child outlived it"  # gone when run_to_completion returns


def test_a_terminated_benchmark_still_kills_the_engine_s_group(tmp_path) -> None:
    # `timeout` sends SIGTERM to the benchmark; the engine's process group must not survive it.
    log = tmp_path / "e.log"
    bench = ("import sys; from pdserve.bench.peer_process import peer_env, run_to_completion, terminate_as_exit\n"
             "with terminate_as_exit():\n"
             f"    run_to_completion([sys.executable, '-c', {HANGING_ENGINE!r}], peer_env(None, 'vllm'), "
             f"{str(log)!r}, 120, 'the engine')\n")
    proc = subprocess.Popen([sys.executable, "-P", "-c", bench])
    deadline = time.monotonic() + 60
    while "child" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.1)
    child = int(log.read_text().split("child")[1].split()[0])
    proc.terminate()
    assert proc.wait(60) == 128 + signal.SIGTERM
    assert not _running(child), "the engine's child outlived the terminated benchmark"


def test_stop_group_returns_once_the_whole_group_is_gone(tmp_path) -> None:
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import signal, time; "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)']); time.sleep(120)")
    proc = start([sys.executable, "-c", code], peer_env(None, "vllm"), tmp_path / "log")
    time.sleep(1.0)
    assert group_alive(proc.pid)
    stop_group(proc, grace_s=1.0)  # the child ignores SIGTERM: SIGKILL it is
    assert not group_alive(proc.pid)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an exited child the container's init has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_peer_pythonpath_is_prepended_for_the_peer_only(monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", "/tmp/pds")
    env = peer_env("/tmp/vsite", "vllm")
    assert env["PYTHONPATH"] == os.pathsep.join(["/tmp/vsite", "/tmp/pds"])
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_NO_USAGE_STATS"] == "1"
    assert os.environ["PYTHONPATH"] == "/tmp/pds"  # this process's own path is left alone
    assert peer_env(None, "pdserve")["PYTHONPATH"] == "/tmp/pds"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_missing_fails_fast_with_a_clear_error(tmp_path, tiny_model, capsys) -> None:
    with pytest.raises(PeerError, match=r"the peer .vllm. is not importable .* [(]pass --peer-pythonpath DIR"):
        check_importable("vllm", sys.executable, peer_env(str(tmp_path), "vllm"))
    start = time.monotonic()
    code = main(["bench", "throughput", "--model", tiny_model, *CPU, "--peer", "vllm", "--peer-pythonpath",
                 str(tmp_path), "--peer-log-dir", str(tmp_path / "logs")])
    assert code == 2 and "is not importable" in capsys.readouterr().err
    assert time.monotonic() - start < 30  # before pdserve's own run, not after it


def test_vllm_gets_pdserve_s_engine_settings() -> None:
    parser = build_parser()
    args = parser.parse_args(["bench", "throughput", "--model", "llama-3.1-8b", "--load-format", "dummy",
                              "--max-num-seqs", "256", "--max-num-batched-tokens", "8192",
                              "--no-enable-prefix-caching", "--gpu-memory-utilization", "0.85",
                              "--kv-cache-dtype", "fp8_e4m3", "--num-blocks", "900"])
    kw = vllm_llm_kwargs(engine_kwargs(args), "/tmp/cfg", "bfloat16", 8192, {"enforce_eager": True})
    assert kw == dict(model="/tmp/cfg", load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
                      max_model_len=8192, max_num_seqs=256, max_num_batched_tokens=8192, gpu_memory_utilization=0.85,
                      enable_prefix_caching=False, enable_chunked_prefill=True, block_size=16, seed=0,
                      enforce_eager=True, tensor_parallel_size=1, pipeline_parallel_size=1,
                      num_gpu_blocks_override=900, kv_cache_dtype="fp8_e4m3")


def test_throughput_self_check_runs_one_identical_workload_on_both_sides(tmp_path, tiny_model) -> None:
    logs, out = tmp_path / "logs", tmp_path / "result.json"
    code = main(["bench", "throughput", "--model", tiny_model, *CPU, "--num-prompts", "5", "--input-len", "4:12",
                 "--output-len", "2:5", "--peer", "pdserve", "--peer-log-dir", str(logs), "--json-out", str(out)])
    assert code == 0
    expected = random_requests(5, "4:12", "2:5", 512, 0)  # the in-process benchmark's generator and seed
    workload = json.loads((logs / "workload.json").read_text())
    assert workload["requests"] == [[r.prompt_token_ids, r.output_len] for r in expected]
    digest = workload_digest([r.prompt_token_ids for r in expected], [r.output_len for r in expected])
    for name in ("pdserve", "self-check"):  # what each process says it was given
        assert json.loads((logs / f"{name}.result.json").read_text())["workload_digest"] == digest
    data = json.loads(out.read_text())
    assert [r["engine"] for r in data["results"]] == ["pdserve", "self-check"] and data["peer"] == "pdserve"
    for r in data["results"]:
        assert r["input_tokens"] == sum(len(x.prompt_token_ids) for x in expected)
        assert r["output_tokens"] == sum(x.output_len for x in expected)  # EOS ignored on both sides
    assert data["ratio_output_tokens_per_s"] == pytest.approx(
        data["results"][0]["output_tokens_per_s"] / data["results"][1]["output_tokens_per_s"])
    assert set(data["startup_s"]) == {"pdserve", "self-check"}


def test_latency_self_check_measures_every_case_on_both_sides(tmp_path, tiny_model, capsys) -> None:
    logs, out = tmp_path / "logs", tmp_path / "result.json"
    code = main(["bench", "latency", "--model", tiny_model, *CPU, "--input-len", "8,16", "--batch-size", "1,3",
                 "--output-len", "4", "--iters", "1", "--peer", "pdserve", "--peer-log-dir", str(logs),
                 "--json-out", str(out)])
    assert code == 0
    prompts = case_prompts([(1, 8), (3, 16)], 512)
    assert [c["prompts"] for c in json.loads((logs / "workload.json").read_text())["cases"]] == prompts
    data = json.loads(out.read_text())
    rows = data["results"]
    assert [(r["engine"], r["batch_size"], r["prompt_len"]) for r in rows] == [
        ("pdserve", 1, 8), ("pdserve", 3, 16), ("self-check", 1, 8), ("self-check", 3, 16)]
    assert all(r["prefill_s"] > 0 and r["total_s"] > 0 and r["prefill_mfu"] > 0 for r in rows)
    assert data["ratios"][1]["prefill"] == pytest.approx(rows[3]["prefill_s"] / rows[1]["prefill_s"])
    printed = capsys.readouterr().out
    assert "pdserve / self-check at batch 3, 16 tokens: prefill" in printed
