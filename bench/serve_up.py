"""``pdserve bench serve --peer ... --pdserve-up``: the disaggregated stack as a third engine of the comparison.

After the peer's server and ``pdserve serve``, ``pdserve up`` (router + 1 prefill + 1 decode engine, by default
the grpc KV connector, which moves KV device to device over CUDA IPC when both engines share a GPU) serves the
same model directory with the same engine settings and is driven with the same trace; the table and
``comparison.json`` then show it as ``pdserve-up`` with its goodput and output throughput over
``pdserve serve``'s (issue 17's target: within 15 %) and over the peer's.

``pdserve up`` runs its engines and router in process groups of their own and stops them itself on SIGTERM, so
stopping its group is not enough to know they are gone: :class:`UpProcess` notes every descendant before the
stop and fails the benchmark if one outlives it (after killing it).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import time
from pathlib import Path
from typing import Any

from pdserve.bench.peer import ratio
from pdserve.bench.peer_process import PeerError, ServerProcess, stop_group

UP = "pdserve-up"
UP_FLAGS = ("pdserve_up", "up_kv_connector", "pdserve_up_args")
# Issue 17: `pdserve up` on one GPU within 15 % of `pdserve serve`'s goodput.
TARGET_GOODPUT_RATIO = 0.85
# Longer than `pdserve up`'s own 15 s for its parts to stop, so it is never killed while stopping them.
UP_STOP_GRACE_S = 40.0


def add_up_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--pdserve-up", action="store_true",
                   help="with --peer: after `pdserve serve`, also start `pdserve up` (router + 1 prefill + 1 decode "
                        "on the same model and engine settings, --pdserve-server-args included) and drive it "
                        "with the same trace; reported as pdserve-up with its ratios to pdserve serve and the peer")
    g.add_argument("--up-kv-connector", default=None,
                   help="with --pdserve-up: the KV connector of `pdserve up` (default grpc: device to device over "
                        "CUDA IPC where both engines share a GPU, --kv-transport auto)")
    g.add_argument("--pdserve-up-args", default=None,
                   help="with --pdserve-up: more `pdserve up` flags, e.g. '--decode-args \"--max-num-seqs 128\"' "
                        "(not --engine-args: the shared engine settings go there)")


def up_command(python: str, model_dir: str, engine_flags: list[str], args: argparse.Namespace, port: int,
               explicit_memory_share: bool) -> list[str]:
    """``pdserve up`` on ``model_dir``, its router on ``port``. ``engine_flags``: the flags both servers got
    (bench/serve_peer.py's ``common_flags``); their ``--host``/``--port`` are dropped (up picks the engines'
    ports), and ``--gpu-memory-utilization`` too unless the user chose it, so that up splits the GPU evenly
    between its engines. ``--served-model-name`` and ``--max-model-len`` reach the router as well (up passes the
    settings the router shares with the engines on)."""
    extra = shlex.split(args.pdserve_up_args or "")
    if any(a == "--engine-args" or a.startswith("--engine-args=") for a in extra):
        raise ValueError("--pdserve-up-args must not set --engine-args (it would replace the engine settings both "
                         "servers share); use --prefill-args / --decode-args, or --pdserve-server-args for all")
    engine = _without(engine_flags, ("--host", "--port") if explicit_memory_share else
                      ("--host", "--port", "--gpu-memory-utilization"))
    # As `pdserve serve` gets --max-waiting 0: no admission limit in the engines (vLLM has none). The router takes
    # no such flag: its HTTP limit (--max-concurrent-requests) has the same default as `pdserve serve`'s. The
    # engines' gRPC limit matters here only, where every request is a gRPC call from the router: none either.
    engine += ["--max-waiting", "0", "--max-concurrent-rpcs", "0", *shlex.split(args.pdserve_server_args or "")]
    return [python, "-P", "-m", "pdserve.cli.main", "up", "--model", model_dir, "--prefill", "1", "--decode", "1",
            "--host", "127.0.0.1", "--port", str(port), "--kv-connector", args.up_kv_connector or "grpc",
            "--engine-args", shlex.join(engine), *extra]


def _without(flags: list[str], names: tuple[str, ...]) -> list[str]:
    """``flags`` less each ``NAME VALUE`` pair named."""
    out, skip = [], False
    for flag in flags:
        if skip:
            skip = False
        elif flag in names:
            skip = True
        else:
            out.append(flag)
    return out


def descendants(pid: int) -> list[int]:
    """The live (not zombie) processes below ``pid``, found through /proc's parent links (Linux)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited while we looked
        if fields[0] not in ("Z", "X"):
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


class UpProcess(ServerProcess):
    """``pdserve up`` as a benchmarked server: its group is stopped as any server's, then every process it had
    started must be gone; one that is not is killed and the benchmark fails with :class:`PeerError`."""

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        children = descendants(self.proc.pid)
        stop_group(self.proc, grace_s=UP_STOP_GRACE_S)
        deadline = time.monotonic() + 30.0
        while any(_alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [p for p in children if _alive(p)]
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if left:
            raise PeerError(f"{self.name} left process(es) {left} running after it stopped (killed now); "
                            f"{self.tail()}")


def add_up_ratios(row: dict[str, Any], up: dict[str, Any], peer: str) -> None:
    """``row`` (one request rate of the comparison) gains pdserve-up's summary and its ratios to ``pdserve serve``
    (``up_*``) and to the peer (``up_peer_*``)."""
    from pdserve.bench.serve_peer import COMPARED

    row[UP] = {k: up.get(k) for k in COMPARED}
    for prefix, other in (("up", "pdserve"), ("up_peer", peer)):
        row[f"{prefix}_output_throughput_ratio"] = ratio(up["output_throughput"], row[other]["output_throughput"])
        if "goodput" in up:
            row[f"{prefix}_goodput_ratio"] = ratio(up["goodput"], row[other]["goodput"])
    if "up_goodput_ratio" in row:
        row["up_goodput_target_met"] = row["up_goodput_ratio"] >= TARGET_GOODPUT_RATIO


def format_up_ratios(row: dict[str, Any], peer: str) -> list[str]:
    """The table's lines for pdserve-up's ratios at one rate (none when it did not run)."""
    if UP not in row:
        return []
    lines = []
    for prefix, other in (("up", "pdserve"), ("up_peer", peer)):
        good = f", goodput {row[f'{prefix}_goodput_ratio']:.2f}x" if f"{prefix}_goodput_ratio" in row else ""
        lines.append(f"{'':>8} {UP} / {other}: output throughput {row[f'{prefix}_output_throughput_ratio']:.2f}x"
                     f"{good}")
    if "up_goodput_target_met" in row:
        lines[0] += (f" (target >= {TARGET_GOODPUT_RATIO:g}: "
                     f"{'met' if row['up_goodput_target_met'] else 'missed'})")
    return lines
