"""``pdserve sim-engine`` as a user runs it: prefill and decode processes behind the real HTTP API (official openai
client), KV handles between them, the real ``/metrics``, injected KV faults ending in a clear error."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.helpers.server_process import log_tail, scrape_metrics, wait_healthy

MODEL = "smollm2-135m-instruct"
PROMPT = "The simulator answers with the time a cost model says, and loads KV handles. " * 3


def _free_port() -> int:
    from pdserve.cli.local_servers import free_port

    return free_port()


@pytest.fixture(scope="module")
def pods(tmp_path_factory):
    """A prefill pod, a decode pod with 0.5 s of added KV latency, and a decode pod whose every load fails under
    the ``fail`` policy."""
    logs = tmp_path_factory.mktemp("sim")
    specs = {"prefill": ["--role", "prefill"],
             "decode": ["--role", "decode", "--kv-fault-latency", "0.5"],
             "broken": ["--role", "decode", "--kv-fault-fail-rate", "1", "--kv-load-failure-policy", "fail"]}
    procs, urls, grpc = {}, {}, {}
    try:
        for name, extra in specs.items():
            port, grpc[name] = _free_port(), _free_port()
            log = open(logs / f"{name}.log", "w")
            argv = [sys.executable, "-P", "-m", "pdserve.cli.main", "sim-engine", "--model", MODEL,
                    "--port", str(port), "--grpc-port", str(grpc[name]), *extra]
            procs[name] = (subprocess.Popen(argv,
                                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ)),
                           str(logs / f"{name}.log"))
            urls[name] = f"http://127.0.0.1:{port}"
        for name, (proc, log_path) in procs.items():
            wait_healthy(proc, urls[name], log_path, name, timeout_s=180)
        # The real router in front of the prefill pod and the (slow-connector) decode pod, over gRPC.
        port = _free_port()
        log = open(logs / "router.log", "w")
        procs["router"] = (subprocess.Popen(
            [sys.executable, "-P", "-m", "pdserve.cli.main", "router", "--model", MODEL, "--port", str(port),
             "--prefill", f"127.0.0.1:{grpc['prefill']}", "--decode", f"127.0.0.1:{grpc['decode']}"],
            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ)), str(logs / "router.log"))
        urls["router"] = f"http://127.0.0.1:{port}"
        wait_healthy(procs["router"][0], urls["router"], procs["router"][1], "router", timeout_s=120)
        yield urls
    finally:
        for proc, _ in procs.values():
            proc.terminate()
        for proc, log_path in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                print(log_tail(log_path))


def _client(url: str) -> openai.OpenAI:
    """A client of one pod: pods take calls signed with the cluster secret (what the router sends)."""
    from pdserve.engine.security import load_cluster_secret
    from pdserve.services.api.auth import ENGINE_SCOPE

    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                         default_headers=load_cluster_secret().call_headers(ENGINE_SCOPE))


def test_prefill_handle_is_loaded_by_the_decode_pod_after_the_injected_latency(pods):
    first = _client(pods["prefill"]).completions.create(model=MODEL, prompt=PROMPT, max_tokens=1)
    handle = first.model_extra["kv_transfer_params"]
    assert handle["connector"] == "sim" and handle["num_tokens"] == first.usage.prompt_tokens
    start = time.monotonic()
    out = _client(pods["decode"]).completions.create(model=MODEL, prompt=PROMPT, max_tokens=8,
                                                     extra_body={"kv_transfer_params": handle})
    elapsed = time.monotonic() - start
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 8
    assert elapsed >= 0.5  # the injected latency (only a load pays it), then 8 modelled steps of ~6 ms
    metrics = scrape_metrics(pods["decode"])
    assert metrics[f'pdserve:generation_tokens_total{{model_name="{MODEL}"}}'] == 8
    assert metrics[f'pdserve:time_to_first_token_seconds_count{{model_name="{MODEL}"}}'] == 1


def test_the_autoscalers_metrics_parser_reads_a_pods_real_metrics(pods):
    """What operator/autoscaling.py's PodMetricsSource reads, from a real pod's /metrics (after the test above)."""
    from pdserve.operator.autoscaling import histogram_quantile, parse_metrics

    m = parse_metrics(httpx.get(f"{pods['decode']}/metrics", timeout=10).text)
    assert m["pdserve:generation_tokens_total"] == 8 and m["pdserve:num_requests_running"] == 0
    assert 0 <= m["pdserve:kv_cache_usage_perc"] <= 1
    ttft, itl = m["pdserve:time_to_first_token_seconds"], m["pdserve:inter_token_latency_seconds"]
    assert ttft["count"] == 1 and itl["count"] == 7
    assert histogram_quantile(None, ttft, 0.9) >= 0.5  # the load paid 0.5 s of injected latency
    assert histogram_quantile(ttft, ttft, 0.9) is None  # nothing new between two equal scrapes


def test_the_real_router_runs_prefill_then_decode_on_simulated_pods(pods):
    before = {r: scrape_metrics(pods[r]) for r in ("prefill", "decode")}
    prompt = "word " * 700  # long enough for the router to prefill remotely
    start = time.monotonic()
    out = _client(pods["router"]).completions.create(model=MODEL, prompt=prompt, max_tokens=6)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 6
    assert time.monotonic() - start >= 0.5  # the decode pod's injected KV latency
    key = f'pdserve:generation_tokens_total{{model_name="{MODEL}"}}'
    after = {r: scrape_metrics(pods[r]) for r in ("prefill", "decode")}
    assert after["prefill"][key] - before["prefill"][key] == 1  # the first token
    assert after["decode"][key] - before["decode"][key] == 5  # the rest, after loading the prompt's KV


def test_the_operators_pod_metrics_source_observes_real_pods(pods):
    """PodMetricsSource.observe over two scrapes of the simulated pods' real /metrics, one request between."""
    from pdserve.operator.autoscaler import AutoscalingPolicy
    from pdserve.operator.autoscaling import PodMetricsSource

    source = PodMetricsSource(targets=lambda api, ns, name, role: {f"{role}-0": f"{pods[role]}/metrics"})
    policy = AutoscalingPolicy(ttft_target_s=1.0, itl_target_s=0.05)
    assert source.observe(None, "default", "chat", policy) is None  # the first scrape is the baseline
    first = _client(pods["prefill"]).completions.create(model=MODEL, prompt=PROMPT, max_tokens=1)
    handle = first.model_extra["kv_transfer_params"]
    _client(pods["decode"]).completions.create(model=MODEL, prompt=PROMPT, max_tokens=8,
                                               extra_body={"kv_transfer_params": handle})
    obs = source.observe(None, "default", "chat", policy)
    assert (obs.prefill_pods, obs.decode_pods) == (1, 1)
    assert obs.arrived_prompt_tokens == first.usage.prompt_tokens
    assert obs.prefill_busy_s > 0 and obs.ttft_p is not None and obs.ttft_p < 0.5  # prefill: no KV load
    (batch, itl, usage), = obs.itl_samples
    assert batch == 1 and 0 < itl < 0.1 and 0 <= usage <= 1  # one sequence a step; 7 gaps of ~6 ms
    assert obs.decode_sequences == 0 and 0 <= obs.kv_usage <= 1
    # what entered decode (its max_tokens, counted at its first token) and what finished there: 8 of 8 asked
    assert (obs.arrived_output_tokens, obs.finished_output_tokens, obs.finished_max_tokens) == (8, 8, 8)
    assert obs.prefill_steps >= 1 and obs.mean_output_tokens == 8 and obs.kv_capacity_tokens > 0
    # a scale-up check differences from the decision's scrape: nothing entered since
    check = source.observe(None, "default", "chat", policy, check=True)
    assert check.arrived_output_tokens == 0 and check.arrived_prompt_tokens == 0 and check.window_s < obs.window_s


def test_a_failed_load_under_the_fail_policy_is_a_clear_409(pods):
    handle = _client(pods["prefill"]).completions.create(model=MODEL, prompt=PROMPT,
                                                         max_tokens=1).model_extra["kv_transfer_params"]
    from pdserve.engine.security import load_cluster_secret
    from pdserve.services.api.auth import ENGINE_SCOPE

    r = httpx.post(f"{pods['broken']}/v1/completions", timeout=30,
                   headers=load_cluster_secret().call_headers(ENGINE_SCOPE),
                   json={"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "kv_transfer_params": handle})
    assert r.status_code == 409, r.text
    assert "KV transfer failed (transfer_failed)" in r.json()["error"]["message"]
    assert httpx.get(f"{pods['broken']}/health").status_code == 200  # the pod keeps serving


@pytest.mark.parametrize("flags", [["--kv-fault-fail-rate", "0.1"], ["--role", "prefill", "--kv-fault-latency", "1"],
                                   ["--role", "prefill", "--kv-load-failure-policy", "fail"]])
def test_kv_fault_flags_are_refused_where_no_load_happens(flags):
    r = subprocess.run([sys.executable, "-P", "-m", "pdserve.cli.main", "sim-engine", *flags],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "only a decode pod does" in r.stderr
