"""What the end-to-end tests need of a server process they started: waiting until it is healthy, its log and
its ``pdserve:*`` metrics."""

from __future__ import annotations

import subprocess
import time

import httpx


def wait_healthy(proc: subprocess.Popen, base_url: str, log_path: str, name: str, timeout_s: float,
                 poll_s: float = 0.5) -> None:
    """Poll ``base_url/health`` until it answers 200; raise (with the log's tail) if the process exits first or
    ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log_tail(log_path)}")
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not become healthy:\n{log_tail(log_path)}")
        time.sleep(poll_s)


def log_tail(log_path: str, chars: int = 4000) -> str:
    """The last ``chars`` characters of a server's log file (shown when a test fails)."""
    with open(log_path, errors="replace") as f:
        return f.read()[-chars:]


def scrape_metrics(base_url: str) -> dict[str, float]:
    """The server's ``pdserve:*`` samples as {"name{labels}": value}."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line.startswith("pdserve:"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out
