"""Engine processes of the side-by-side benchmarks (``--peer``): started in a process group of their own, with
their own environment, output to a log file, always time-boxed, and killed as a group afterwards (vLLM's engine
core is a child process of the one we start, and would otherwise outlive it holding the GPU).

A process that exits with an error, never becomes healthy, or runs past its time limit raises :class:`PeerError`
with the end of its log, never hangs the benchmark.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

# The offline benchmarks run this file by path in each engine's process (see its docstring for why by path).
WORKER = Path(__file__).with_name("peer_worker.py")
# Top-level module each peer engine must be able to import.
PEER_MODULES = {"vllm": "vllm", "pdserve": "pdserve.engine"}


class PeerError(RuntimeError):
    """An engine process failed, hung or could not start; the message carries the end of its log."""


def log_tail(path: str | os.PathLike[str], chars: int = 3000) -> str:
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return "(no log)"
    return text[-chars:] if text.strip() else "(the log is empty)"


def peer_env(pythonpath: str | None, engine: str) -> dict[str, str]:
    """The environment of a peer process: ``pythonpath`` prepended to PYTHONPATH (for this process only), and for
    vLLM no network look-ups and no usage reports."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    if engine == "vllm":
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def check_importable(engine: str, python: str, env: dict[str, str], timeout_s: float = 60.0) -> None:
    """Fail fast, before any engine runs, when the peer's interpreter cannot find the peer's package at all.
    (Only the package is located here, not imported: a broken install still fails later, with its log.)"""
    module = PEER_MODULES[engine]
    code = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({module!r}) else 3)"
    try:
        proc = subprocess.run([python, "-P", "-c", code], env=env, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PeerError(f"cannot run the peer interpreter {python!r}: {exc}") from None
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()[-1500:]
        raise PeerError(f"the peer {engine!r} is not importable by {python} with PYTHONPATH="
                        f"{env.get('PYTHONPATH', '')!r} (pass --peer-pythonpath DIR where {module} is installed, "
                        f"and --peer-python if it needs another interpreter)" + (f":\n{detail}" if detail else ""))


@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """Inside the block SIGTERM (e.g. from ``timeout``) ends this process through ``SystemExit``, so the code that
    kills the engines' process groups still runs; by default SIGTERM would leave them holding the GPU."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def start(cmd: Sequence[str], env: dict[str, str], log_path: str | os.PathLike[str]) -> subprocess.Popen:
    """Start ``cmd`` in a new session (its own process group), stdin closed, stdout and stderr into the log."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(list(cmd), env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop_group(proc: subprocess.Popen, grace_s: float = 15.0, gone_s: float = 60.0) -> None:
    """SIGTERM the process group, give it ``grace_s`` to exit, SIGKILL whatever is left of it, then wait (up to
    ``gone_s``) until no process of the group is alive: the next engine must find the GPU's memory free, and vLLM
    refuses to start while less than its ``gpu_memory_utilization`` share of the memory is free."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass  # the group is gone already
        if sig == signal.SIGTERM:
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
    proc.wait()
    deadline = time.monotonic() + gone_s
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)


def group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is still running (zombies, which hold no memory, do not count; a
    container's init may never reap them)."""
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():  # not Linux: ask the kernel, zombies included
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    for stat in proc_dir.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited while we looked
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def run_to_completion(cmd: Sequence[str], env: dict[str, str], log_path: str | os.PathLike[str], timeout_s: float,
                      name: str) -> None:
    """Run ``cmd`` to its end within ``timeout_s``; :class:`PeerError` (with the log's tail) if it fails or hangs."""
    proc = start(cmd, env, log_path)
    timed_out = False
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        stop_group(proc)
    if timed_out:
        raise PeerError(f"{name} did not finish within {timeout_s:g} s and was killed; the end of its log "
                        f"({log_path}):\n{log_tail(log_path)}")
    if proc.returncode != 0:
        raise PeerError(f"{name} failed with exit code {proc.returncode}; the end of its log ({log_path}):\n"
                        f"{log_tail(log_path)}")


def worker_command(python: str, spec_path: str | os.PathLike[str], result_path: str | os.PathLike[str]) -> list[str]:
    """``-P``: the folder of the worker file (``bench/``, with a ``datasets.py``) must not shadow packages."""
    return [python, "-P", str(WORKER), str(spec_path), str(result_path)]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the server binds it a moment later)."""
    from pdserve.cli.local_servers import free_port as local_free_port

    return local_free_port()


class ServerProcess:
    """A server started for one benchmark run: ``with ServerProcess(...) as srv: srv.wait_healthy(t)``; the
    process group is killed on leaving the block, whatever happened inside it."""

    def __init__(self, name: str, cmd: Sequence[str], env: dict[str, str], log_path: str | os.PathLike[str],
                 base_url: str) -> None:
        self.name, self.cmd, self.env, self.log_path, self.base_url = name, list(cmd), env, log_path, base_url
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        self.proc = start(self.cmd, self.env, self.log_path)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_group(self.proc)

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def tail(self) -> str:
        return f"the end of {self.name}'s log ({self.log_path}):\n{log_tail(self.log_path)}"

    def wait_healthy(self, timeout_s: float, poll_s: float = 0.5) -> float:
        """Poll ``/health`` until it answers 200; returns the seconds it took. :class:`PeerError` if the process
        exits first or ``timeout_s`` passes."""
        import httpx

        start_t = time.monotonic()
        while True:
            if self.exited():
                assert self.proc is not None
                raise PeerError(f"{self.name} exited with code {self.proc.returncode} before it was healthy; "
                                f"{self.tail()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=5).status_code == 200:
                    return time.monotonic() - start_t
            except httpx.HTTPError:
                pass
            if time.monotonic() - start_t > timeout_s:
                raise PeerError(f"{self.name} was not healthy within {timeout_s:g} s (killed); {self.tail()}")
            time.sleep(poll_s)
