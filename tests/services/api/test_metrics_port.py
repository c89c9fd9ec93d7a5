"""``--metrics-port``: /metrics on a listener of its own (the port the operator's NetworkPolicies open to
Prometheus), for the pods' servers and the router."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import pytest

from api_servers import free_port
from pdserve.services.api.metrics import MetricsListener, ServingMetrics


def test_listener_serves_the_registry_and_stops() -> None:
    metrics = ServingMetrics("m")
    listener = MetricsListener("127.0.0.1", 0, metrics.registry)
    try:
        r = httpx.get(f"http://127.0.0.1:{listener.port}/metrics", timeout=5)
        assert r.status_code == 200
        assert 'pdserve:num_requests_running{model_name="m"}' in r.text
    finally:
        listener.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{listener.port}/metrics", timeout=2)


def test_router_serves_metrics_on_its_metrics_port() -> None:
    port, metrics_port = free_port(), free_port()
    cmd = [sys.executable, "-P", "-m", "pdserve.cli.main", "router", "--port", str(port), "--metrics-port",
           str(metrics_port), "--decode", "grpc://127.0.0.1:9", "--log-level", "warning"]
    log = tempfile.NamedTemporaryFile("w+", prefix="pdserve-router-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir())
    log.close()
    try:
        deadline, pages = time.monotonic() + 120, None
        while pages is None and time.monotonic() < deadline and proc.poll() is None:
            try:  # the API port comes up last
                pages = [httpx.get(f"http://127.0.0.1:{p}/metrics", timeout=2).text for p in (port, metrics_port)]
            except httpx.HTTPError:
                time.sleep(0.3)
        assert pages is not None, open(log.name).read()[-3000:]
        api_page, metrics_page = pages
        assert "pdserve:router_prompt_tokens" in metrics_page  # the router's own metrics, not only the serving ones
        assert "pdserve:num_requests_running" in metrics_page
        # the API port keeps its /metrics too (single-machine use; docs/kubernetes.md says so)
        assert "pdserve:router_prompt_tokens" in api_page
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.unlink(log.name)
    assert proc.returncode in (0, 130)  # 130: the router's exit code for SIGINT
