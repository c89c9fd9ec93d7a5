"""Servers that local commands start on this machine: free loopback ports and a real ``redis-server``.

``pdserve up --kv-connector redis`` (without ``--redis-url``) and ``pdserve bench kv-transfer`` start a Redis this
way; the tests use the same class::

    with LocalRedis() as redis_server:
        url = redis_server.url            # redis://127.0.0.1:<port>/0

Nothing is persisted (no RDB, no AOF); the working directory is a fresh temporary one. ``stop`` ends the
process it started, and only that one.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time


_FIRST_PORT = 10000  # the lowest port free_port picks
_handed_out: set[int] = set()  # ports this process was given: never given twice


def _ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux; the common default elsewhere)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now, for a server this process starts a moment later.

    Taken below the kernel's ephemeral range where it can: a port the kernel picked (``bind(0)``) comes from the
    range that outgoing connections also draw from, and one of those (a health poll, a client) took such a port
    before the server bound it once on CI (``address already in use``). A port below the range can only be taken
    by an explicit bind. Ports already handed out by this process are skipped."""
    low, _ = _ephemeral_ports()
    if low - _FIRST_PORT >= 1000:
        for _ in range(200):
            port = random.randint(_FIRST_PORT, low - 1)
            if port in _handed_out:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # a machine with no room below the range
        s.bind((host, 0))
        port = s.getsockname()[1]
    _handed_out.add(port)
    return port


def wait_http_ok(url: str, proc: subprocess.Popen | None = None, timeout_s: float = 400.0,
                 poll_s: float = 0.5) -> str:
    """Poll ``url`` (a server's ``/health``) until it answers 200. Returns "" then, else why not: ``proc`` (the
    server's process, when given) exited first, or ``timeout_s`` passed. Used by ``pdserve bench tune`` and the
    end-to-end tests' process helpers."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return f"process exited with code {proc.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return ""
        except (OSError, ValueError):  # refused, reset, timed out, an HTTP error status: not up yet
            pass
        time.sleep(poll_s)
    return f"{url} not healthy within {timeout_s:g} s"


def redis_server_argv(port: int, *, workdir: str | None = None, maxmemory: str | None = None,
                      executable: str = "redis-server") -> list[str]:
    """The command line of a throwaway Redis on 127.0.0.1:``port`` (no persistence, warnings only)."""
    argv = [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--loglevel", "warning"]
    if workdir:
        argv += ["--dir", workdir]
    if maxmemory:
        argv += ["--maxmemory", maxmemory]
    return argv


class LocalRedis:
    """Start ``redis-server`` (Debian package ``redis-server``) on 127.0.0.1."""

    def __init__(self, port: int = 0, maxmemory: str | None = None, executable: str = "redis-server") -> None:
        self.executable = shutil.which(executable)
        if self.executable is None:
            raise FileNotFoundError(f"{executable} not found: install Redis (Debian/Ubuntu: apt-get install "
                                    f"redis-server)")
        self.port = port or free_port()
        self.maxmemory = maxmemory
        self.proc: subprocess.Popen | None = None
        self._dir: tempfile.TemporaryDirectory | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> "LocalRedis":
        self._dir = tempfile.TemporaryDirectory(prefix="pdserve-redis-")
        args = redis_server_argv(self.port, workdir=self._dir.name, maxmemory=self.maxmemory,
                                 executable=self.executable)
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"redis-server exited at start-up (port {self.port}): {err.strip()}")
            if self.ping():
                return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"redis-server did not answer on port {self.port} within {timeout_s} s")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> "LocalRedis":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
