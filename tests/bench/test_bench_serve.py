"""``pdserve bench serve``: statistics, workloads, arrivals, the SLO sweep, and a real run against a server."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os

import pytest

from pdserve.bench import serve
from pdserve.bench.client import RequestResult
from pdserve.bench.datasets import random_dataset, shared_prefix_dataset, sharegpt_dataset
from pdserve.bench.metrics import parse_slo, percentile, summarize
from pdserve.bench.runner import arrival_gaps

pytestmark = pytest.mark.timeout(300)


def result(ttft: float, latency: float, tokens: int, itl: list[float] | None = None, ok: bool = True):
    return RequestResult(success=ok, ttft=ttft, latency=latency, output_tokens=tokens, prompt_tokens=10,
                         itl=itl if itl is not None else [], error="" if ok else "boom")


def test_parse_slo():
    slo = parse_slo("ttft_p99=0.5")
    assert (slo.metric, slo.stat, slo.bound_s, slo.key) == ("ttft", "p99", 0.5, "ttft_p99")
    assert parse_slo("e2el_mean=2").stat == "mean"
    for bad in ("ttft=1", "foo_p99=1", "ttft_p99", "ttft_p99=-1", "ttft_p99=abc"):
        with pytest.raises(ValueError, match="bad SLO"):
            parse_slo(bad)


def test_percentile_matches_linear_interpolation():
    xs = [1.0, 2.0, 3.0, 4.0]
    assert percentile(xs, 50) == 2.5 and percentile(xs, 100) == 4.0 and percentile(xs, 0) == 1.0
    assert math.isnan(percentile([], 50))


def test_summary_throughput_goodput_and_slos():
    results = [result(0.1, 1.1, 11, [0.1] * 10), result(0.3, 2.3, 11, [0.2] * 10), result(0, 0, 0, ok=False)]
    s = summarize(results, duration_s=2.0, slos=[parse_slo("ttft_p50=0.25"), parse_slo("tpot_p99=0.15")])
    assert s["completed"] == 2 and s["failed"] == 1 and s["errors"] == ["boom"]
    assert s["request_throughput"] == 1.0 and s["output_throughput"] == 11.0
    assert s["mean_ttft_ms"] == pytest.approx(200) and s["p50_tpot_ms"] == pytest.approx(150)
    assert s["mean_itl_ms"] == pytest.approx(150)
    assert s["goodput"] == 0.5  # only the first request meets both bounds on its own
    assert s["meets_slos"] is False  # a request failed (and tpot_p99 is 0.199)


def test_arrivals():
    assert arrival_gaps(3, math.inf, 1.0, 0) == [0.0, 0.0, 0.0]
    for burstiness in (0.5, 1.0, 4.0):
        gaps = arrival_gaps(4000, 10.0, burstiness, seed=1)
        assert sum(gaps) / len(gaps) == pytest.approx(0.1, rel=0.1)
    smooth, bursty = arrival_gaps(4000, 10.0, 8.0, 1), arrival_gaps(4000, 10.0, 0.25, 1)
    assert max(bursty) > max(smooth)


def test_datasets(tmp_path):
    reqs = random_dataset(50, 100, 20, range_ratio=0.5, seed=3)
    assert len(reqs) == 50 and all(50 <= len(r.prompt.split()) <= 150 and 10 <= r.expected_output_len <= 30
                                   for r in reqs)
    assert [r.prompt for r in reqs] == [r.prompt for r in random_dataset(50, 100, 20, 0.5, seed=3)]
    shared = shared_prefix_dataset(40, num_tenants=4, system_len=200, question_len=8, output_len=5)
    systems = {r.tenant: r.system for r in shared}
    assert len(systems) == 4 and all(len(s.split()) > 200 for s in systems.values())
    assert shared[0].completion_prompt().startswith(shared[0].system)
    assert shared[0].chat_messages()[0] == {"role": "system", "content": shared[0].system}
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "Why is the sky blue?"},
                           {"from": "gpt", "value": "Because of Rayleigh scattering " * 5}]},
        {"conversations": [{"from": "human", "value": "only one turn"}]},
        "not a record",
    ]))
    sg = sharegpt_dataset(str(path), 3)
    assert [r.prompt for r in sg] == ["Why is the sky blue?"] * 3 and sg[0].expected_output_len == 26


def test_sweep_brackets_then_bisects():
    args = argparse.Namespace(request_rate=[2.0], sweep_max_rate=100.0, sweep_iterations=3)
    bench = serve.Bench(args, None, [], [])
    tried = []

    async def fake_trial(rate: float) -> dict:
        tried.append(rate)
        return {"meets_slos": rate <= 11.0}

    bench.trial = fake_trial
    best = asyncio.run(bench.sweep())
    assert tried == [2.0, 4.0, 8.0, 16.0, 12.0, 10.0, 11.0]
    assert best == 11.0


@pytest.fixture(scope="module")
def mock_server():
    from pdserve.engine.async_engine.client import AsyncLLM
    from tests.helpers.mock_core import make_mock_core
    from pdserve.engine.config import CacheConfig, EngineConfig, ModelConfig
    from pdserve.services.api.settings import ServerSettings
    from tests.helpers.server_thread import ServerThread

    class Words:  # a whitespace tokenizer: enough for text prompts on the mock core
        eos_token_id = None

        def __call__(self, text, add_special_tokens=True):
            return argparse.Namespace(input_ids=[1 + (hash(w) % 900) for w in text.split()])

        def decode(self, ids, skip_special_tokens=True):
            return "".join(f" w{i}" for i in ids)

    config = EngineConfig(model=ModelConfig(model="mock", max_model_len=512, served_model_name="mock"),
                          cache=CacheConfig(num_blocks=256))
    with ServerThread(lambda: AsyncLLM(config, core_factory=make_mock_core, tokenizer=Words()),
                      ServerSettings(served_model_names=("mock",))) as srv:
        yield srv


def test_bench_serve_against_a_server(mock_server, tmp_path):
    out = tmp_path / "results"
    code = serve.main(["--base-url", mock_server.url, "--num-prompts", "12", "--random-input-len", "20",
                       "--random-output-len", "5", "--ignore-eos", "--request-rate", "20,40", "--slo", "ttft_p99=5",
                       "--slo", "tpot_p99=1", "--result-dir", str(out), "--disable-tqdm", "--save-detailed"])
    assert code == 0
    assert sorted(os.listdir(out)) == ["latency_cdf.png", "latency_vs_rate.png", "serve.json"]
    data = json.loads((out / "serve.json").read_text())
    assert data["model"] == "mock" and [r["request_rate"] for r in data["runs"]] == [20.0, 40.0]
    s = data["runs"][0]["summary"]
    assert s["completed"] == 12 and s["failed"] == 0 and s["total_output_tokens"] == 60 and s["meets_slos"]
    assert s["goodput"] > 0 and len(data["runs"][0]["requests"]) == 12
    # The server's timelines, phase by phase (a single server: its own queue, compute and stream).
    assert list(s["phases"]) == ["api_receive", "queue", "compute", "respond", "stream"]
    assert s["phases"]["compute"]["requests"] == 12 and s["phases"]["compute"]["ttft"]
    assert not s["phases"]["stream"]["ttft"] and s["phases"]["stream"]["mean_ms"] > 0
    assert (out / "latency_cdf.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_shared_prefix_chat_with_concurrency(mock_server, tmp_path):
    code = serve.main(["--base-url", mock_server.url, "--dataset", "shared-prefix", "--num-tenants", "2",
                       "--system-prompt-len", "40", "--question-len", "4", "--shared-output-len", "3",
                       "--num-prompts", "8", "--max-concurrency", "3", "--endpoint", "chat", "--ignore-eos",
                       "--result-dir", str(tmp_path), "--disable-tqdm"])
    # The mock tokenizer has no chat template: every request fails with a clear error, and the run says so.
    data = json.loads((tmp_path / "serve.json").read_text())
    assert code == 1 and data["runs"][0]["summary"]["failed"] == 8
    assert "chat template" in data["runs"][0]["summary"]["errors"][0]
    code = serve.main(["--base-url", mock_server.url, "--dataset", "shared-prefix", "--num-tenants", "2",
                       "--system-prompt-len", "40", "--question-len", "4", "--shared-output-len", "3",
                       "--num-prompts", "8", "--max-concurrency", "3", "--ignore-eos",
                       "--result-dir", str(tmp_path), "--disable-tqdm"])
    data = json.loads((tmp_path / "serve.json").read_text())
    assert code == 0 and data["runs"][0]["summary"]["completed"] == 8


def test_bench_reports_an_unreachable_server(tmp_path, capsys):
    code = serve.main(["--base-url", "http://127.0.0.1:9", "--num-prompts", "2", "--result-dir", str(tmp_path)])
    assert code == 2 and "error" in capsys.readouterr().err
