"""Helpers of the API tests: the real ``pdserve serve`` subprocess and its metrics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from pdserve.cli.local_servers import free_port
from tests.helpers.server_process import log_tail, scrape_metrics, wait_healthy

MODEL = "smollm2-135m-instruct"
API_KEY = "test-key"
MAX_MODEL_LEN = 512
NUM_BLOCKS = 400
# The engine flags of the server; the offline LLM of the equality tests uses the same.
ENGINE_KWARGS = dict(max_model_len=MAX_MODEL_LEN, num_blocks=NUM_BLOCKS, max_num_seqs=128)


@dataclass
class RealServer:
    url: str
    grpc_target: str
    api_key: str
    proc: subprocess.Popen
    log_path: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def log_tail(self, chars: int = 4000) -> str:
        return log_tail(self.log_path, chars)

    def metrics(self) -> dict[str, float]:
        """The server's ``pdserve:*`` samples as {"name{labels}": value}."""
        return scrape_metrics(self.url)

    def metric(self, name: str, **labels: str) -> float:
        labels = {"model_name": MODEL, **labels}
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        return self.metrics()[f"pdserve:{name}{{{want}}}"]

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Until no sequence runs or waits and no KV block is in use (per the metrics)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            label = f'{{model_name="{MODEL}"}}'
            if (m[f"pdserve:num_requests_running{label}"] == 0 and m[f"pdserve:num_requests_waiting{label}"] == 0
                    and m[f"pdserve:kv_cache_usage_perc{label}"] == 0):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"server not idle: { {k: v for k, v in m.items() if 'bucket' not in k} }")
            time.sleep(0.1)


def start_real_server(extra_args: tuple[str, ...] = ()) -> RealServer:
    """Start ``pdserve serve`` with the bundled model (plus ``extra_args``) and wait until it is healthy."""
    port, grpc_port = free_port(), free_port()
    cmd = [sys.executable, "-P", "-m", "pdserve.cli.main", "serve", "--model", MODEL, "--port", str(port),
           "--grpc-port", str(grpc_port), "--api-key", API_KEY, "--max-model-len", str(MAX_MODEL_LEN),
           "--num-blocks", str(NUM_BLOCKS), "--max-num-seqs", "128", "--log-level", "warning", *extra_args]
    log = tempfile.NamedTemporaryFile("w+", prefix="pdserve-serve-", suffix=".log", delete=False)
    # -P and a neutral cwd: the repository root holds a folder named 'operator' that must not shadow the stdlib.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir(),
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log.close()
    server = RealServer(f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}", API_KEY, proc, log.name)
    try:
        wait_healthy(proc, server.url, log.name, "pdserve serve", timeout_s=600)
    except BaseException:
        stop_real_server(server)
        raise
    return server


def stop_real_server(server: RealServer) -> None:
    """SIGINT (a clean shutdown of server and engine core), then kill if it hangs."""
    server.proc.send_signal(signal.SIGINT)
    try:
        server.proc.wait(30)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()
    os.unlink(server.log_path)
