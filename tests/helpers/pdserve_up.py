"""Starting and stopping ``pdserve`` CLI processes (``pdserve up``, ``pdserve serve``) in end-to-end tests: the
launch line, the bundled model's small CPU engine flags, a free port, waiting for health, and a stop that always
reaps the process and closes its log."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pdserve.cli.local_servers import free_port, wait_http_ok

__all__ = ["ENGINE_FLAGS", "LAUNCH", "MODEL", "PdserveProcess", "free_port", "running_pdserve", "wait_http"]

# ``python -P -c LAUNCH ...`` runs the CLI without the repository root on sys.path (its operator/ folder would
# shadow the standard library's ``operator``).
LAUNCH = "import sys; from pdserve.cli.main import main; sys.exit(main(sys.argv[1:]))"
MODEL = "smollm2-135m-instruct"
ENGINE_FLAGS = "--device cpu --max-model-len 1024 --cpu-kv-cache-gib 0.25 --max-num-seqs 8"


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 400.0) -> None:
    """Poll ``url`` until it answers 200; fail if ``proc`` exits first or ``timeout`` passes."""
    error = wait_http_ok(url, proc, timeout, poll_s=1.0)
    assert not error, error


class PdserveProcess:
    """``pdserve ARGS`` (which must include ``--port``) started in ``work``, its output in ``work/log_name``."""

    def __init__(self, args: list[str], work: Path, log_name: str, env: dict[str, str] | None = None) -> None:
        self.log_path = work / log_name
        self.url = f"http://127.0.0.1:{args[args.index('--port') + 1]}"
        self._log = open(self.log_path, "wb")
        self._interrupted = False
        self.proc = subprocess.Popen([sys.executable, "-P", "-c", LAUNCH, *args], cwd=work, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env)

    def wait_healthy(self) -> None:
        """Wait for ``/health``; on failure stop the process and print its log's tail."""
        try:
            wait_http(self.url + "/health", self.proc)
        except BaseException:
            self.stop()
            print(self.log_path.read_text(errors="replace")[-6000:])
            raise

    def interrupt(self) -> None:
        """SIGINT, once: a clean shutdown, as Ctrl-C (a second one could cut the shutdown short)."""
        if self.proc.poll() is None and not self._interrupted:
            self.proc.send_signal(signal.SIGINT)
            self._interrupted = True

    def stop(self, timeout: float = 60.0) -> None:
        """:meth:`interrupt`, then SIGKILL if it still runs after ``timeout``; closes the log."""
        self.interrupt()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@contextmanager
def running_pdserve(*servers: PdserveProcess) -> Iterator[None]:
    """Wait until every one of ``servers`` (started together, so they load their models at the same time) is
    healthy; stop them all when the ``with`` block ends, however it ends."""
    try:
        for server in servers:
            server.wait_healthy()
        yield
    finally:
        for server in servers:
            server.interrupt()
        for server in servers:
            server.stop()
