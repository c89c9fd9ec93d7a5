"""Acceptance (issue 19): one request's trace through the router, a prefill pod and a decode pod -- three
processes, each exporting over OTLP/HTTP to a real receiver in this test -- has its parent/child links intact:
client -> router server span -> router client span per pod call -> the pod's server span -> the pod's phases.

The pods are simulated engines (``pdserve sim-engine``: the real servers, scheduler and gRPC calls, no model), so
the three processes start in seconds; the decode pod's KV load takes an injected 0.3 s, which the trace shows.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.helpers.server_process import log_tail, wait_healthy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
pytest.importorskip("opentelemetry.sdk")
trace_service_pb2 = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")

MODEL = "smollm2-135m-instruct"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


def _free_port() -> int:
    from pdserve.cli.local_servers import free_port

    return free_port()


class OtlpReceiver:
    """A minimal OTLP/HTTP traces endpoint: protobuf ``ExportTraceServiceRequest`` POSTs to ``/v1/traces``."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the http.server API)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                req = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                receiver.add(req)
                out = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if self.path == "/v1/traces" else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, req) -> None:
        with self.lock:
            for rs in req.resource_spans:
                service = next(a.value.string_value for a in rs.resource.attributes if a.key == "service.name")
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        self.spans.append({"service": service, "name": s.name, "trace": s.trace_id.hex(),
                                           "id": s.span_id.hex(), "parent": s.parent_span_id.hex(),
                                           "start": s.start_time_unix_nano, "end": s.end_time_unix_nano,
                                           "attrs": {a.key: a.value for a in s.attributes}})

    def of_trace(self, trace_id: str) -> list[dict]:
        with self.lock:
            return [s for s in self.spans if s["trace"] == trace_id]


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    logs = tmp_path_factory.mktemp("traced")
    receiver = OtlpReceiver()
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url}
    procs, grpc = {}, {}
    try:
        for role, extra in (("prefill", []), ("decode", ["--kv-fault-latency", "0.3"])):
            port, grpc[role] = _free_port(), _free_port()
            log = str(logs / f"{role}.log")
            procs[role] = (subprocess.Popen(
                [sys.executable, "-P", "-m", "pdserve.cli.main", "sim-engine", "--model", MODEL, "--role", role,
                 "--port", str(port), "--grpc-port", str(grpc[role]), *extra],
                stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env), log, f"http://127.0.0.1:{port}")
        for role, (proc, log, url) in procs.items():
            wait_healthy(proc, url, log, role, timeout_s=180)
        routing = logs / "always.json"
        routing.write_text('{"pd_decider": {"type": "always"}}')
        port, log = _free_port(), str(logs / "router.log")
        procs["router"] = (subprocess.Popen(
            [sys.executable, "-P", "-m", "pdserve.cli.main", "router", "--model", MODEL, "--port", str(port),
             "--routing-config", str(routing), "--access-log", "json",
             "--prefill", f"127.0.0.1:{grpc['prefill']},name=prefill-a",
             "--decode", f"127.0.0.1:{grpc['decode']},name=decode-a"],
            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env), log, f"http://127.0.0.1:{port}")
        wait_healthy(procs["router"][0], procs["router"][2], log, "router", timeout_s=120)
        yield receiver, procs["router"][2], procs["router"][1]
    finally:
        for proc, _, _ in procs.values():
            proc.terminate()
        for proc, log, _ in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                print(log_tail(log))
        receiver.server.shutdown()


def test_one_trace_links_router_prefill_and_decode(traced):
    receiver, url, router_log = traced
    resp = httpx.post(f"{url}/v1/completions", timeout=60,
                      headers={"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01", "x-pdserve-timing": "1"},
                      json={"model": MODEL, "prompt": "Tracing across three processes: " * 4, "max_tokens": 4})
    assert resp.status_code == 200, resp.text
    timing = resp.json()["pdserve_timing"]
    header = resp.headers["x-pdserve-timing"]
    assert header.startswith(f"ttft={timing['ttft_s'] * 1000:.2f};routing=")

    wanted = {("pdserve-router", "POST /v1/completions"), ("pdserve-prefill", "pdserve.v1.Prefill/Prefill"),
              ("pdserve-decode", "pdserve.v1.Decode/Decode"), ("pdserve-router", "decode_kv_load"),
              ("pdserve-decode", "decode_kv_load")}
    deadline = time.monotonic() + 30  # the exporters send in batches every 0.5 s
    while time.monotonic() < deadline:
        spans = receiver.of_trace(TRACE_ID)
        if wanted <= {(s["service"], s["name"]) for s in spans}:
            break
        time.sleep(0.2)
    spans = receiver.of_trace(TRACE_ID)
    by_id = {s["id"]: s for s in spans}

    def one(service: str, name: str) -> dict:
        found = [s for s in spans if s["service"] == service and s["name"] == name]
        assert len(found) == 1, (service, name, sorted((s["service"], s["name"]) for s in spans))
        return found[0]

    server = one("pdserve-router", "POST /v1/completions")
    assert server["parent"] == CLIENT_SPAN  # the client's traceparent was honoured
    for call, pod_service in (("pdserve.v1.Prefill/Prefill", "pdserve-prefill"),
                              ("pdserve.v1.Decode/Decode", "pdserve-decode")):
        client = one("pdserve-router", call)
        assert by_id[client["parent"]] is server
        pod = one(pod_service, call)
        assert pod["parent"] == client["id"]  # across processes, over gRPC metadata
        role = pod_service.removeprefix("pdserve-")
        for phase in (f"{role}_queue", f"{role}_compute", f"{role}_respond"):
            assert one(pod_service, phase)["parent"] == pod["id"]
    # The router's phase spans hang under its server span and tile the request's time to first token.
    router_phases = [s for s in spans if s["service"] == "pdserve-router" and s["parent"] == server["id"]
                     and not s["name"].startswith("pdserve.v1.")]
    assert [s["name"] for s in sorted(router_phases, key=lambda s: s["start"])] == \
        [p["phase"] for p in timing["phases"]]
    load = one("pdserve-decode", "decode_kv_load")
    assert (load["end"] - load["start"]) / 1e9 >= 0.25  # the injected connector latency, seen by the decode pod
    # The access log line carries the trace id, so a slow request's line leads to its trace.
    deadline = time.monotonic() + 5
    while TRACE_ID not in open(router_log).read() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert f'"trace_id":"{TRACE_ID}"' in open(router_log).read()
