"""Real ``pdserve prefill`` / ``pdserve decode`` subprocesses for the disaggregation service tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from pdserve.cli.local_servers import free_port
from tests.helpers.server_process import log_tail, scrape_metrics, wait_healthy

# Engine flags of every server; the offline reference engine uses the same.
ENGINE_FLAGS = ["--device", "cpu", "--num-blocks", "64", "--max-model-len", "256", "--block-size", "16"]


@dataclass
class RoleServer:
    role: str
    model: str
    url: str
    grpc_target: str
    proc: subprocess.Popen
    log_path: str
    flags: list[str] = field(default_factory=list)

    def log_tail(self, chars: int = 4000) -> str:
        return log_tail(self.log_path, chars)

    def metrics(self) -> dict[str, float]:
        """``pdserve:*`` samples as {"name{labels}": value}."""
        return scrape_metrics(self.url)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``pdserve:<name>`` whose labels include ``labels``."""
        total = 0.0
        for key, value in self.metrics().items():
            metric, _, rest = key.partition("{")
            if metric == f"pdserve:{name}" and all(f'{k}="{v}"' in rest for k, v in labels.items()):
                total += value
        return total

    def wait_no_blocks_in_use(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.metric("kv_cache_usage_perc") != 0:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.role} server still holds KV blocks")
            time.sleep(0.1)



def start_role_server(role: str, model: str, *flags: str) -> RoleServer:
    port, grpc_port = free_port(), free_port()
    cmd = [sys.executable, "-P", "-m", "pdserve.cli.main", role, "--model", model, "--port", str(port),
           "--grpc-port", str(grpc_port), "--log-level", "warning", *ENGINE_FLAGS, *flags]
    log = tempfile.NamedTemporaryFile("w+", prefix=f"pdserve-{role}-", suffix=".log", delete=False)
    # start_new_session: a test may SIGKILL the whole pod (server and engine core) as one process group.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir(),
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    log.close()
    server = RoleServer(role, model, f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}", proc, log.name,
                        list(flags))
    try:
        wait_healthy(proc, server.url, log.name, f"pdserve {role}", timeout_s=300, poll_s=0.3)
    except BaseException:
        stop_role_server(server)
        raise
    return server


def kill_pod(server: RoleServer) -> None:
    """SIGKILL the server and its engine core (one process group): no clean-up runs."""
    try:
        os.killpg(server.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.proc.wait()


def stop_role_server(server: RoleServer) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGINT)
        try:
            server.proc.wait(30)
        except subprocess.TimeoutExpired:
            kill_pod(server)
    os.unlink(server.log_path)
