"""``pdserve up``: the whole disaggregated stack on this machine with one command.

    pdserve up                                  # router on :8000, 1 prefill + 1 decode, shared-fs KV in a temp dir
    pdserve up --prefill 2 --decode 2 --port 9000
    pdserve up --kv-connector redis             # starts a local redis-server (or pass --redis-url)

Starts the parts as child processes, prefixes each line of their logs with the part's name, waits until every
engine answers its health check and the router's ``/health`` is ready, then prints the URL and a curl example.
Ctrl-C (or SIGTERM) stops everything; if any part dies, everything else is stopped too and the exit code is 1.

Engines on a GPU start one after the other and, unless told otherwise, split 90 % of its memory evenly
(``--start`` and :func:`_split_gpu_memory` say why); engines on the CPU start all at once.

Each run generates its own cluster secret and hands it to every part in the environment
(``PDSERVE_CLUSTER_SECRET``, never on a command line, where ``ps`` shows it): the engines then take calls only
from this run's router (or a user with the engines' API key), and nothing else on the machine can call them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from pdserve.cli.local_servers import free_port, redis_server_argv
from pdserve.engine.config import DEFAULT_MODEL
from pdserve.engine.security import SECRET_ENV, SECRET_FILE_ENV, ClusterSecret

# Children run `pdserve <role> ...` through this interpreter. -P: the working directory is not put on sys.path, so
# a repository root there (its `operator/` and `kernels/`) never shadows the standard library or installed packages.
_LAUNCH = ["-P", "-m", "pdserve.cli.main"]
START_MODES = ("auto", "parallel", "sequential")
# The share of the GPU's memory the engines of one stack split among themselves when no engine is given
# --gpu-memory-utilization (the engines' own default when alone on a GPU).
GPU_SHARE = 0.9


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model for every engine (default: the bundled one)")
    parser.add_argument("--prefill", type=int, default=1, help="prefill processes (0: decode pods prefill)")
    parser.add_argument("--decode", type=int, default=1, help="decode processes")
    parser.add_argument("--host", default="127.0.0.1", help="router address (engines stay on 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="router HTTP port")
    parser.add_argument("--grpc-port", type=int, default=None, help="router gRPC port (default: none)")
    # The connector flags of `pdserve prefill|decode`, passed on to every engine. Here --kv-path defaults to a
    # fresh temp dir and --redis-url to a redis-server started for the stack.
    from pdserve.engine.kv_transfer.options import add_kv_transfer_arguments

    add_kv_transfer_arguments(parser)
    parser.add_argument("--block-size", type=int, default=16, help="KV block size (engines and router)")
    parser.add_argument("--routing-preset", default="prefix-load", help="router plugins preset")
    parser.add_argument("--routing-config", default=None, help="router plugins file (YAML/JSON)")
    parser.add_argument("--decode-command", default="decode", choices=["decode", "serve"],
                        help="run decode pods as `pdserve decode` (default) or monolithic `pdserve serve` engines")
    parser.add_argument("--engine-args", default="", help="extra flags for every engine, e.g. '--device cpu'")
    parser.add_argument("--prefill-args", default="", help="extra flags for the prefill pods only")
    parser.add_argument("--decode-args", default="",
                        help="extra flags for the decode pods only, e.g. '--speculative-config {...}' (prefill pods "
                             "never decode, so they refuse it)")
    parser.add_argument("--router-args", default="", help="extra flags for the router")
    parser.add_argument("--start", choices=list(START_MODES), default="auto",
                        help="start the engines all at once (parallel) or each once the one before is healthy "
                             "(sequential), which engines sharing a GPU need: each sizes its KV cache from the "
                             "memory the others left free. auto (default): parallel when every engine runs with "
                             "--device cpu, else sequential")
    parser.add_argument("--startup-timeout", type=float, default=900.0,
                        help="seconds to wait for healthy engines (all of them, together)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")


@dataclass
class Part:
    """One process of the stack: its name (log prefix), command line and how to tell it is healthy."""

    name: str
    argv: list[str]
    health: tuple[str, str]  # ("grpc", "host:port") | ("http", url) | ("tcp", "host:port")
    proc: subprocess.Popen | None = field(default=None, repr=False)


def plan(args: argparse.Namespace, port_of=free_port, kv_path: str | None = None) -> list[Part]:
    """The parts to start, in start order (pure apart from picking free ports; tests pass ``port_of``)."""
    if args.decode < 1:
        raise ValueError("--decode must be at least 1")
    if args.prefill < 0:
        raise ValueError("--prefill must be >= 0")
    parts: list[Part] = []
    kv_opts: list[str] = []
    if args.kv_connector == "redis":
        url = args.redis_url
        if url is None:
            if shutil.which("redis-server") is None:
                raise ValueError("--kv-connector redis needs --redis-url or a local redis-server "
                                 "(Debian/Ubuntu: apt-get install redis-server)")
            port = port_of()
            parts.append(Part("redis", redis_server_argv(port), ("tcp", f"127.0.0.1:{port}")))
            url = f"redis://127.0.0.1:{port}/0"
        kv_opts = ["--redis-url", url]
    elif args.kv_connector == "shared-fs":
        kv_opts = ["--kv-path", args.kv_path or kv_path or ""]
    kv_opts += _other_kv_flags(args)
    engine_extra = shlex.split(args.engine_args)
    py = sys.executable
    routes: dict[str, list[str]] = {}
    roles = [("prefill", i) for i in range(args.prefill)] + [("decode", i) for i in range(args.decode)]
    for role, i in roles:
        http, grpc, events = port_of(), port_of(), port_of()
        command = args.decode_command if role == "decode" else "prefill"
        argv = [py, *_LAUNCH, command, "--model", args.model, "--host", "127.0.0.1", "--port", str(http),
                "--grpc-port", str(grpc), "--block-size", str(args.block_size)]
        has_events = _accepts(command, "--kv-events-endpoint")
        if has_events:
            argv += ["--kv-events-endpoint", f"tcp://127.0.0.1:{events}"]
        if command != "serve":  # a monolithic engine moves no KV
            argv += ["--kv-connector", args.kv_connector, *kv_opts]
        argv += engine_extra
        argv += shlex.split(args.decode_args if role == "decode" else args.prefill_args)
        name = f"{role}-{i}"
        parts.append(Part(name, argv, ("grpc", f"127.0.0.1:{grpc}")))
        flag = "prefill" if role == "prefill" else ("decode" if command == "decode" else "both")
        events_opt = f",events=tcp://127.0.0.1:{events}" if has_events else ""
        routes.setdefault(flag, []).append(
            f"grpc://127.0.0.1:{grpc}{events_opt},http=http://127.0.0.1:{http},name={name}")
    _split_gpu_memory([p for p in parts if p.name != "redis"])
    router = [py, *_LAUNCH, "router", "--model", args.model, "--host", args.host, "--port", str(args.port),
              "--block-size", str(args.block_size)]
    for flag in ("prefill", "decode", "both"):
        if routes.get(flag):
            router += [f"--{flag}", *routes[flag]]
    if args.grpc_port is not None:
        router += ["--grpc-port", str(args.grpc_port)]
    router += (["--routing-config", args.routing_config] if args.routing_config
               else ["--routing-preset", args.routing_preset])
    # Settings the router must share with the engines, when given to the engines.
    for shared in ("--max-model-len", "--served-model-name", "--hash-seed", "--hash-algo"):
        value = _flag_value(engine_extra, shared)  # either spelling, `--flag V` or `--flag=V`
        if value is not None and shared not in args.router_args:
            router += [shared, value]
    router += shlex.split(args.router_args)
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    parts.append(Part("router", router, ("http", f"http://{host}:{args.port}/health")))
    return parts


def _flag_value(argv: list[str], flag: str) -> str | None:
    """The value of the last ``flag X`` or ``flag=X`` in ``argv`` (argparse's last one wins), else None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def on_cpu(part: Part) -> bool:
    """Whether an engine's final command line runs it on the CPU (``--device cpu``)."""
    return _flag_value(part.argv, "--device") == "cpu"


def _split_gpu_memory(engines: list[Part]) -> None:
    """Engines on a GPU, when none was given ``--gpu-memory-utilization``: engine i of n (in start order) gets
    ``GPU_SHARE * (i + 1) / n``. Each engine's budget is that fraction of the whole GPU minus everything already
    in use there, which counts the earlier engines' memory (they start one after the other, see ``--start``), so
    the cumulative fractions give each engine an equal share. All engines are assumed to share one GPU: engines on
    separate GPUs should be given ``--gpu-memory-utilization`` (``--engine-args``) instead."""
    gpu = [p for p in engines if not on_cpu(p)]
    if not gpu or any(_flag_value(p.argv, "--gpu-memory-utilization") is not None for p in engines):
        return
    for i, part in enumerate(gpu):
        part.argv += ["--gpu-memory-utilization", str(round(GPU_SHARE * (i + 1) / len(gpu), 4))]


def start_waves(parts: list[Part], mode: str) -> list[list[Part]]:
    """The parts before the router, grouped into waves started one after the other (each wave healthy before the
    next starts). ``sequential``: one part per wave. Two engines profiling one GPU at once would both see it
    empty and both claim most of it, so ``auto`` is sequential unless every engine runs on the CPU."""
    if mode not in START_MODES:
        raise ValueError(f"--start must be one of {', '.join(START_MODES)}")
    before_router = [p for p in parts if p.name != "router"]
    engines = [p for p in before_router if p.name != "redis"]
    if mode == "auto":
        mode = "parallel" if all(on_cpu(p) for p in engines) else "sequential"
    return [before_router] if mode == "parallel" else [[p] for p in before_router]


def _other_kv_flags(args: argparse.Namespace) -> list[str]:
    """Connector flags the user set (besides connector, path and URL), to repeat for every engine."""
    from pdserve.engine.kv_transfer.options import add_kv_transfer_arguments

    scratch = argparse.ArgumentParser()
    add_kv_transfer_arguments(scratch)
    out = []
    for action in scratch._actions:
        if action.dest in ("help", "kv_connector", "kv_path", "redis_url"):
            continue
        value = getattr(args, action.dest, action.default)
        if value != action.default:
            out += [action.option_strings[0], str(value)]
    return out


def _accepts(command: str, flag: str) -> bool:
    """Whether ``pdserve <command>`` takes ``flag`` (an engine without KV events still works: the router then
    routes by its approximate prefix index)."""
    from pdserve.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices.get(command)
    return parser is not None and flag in parser._option_string_actions


def healthy(kind: str, target: str) -> bool:
    """One health probe; never raises."""
    try:
        if kind == "http":
            import urllib.request

            with urllib.request.urlopen(target, timeout=2) as resp:
                return resp.status == 200
        if kind == "tcp":
            host, port = target.rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(target) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
            return resp.status == health_pb2.HealthCheckResponse.SERVING
    except Exception:
        return False


def child_environment(secret: ClusterSecret, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every part: this process's, with the run's cluster secret (replacing any secret the
    caller had, so the parts of two runs never share one)."""
    env = dict(os.environ if base is None else base)
    env.pop(SECRET_FILE_ENV, None)
    env[SECRET_ENV] = secret.to_text()
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Supervisor:
    """Starts the parts, prefixes their logs, waits for health, and stops them all together.

    ``env``: the parts' environment (default: :func:`child_environment` with a fresh secret)."""

    def __init__(self, parts: list[Part], out=None, env: dict[str, str] | None = None) -> None:
        self.parts = parts
        self.out = out or sys.stdout
        self.env = env if env is not None else child_environment(ClusterSecret.generate())
        self._lock = threading.Lock()
        self._stopping = False

    def say(self, name: str, line: str) -> None:
        with self._lock:
            self.out.write(f"[{name}] {line}" if line.endswith("\n") else f"[{name}] {line}\n")
            self.out.flush()

    def _pump(self, part: Part) -> None:
        assert part.proc is not None and part.proc.stdout is not None
        for raw in iter(part.proc.stdout.readline, b""):
            self.say(part.name, raw.decode(errors="replace"))

    def start(self, part: Part, cwd: str) -> None:
        # Own process group: Ctrl-C in the terminal reaches this supervisor only, which then stops each part in
        # order (an engine must not die before the router stops sending it requests).
        part.proc = subprocess.Popen(part.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd,
                                     start_new_session=True, env=self.env)
        threading.Thread(target=self._pump, args=(part,), daemon=True, name=f"log-{part.name}").start()

    def dead(self) -> Part | None:
        return next((p for p in self.parts if p.proc is not None and p.proc.poll() is not None), None)

    def wait_healthy(self, parts: list[Part], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(parts)
        while pending:
            gone = self.dead()
            if gone is not None:
                raise RuntimeError(f"{gone.name} exited with code {gone.proc.returncode} during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError(f"not healthy after {timeout_s:.0f} s: {', '.join(p.name for p in pending)}")
            pending = [p for p in pending if not healthy(*p.health)]
            if pending:
                time.sleep(0.5)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM in reverse start order (router first), then SIGKILL whatever lingers."""
        self._stopping = True
        for part in reversed(self.parts):
            if part.proc is not None and part.proc.poll() is None:
                part.proc.terminate()
        deadline = time.monotonic() + timeout_s
        for part in reversed(self.parts):
            if part.proc is None:
                continue
            try:
                part.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.say("up", f"{part.name} did not stop in time: killing it")
                part.proc.kill()
                part.proc.wait()


def run(args: argparse.Namespace) -> int:
    workdir = tempfile.mkdtemp(prefix="pdserve-up-")
    try:
        try:
            parts = plan(args, kv_path=os.path.join(workdir, "kv"))
        except ValueError as exc:
            print(f"pdserve up: {exc}", file=sys.stderr)
            return 2
        if args.dry_run:
            waves = start_waves(parts, args.start)
            print(f"# engines start {'one after the other' if len(waves) > 1 else 'at once'}")
            for p in parts:
                print(f"{p.name}: {shlex.join(p.argv)}")
            return 0
        return _run_stack(parts, workdir, args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run_stack(parts: list[Part], workdir: str, args: argparse.Namespace) -> int:
    sup = Supervisor(parts)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    engines = [p for p in parts if p.name != "router"]
    router = parts[-1]
    code = 0
    try:
        waves = start_waves(parts, args.start)
        how = "one after the other" if len(waves) > 1 else "at once"
        sup.say("up", f"starting {len(engines)} part(s) {how}; loading the model can take a while")
        deadline = time.monotonic() + args.startup_timeout
        for wave in waves:
            for p in wave:
                sup.start(p, workdir)
            _wait(sup, wave, max(0.1, deadline - time.monotonic()), stop)
        sup.start(router, workdir)
        _wait(sup, [router], 120.0, stop)
        host = "localhost" if args.host in ("127.0.0.1", "0.0.0.0", "::") else args.host
        url = f"http://{host}:{args.port}"
        sup.say("up", f"ready: {url}  (OpenAI API at {url}/v1; Ctrl-C stops everything)")
        body = json.dumps({"model": args.model, "prompt": "The capital of France is", "max_tokens": 16})
        sup.say("up", f"try:  curl {url}/v1/completions -H 'Content-Type: application/json' -d '{body}'")
        while not stop.is_set():
            gone = sup.dead()
            if gone is not None:
                sup.say("up", f"{gone.name} exited with code {gone.proc.returncode}: stopping everything")
                code = 1
                break
            stop.wait(0.5)
    except (RuntimeError, TimeoutError) as exc:
        sup.say("up", f"start-up failed: {exc}")
        code = 1
    except _Interrupted:
        pass
    finally:
        sup.say("up", "stopping")
        sup.stop()
    return code


class _Interrupted(Exception):
    pass


def _wait(sup: Supervisor, parts: list[Part], timeout_s: float, stop: threading.Event) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if stop.is_set():
            raise _Interrupted()
        try:
            sup.wait_healthy(parts, min(2.0, max(0.1, deadline - time.monotonic())))
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise
