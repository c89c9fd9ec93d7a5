"""The one wait-for-health helper (``pdserve.cli.local_servers.wait_http_ok``) that ``pdserve bench tune`` and the
end-to-end tests' process helpers share: "" once a real HTTP server answers 200, else why not."""

from __future__ import annotations

import subprocess
import sys

from pdserve.cli.local_servers import free_port, wait_http_ok


def test_healthy_once_a_server_answers() -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-P", "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_http_ok(f"http://127.0.0.1:{port}/", proc, timeout_s=30, poll_s=0.1) == ""
        assert wait_http_ok(f"http://127.0.0.1:{port}/missing", proc, timeout_s=0.3, poll_s=0.1).endswith(
            "not healthy within 0.3 s")  # a 404 is not health
    finally:
        proc.terminate()
        proc.wait()


def test_a_process_that_exits_is_reported() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    assert wait_http_ok(f"http://127.0.0.1:{free_port()}/health", proc, timeout_s=5) == "process exited with code 3"
