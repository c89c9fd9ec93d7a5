"""``pdserve bench serve --peer``: the servers' model directory (a preset with the bundled tokenizer padded to its
vocabulary), the servers' command lines, the mixed workload, the comparison report, and — on a CPU, where vLLM
cannot run — ``--peer pdserve``, the documented self-check that starts ``pdserve serve`` on both sides of the very
same path (free port, own process group, /health, the same trace, both killed afterwards)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pdserve.bench.datasets import mixed_dataset
from pdserve.bench.serve_peer import SERVE_DEFAULTS, compare, format_comparison, server_command
from pdserve.cli.main import main

pytestmark = pytest.mark.timeout(300)


def test_a_preset_is_served_with_the_bundled_tokenizer_padded_to_its_vocabulary(tmp_path) -> None:
    from transformers import AutoTokenizer

    from pdserve.bench.model_dir import serving_directory
    from pdserve.engine.model_loader.resolve import resolve_model

    directory = serving_directory("llama-3.1-8b", "dummy", tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["vocab_size"] == 128256 and config["hidden_size"] == 4096 and config["num_hidden_layers"] == 32
    padded = AutoTokenizer.from_pretrained(directory)
    bundled = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct").tokenizer_path)
    assert len(padded) == 128256 and len(bundled) == 49152
    # Every id the random model can sample decodes to a word of its own; the bundled ids decode as before.
    assert padded.decode([100000, 128255]) == " ~100000 ~128255"
    assert padded.decode([49151, 1000]) == bundled.decode([49151, 1000])
    text = "The bridge over the river ~12 was built in 1900, 4.5 km north of the village."
    assert padded(text).input_ids == bundled(text).input_ids
    assert config["eos_token_id"] == bundled.eos_token_id  # the tokenizer's own EOS


@pytest.mark.parametrize(("decoder", "pre_tokenizer", "pads"), [
    ({"type": "ByteLevel"}, None, True),
    # transformers 5.17's conversion of the bundled GGUF says it inside Sequences
    ({"type": "Sequence", "decoders": [{"type": "ByteLevel"}]}, None, True),
    (None, {"type": "Sequence", "pretokenizers": [{"type": "Split"}, {"type": "ByteLevel"}]}, True),
    ({"type": "Metaspace"}, {"type": "Metaspace"}, False)])
def test_only_byte_level_bpe_vocabularies_are_padded(tmp_path, decoder, pre_tokenizer, pads: bool) -> None:
    from pdserve.bench.model_dir import pad_tokenizer_vocab

    data = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": []}, "decoder": decoder,
            "pre_tokenizer": pre_tokenizer, "added_tokens": [{"id": 2, "content": "<s>"}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    if not pads:
        with pytest.raises(ValueError, match="only a byte-level BPE tokenizer.*Metaspace"):
            pad_tokenizer_vocab(tmp_path, 6)
        return
    assert pad_tokenizer_vocab(tmp_path, 6) == 3
    vocab = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"]
    assert vocab == {"a": 0, "b": 1, "\u0120~3": 3, "\u0120~4": 4, "\u0120~5": 5}


def test_mixed_workload() -> None:
    reqs = mixed_dataset(400, 0.25, 500, 8, 60, 40, range_ratio=0.5, seed=1)
    long = [r for r in reqs if len(r.prompt.split()) >= 250]
    assert 70 <= len(long) <= 130  # about a quarter
    assert all(4 <= r.expected_output_len <= 12 for r in long)
    assert all(30 <= len(r.prompt.split()) <= 90 and 20 <= r.expected_output_len <= 60
               for r in reqs if r not in long)
    assert [r.prompt for r in reqs] == [r.prompt for r in mixed_dataset(400, 0.25, 500, 8, 60, 40, 0.5, seed=1)]
    with pytest.raises(ValueError, match="share of long requests"):
        mixed_dataset(1, 1.5, 10, 1, 10, 1)


def test_both_servers_get_the_same_settings() -> None:
    args = argparse.Namespace(**SERVE_DEFAULTS, serve_max_model_len=4096, serve_no_prefix_caching=True)
    vllm = server_command("vllm", "python3.12", "/m", args, 8001, "bench", "--enforce-eager")
    ours = server_command("pdserve", "python3", "/m", args, 8002, "bench", "")
    assert vllm[:6] == ["python3.12", "-P", "-m", "vllm.entrypoints.cli.main", "serve", "/m"]
    assert ours[:6] == ["python3", "-P", "-m", "pdserve.cli.main", "serve", "--model"]
    shared = ["--served-model-name", "bench", "--load-format", "dummy", "--dtype", "auto", "--max-num-seqs", "256",
              "--max-num-batched-tokens", "8192", "--gpu-memory-utilization", "0.9", "--seed", "0",
              "--max-model-len", "4096", "--no-enable-prefix-caching"]
    for cmd in (vllm, ours):
        assert " ".join(shared) in " ".join(cmd)
    assert vllm[-2:] == ["--disable-uvicorn-access-log", "--enforce-eager"]
    assert ours[-2:] == ["--max-waiting", "0"]


def _summary(goodput: float, throughput: float, ttft: float) -> dict:
    return {"completed": 10, "failed": 0, "request_throughput": goodput, "output_throughput": throughput,
            "goodput": goodput, "meets_slos": True, "p50_ttft_ms": ttft, "p99_ttft_ms": 2 * ttft,
            "p50_itl_ms": 5.0, "p99_itl_ms": 9.0, "p50_tpot_ms": 5.0, "p99_tpot_ms": 6.0}


def test_comparison_report() -> None:
    results = {"pdserve": {"runs": [{"request_rate": 2.0, "summary": _summary(2.0, 300.0, 40.0)},
                                    {"request_rate": 4.0, "summary": _summary(3.0, 450.0, 80.0)}],
                           "max_rate_meeting_slos": None},
               "vllm": {"runs": [{"request_rate": 4.0, "summary": _summary(2.5, 400.0, 90.0)}],
                        "max_rate_meeting_slos": None}}
    comparison = compare(results, "vllm")
    assert [row["request_rate"] for row in comparison["rows"]] == [4.0]  # only rates both servers ran
    row = comparison["rows"][0]
    assert row["goodput_ratio"] == pytest.approx(1.2) and row["output_throughput_ratio"] == pytest.approx(1.125)
    assert row["vllm"]["p50_ttft_ms"] == 90.0 and row["pdserve"]["p99_ttft_ms"] == 160.0
    text = format_comparison(comparison)
    assert "pdserve / vllm: output throughput 1.12x, goodput 1.20x" in text


@pytest.fixture(scope="module")
def tiny_model_with_tokenizer(tmp_path_factory) -> str:
    from pathlib import Path

    from pdserve.engine.model_loader.resolve import resolve_model
    from tests.helpers.tiny_models import make_tiny_model

    directory = make_tiny_model("llama", tmp_path_factory.mktemp("tiny-tok"), vocab_size=49152,
                                max_position_embeddings=512)
    tokenizer = Path(resolve_model("smollm2-135m-instruct").tokenizer_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, directory)
    return directory


def _servers_left(model_dir: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "stat=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines()
            if "pdserve.cli.main serve" in line and model_dir in line and not line.startswith("Z")]


def test_self_check_starts_both_servers_and_drives_them_with_one_trace(tmp_path, tiny_model_with_tokenizer,
                                                                       capsys) -> None:
    cpu = "--device cpu --attention-backend torch"
    code = main(["bench", "serve", "--peer", "pdserve", "--serve-model", tiny_model_with_tokenizer,
                 "--serve-load-format", "auto", "--serve-max-model-len", "256", "--pdserve-server-args", cpu,
                 "--peer-server-args", cpu, "--dataset", "mixed", "--mixed-long-input-len", "120",
                 "--mixed-long-output-len", "2", "--random-input-len", "12", "--random-output-len", "4",
                 "--num-prompts", "6", "--request-rate", "50", "--slo", "ttft_p99=30", "--disable-tqdm",
                 "--result-dir", str(tmp_path / "res"), "--peer-log-dir", str(tmp_path / "logs")])
    assert code == 0
    comparison = json.loads((tmp_path / "res" / "comparison.json").read_text())
    row = comparison["rows"][0]
    for name in ("pdserve", "self-check"):
        assert row[name]["completed"] == 6 and row[name]["failed"] == 0 and row[name]["goodput"] > 0
        data = json.loads((tmp_path / "res" / name / "serve.json").read_text())
        summary = data["runs"][0]["summary"]
        # The same trace: identical prompts (token counts from the server's usage) and exact output lengths.
        assert data["config"]["ignore_eos"] is True
        if name == "pdserve":
            ours = summary
        else:
            theirs = summary
    assert (ours["total_input_tokens"], ours["total_output_tokens"]) == (theirs["total_input_tokens"],
                                                                         theirs["total_output_tokens"])
    assert "pdserve / self-check: output throughput" in capsys.readouterr().out
    assert not _servers_left(tiny_model_with_tokenizer), "a server outlived the benchmark"


def test_a_server_that_cannot_start_gives_its_log(tmp_path, tiny_model_with_tokenizer, capsys) -> None:
    code = main(["bench", "serve", "--peer", "pdserve", "--serve-model", tiny_model_with_tokenizer,
                 "--serve-load-format", "auto", "--peer-server-args=--no-such-flag", "--num-prompts", "1",
                 "--result-dir", str(tmp_path / "res"), "--peer-log-dir", str(tmp_path / "logs")])
    err = capsys.readouterr().err
    assert code == 2 and "self-check exited with code 2 before it was healthy" in err
    assert "unrecognized arguments: --no-such-flag" in err


def test_a_failing_pdserve_up_leaves_the_two_servers_comparison(tmp_path, tiny_model_with_tokenizer,
                                                                  capsys) -> None:
    cpu = "--device cpu --attention-backend torch"
    code = main(["bench", "serve", "--peer", "pdserve", "--pdserve-up", "--pdserve-up-args=--no-such-flag",
                 "--serve-model", tiny_model_with_tokenizer, "--serve-load-format", "auto",
                 "--serve-max-model-len", "256", "--pdserve-server-args", cpu, "--peer-server-args", cpu,
                 "--dataset", "random", "--random-input-len", "8", "--random-output-len", "2", "--num-prompts", "2",
                 "--request-rate", "50", "--disable-tqdm", "--result-dir", str(tmp_path / "res"),
                 "--peer-log-dir", str(tmp_path / "logs")])
    err = capsys.readouterr().err
    assert code == 2 and "pdserve-up exited with code 2 before it was healthy" in err
    assert "the comparison below leaves pdserve-up out" in err
    row = json.loads((tmp_path / "res" / "comparison.json").read_text())["rows"][0]
    assert row["pdserve"]["completed"] == 2 and row["self-check"]["completed"] == 2 and "pdserve-up" not in row


def _vllm_stream(chat: bool) -> bytes:
    """A stream in vLLM 0.20's format (serving_completion.py / serving_chat.py: every chunk carries
    ``"usage": null``, then one ``choices: []`` chunk with the usage, then ``[DONE]``). Only its shape matters here:
    this checks that the benchmark's client reads vLLM's responses, it measures nothing."""
    def chunk(text: str | None, finish: str | None = None, role: bool = False) -> dict:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None,
                      "token_ids": None, "prompt_logprobs": None, "prompt_token_ids": None}
            kind = "text_completion"
        return {"id": "cmpl-1", "object": kind, "created": 1, "model": "bench", "choices": [choice], "usage": None}

    events = ([chunk(None, role=True)] if chat else []) + [chunk(" ~100"), chunk(" ~7"), chunk(" ~100", "length")]
    events.append({"id": "cmpl-1", "object": "chat.completion.chunk" if chat else "text_completion", "created": 1,
                   "model": "bench", "choices": [],
                   "usage": {"prompt_tokens": 12, "total_tokens": 15, "completion_tokens": 3}})
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"


@pytest.mark.parametrize("chat", [False, True])
def test_the_client_reads_vllm_s_streamed_responses(chat: bool) -> None:
    import asyncio

    import httpx

    from pdserve.bench.client import Endpoint, send_request
    from pdserve.bench.datasets import BenchRequest

    sent = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return httpx.Response(200, content=_vllm_stream(chat), headers={"content-type": "text/event-stream"})

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            endpoint = Endpoint("http://vllm", "bench", chat=chat, ignore_eos=True)
            return await send_request(client, endpoint, BenchRequest("the river", 3), 0.0)

    result = asyncio.run(go())
    assert result.success and result.error == ""
    assert (result.prompt_tokens, result.output_tokens, len(result.itl)) == (12, 3, 2)
    assert sent[0]["ignore_eos"] is True and sent[0]["stream_options"] == {"include_usage": True}


def _silent_server(port: int) -> list[str]:
    """A process that accepts connections on ``port`` and never answers: a server hung mid-run."""
    import sys

    code = (f"import socket, time; s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen(64); "
            "print('listening', flush=True); time.sleep(120)")
    return [sys.executable, "-c", code]


def test_a_server_that_never_gets_healthy_is_killed_at_the_time_limit(tmp_path) -> None:
    from pdserve.bench.peer_process import PeerError, ServerProcess, free_port, group_alive, peer_env

    port = free_port()
    with ServerProcess("vllm", _silent_server(port), peer_env(None, "vllm"), tmp_path / "log",
                       f"http://127.0.0.1:{port}") as srv:
        with pytest.raises(PeerError, match=r"vllm was not healthy within 2 s \(killed\); the end of vllm's log"):
            srv.wait_healthy(2)
    assert srv.proc is not None and not group_alive(srv.proc.pid)


def test_a_server_that_hangs_mid_run_ends_the_benchmark_at_the_time_limit(tmp_path) -> None:
    import time

    from pdserve.bench.peer_process import PeerError, ServerProcess, free_port, peer_env
    from pdserve.bench.serve_peer import _bench_one
    from pdserve.cli.main import build_parser

    args = build_parser().parse_args(["bench", "serve", "--num-prompts", "2", "--warmup", "0", "--disable-tqdm",
                                      "--result-dir", str(tmp_path / "res"), "--peer-timeout", "2"])
    port = free_port()
    with ServerProcess("vllm", _silent_server(port), peer_env(None, "vllm"), tmp_path / "log",
                       f"http://127.0.0.1:{port}") as srv:
        while "listening" not in (tmp_path / "log").read_text():
            time.sleep(0.05)
        with pytest.raises(PeerError, match=r"the benchmark of vllm did not finish within 2 s \(--peer-timeout\)"):
            _bench_one(args, srv, "vllm", "bench")


def test_pdserve_up_is_a_third_engine_driven_with_the_same_trace(tmp_path, tiny_model_with_tokenizer,
                                                                 capsys) -> None:
    cpu = "--device cpu --attention-backend torch"
    # Random weights from a directory that has none, as for a dummy preset on the GPU: every part, the router
    # included, must make do with the config and the tokenizer.
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    for f in Path(tiny_model_with_tokenizer).iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, weightless / f.name)
    code = main(["bench", "serve", "--peer", "pdserve", "--pdserve-up", "--serve-model", str(weightless),
                 "--serve-load-format", "dummy", "--serve-max-model-len", "256", "--pdserve-server-args", cpu,
                 # As on a GPU (where auto means it): the decode engine starts once the prefill engine is healthy.
                 "--pdserve-up-args=--start sequential",
                 "--peer-server-args", cpu, "--dataset", "random", "--random-input-len", "12",
                 "--random-output-len", "4", "--num-prompts", "4", "--request-rate", "50", "--slo", "ttft_p99=30",
                 "--disable-tqdm", "--result-dir", str(tmp_path / "res"), "--peer-log-dir", str(tmp_path / "logs")])
    out = capsys.readouterr().out
    assert code == 0
    row = json.loads((tmp_path / "res" / "comparison.json").read_text())["rows"][0]
    for name in ("pdserve", "self-check", "pdserve-up"):
        assert row[name]["completed"] == 4 and row[name]["failed"] == 0 and row[name]["goodput"] > 0
    up = json.loads((tmp_path / "res" / "pdserve-up" / "serve.json").read_text())["runs"][0]["summary"]
    serve = json.loads((tmp_path / "res" / "pdserve" / "serve.json").read_text())["runs"][0]["summary"]
    assert (up["total_input_tokens"], up["total_output_tokens"]) == (serve["total_input_tokens"],
                                                                     serve["total_output_tokens"])
    for key, other in (("up", "pdserve"), ("up_peer", "self-check")):
        assert row[f"{key}_goodput_ratio"] == pytest.approx(row["pdserve-up"]["goodput"] / row[other]["goodput"])
        assert row[f"{key}_output_throughput_ratio"] == pytest.approx(
            row["pdserve-up"]["output_throughput"] / row[other]["output_throughput"])
    assert row["up_goodput_target_met"] == (row["up_goodput_ratio"] >= 0.85)
    assert "pdserve-up / pdserve: output throughput" in out and "pdserve-up / self-check:" in out
    # `pdserve up` was started with the engine settings both servers got, split into router and engines.
    log = (tmp_path / "logs" / "pdserve-up.server.log").read_text()
    assert "[prefill-0]" in log and "[decode-0]" in log and "[router]" in log
    assert "starting 2 part(s) one after the other" in log
    assert not _servers_left(str(weightless)), "a server outlived the benchmark"
    assert not _up_parts_left(str(weightless)), "a part of pdserve up outlived the benchmark"


def _up_parts_left(model_dir: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "stat=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if model_dir in line and not line.startswith("Z")
            and any(f"pdserve.cli.main {role}" in line for role in ("up", "prefill", "decode", "router"))]


def test_pdserve_up_gets_the_shared_engine_settings_and_splits_the_gpu_itself() -> None:
    import shlex

    from pdserve.bench.serve_peer import common_flags
    from pdserve.bench.serve_up import up_command

    args = argparse.Namespace(**SERVE_DEFAULTS, serve_max_model_len=4096, serve_no_prefix_caching=False,
                              pdserve_server_args="--enforce-eager", pdserve_up_args="--start sequential",
                              up_kv_connector=None)
    cmd = up_command("py", "/m", common_flags(args, 9000, "bench"), args, 9000, explicit_memory_share=False)
    assert cmd[:11] == ["py", "-P", "-m", "pdserve.cli.main", "up", "--model", "/m", "--prefill", "1", "--decode", "1"]
    assert cmd[cmd.index("--port") + 1] == "9000" and cmd[cmd.index("--kv-connector") + 1] == "grpc"
    assert cmd[-2:] == ["--start", "sequential"]
    engine = shlex.split(cmd[cmd.index("--engine-args") + 1])
    assert engine == ["--served-model-name", "bench", "--load-format", "dummy", "--dtype", "auto", "--max-num-seqs",
                      "256", "--max-num-batched-tokens", "8192", "--seed", "0", "--max-model-len", "4096",
                      "--max-waiting", "0", "--max-concurrent-rpcs", "0", "--enforce-eager"]
    chosen = up_command("py", "/m", common_flags(args, 9000, "bench"), args, 9000, explicit_memory_share=True)
    assert "--gpu-memory-utilization 0.9" in chosen[chosen.index("--engine-args") + 1]
    args.pdserve_up_args = "--engine-args '--device cpu'"
    with pytest.raises(ValueError, match="must not set --engine-args"):
        up_command("py", "/m", [], args, 9000, explicit_memory_share=False)


def test_pdserve_up_needs_a_peer(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit, match="--pdserve-up: only with --peer vllm or pdserve"):
        main(["bench", "serve", "--pdserve-up", "--num-prompts", "1", "--result-dir", str(tmp_path)])


def test_descendants_are_found_across_sessions() -> None:
    import sys
    import time

    from pdserve.bench.serve_up import _alive, descendants

    # A parent whose child runs in a session of its own, as `pdserve up`'s parts do.
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
            "start_new_session=True); print('ok', flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    children: list[int] = []
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "ok"
        children = descendants(parent.pid)
        assert len(children) == 1 and _alive(children[0])
    finally:
        parent.kill()
        parent.wait()
        for pid in children:
            os.kill(pid, 9)
    for _ in range(100):
        if not _alive(children[0]):
            break
        time.sleep(0.05)
    assert not _alive(children[0])
