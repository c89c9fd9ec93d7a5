"""``pdserve up``: the processes it would start, table-driven over flag combinations (nothing is started)."""

from __future__ import annotations

import argparse
import itertools

import pytest

from pdserve.cli import up


def args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    up.add_arguments(parser)
    return parser.parse_args(list(argv))


def plan(*argv: str):
    ports = itertools.count(20000)
    return up.plan(args(*argv), port_of=lambda: next(ports), kv_path="/tmp/kv")


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


CASES = [
    # (id, argv, expected part names, connector flag expectations on engines)
    ("default", [], ["prefill-0", "decode-0", "router"], {"--kv-connector": "shared-fs", "--kv-path": "/tmp/kv"}),
    ("two-two", ["--prefill", "2", "--decode", "2"], ["prefill-0", "prefill-1", "decode-0", "decode-1", "router"],
     {"--kv-connector": "shared-fs"}),
    ("decode-only", ["--prefill", "0", "--decode", "2"], ["decode-0", "decode-1", "router"], {}),
    ("redis-url", ["--kv-connector", "redis", "--redis-url", "redis://h:1/0"], ["prefill-0", "decode-0", "router"],
     {"--kv-connector": "redis", "--redis-url": "redis://h:1/0"}),
    ("grpc", ["--kv-connector", "grpc"], ["prefill-0", "decode-0", "router"], {"--kv-connector": "grpc"}),
    ("connector-options-forwarded", ["--kv-load-failure-policy", "fail", "--kv-lease", "5"],
     ["prefill-0", "decode-0", "router"], {"--kv-load-failure-policy": "fail", "--kv-lease": "5.0"}),
]


@pytest.mark.parametrize("argv,names,engine_flags", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan(argv, names, engine_flags):
    parts = plan(*argv)
    assert [p.name for p in parts] == names
    for part in parts[:-1]:
        assert part.argv[4] in ("prefill", "decode")
        assert part.health[0] == "grpc"
        for key, value in engine_flags.items():
            assert flag(part.argv, key) == value
    router = parts[-1]
    assert router.health == ("http", "http://127.0.0.1:8000/health")
    # Every engine is known to the router by its gRPC address, under its own name.
    for part in parts[:-1]:
        role = part.name.split("-")[0]
        entries = router.argv[router.argv.index(f"--{role}") + 1:]
        assert any(e.startswith(f"grpc://127.0.0.1:{flag(part.argv, '--grpc-port')}") and e.endswith(part.name)
                   for e in entries)


def test_local_redis_is_started_first_when_no_url(monkeypatch):
    monkeypatch.setattr(up.shutil, "which", lambda name: "/usr/bin/redis-server")
    parts = plan("--kv-connector", "redis")
    assert parts[0].name == "redis" and parts[0].health[0] == "tcp"
    port = flag(parts[0].argv, "--port")
    assert flag(parts[1].argv, "--redis-url") == f"redis://127.0.0.1:{port}/0"


def test_redis_without_server_or_url_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(up.shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="apt-get install redis-server"):
        plan("--kv-connector", "redis")


def test_monolithic_engines_carry_no_connector():
    parts = plan("--prefill", "0", "--decode", "2", "--decode-command", "serve")
    assert all("--kv-connector" not in p.argv for p in parts[:-1])
    assert "--both" in parts[-1].argv


@pytest.mark.parametrize("argv", [["--decode", "0"], ["--prefill", "-1"]])
def test_bad_counts(argv):
    with pytest.raises(ValueError):
        plan(*argv)


def test_engine_settings_the_router_must_share_are_forwarded():
    router = plan("--engine-args", "--device cpu --max-model-len 1024")[-1]
    assert flag(router.argv, "--max-model-len") == "1024"
    assert "--device" not in router.argv


def test_each_run_hands_its_own_secret_to_the_parts_in_the_environment():
    import io
    import sys
    import time

    from pdserve.engine.security import SECRET_ENV, SECRET_FILE_ENV, ClusterSecret

    secret = ClusterSecret.generate()
    env = up.child_environment(secret, {SECRET_FILE_ENV: "/elsewhere", SECRET_ENV: "old-secret-0123456789", "K": "v"})
    assert env[SECRET_ENV] == secret.to_text() and SECRET_FILE_ENV not in env and env["K"] == "v"
    for part in plan():  # never on a command line, where ps shows it
        assert not any(secret.to_text() in a or "SECRET" in a for a in part.argv)
    seen = []
    for _ in range(2):  # a real child of each of two runs: each gets its run's secret
        out = io.StringIO()
        sup = up.Supervisor([up.Part("probe", [sys.executable, "-c", f"import os; print(os.environ['{SECRET_ENV}'])"],
                                     ("tcp", "127.0.0.1:1"))], out=out)
        sup.start(sup.parts[0], "/tmp")
        sup.parts[0].proc.wait(30)
        sup.stop()
        for _ in range(500):  # the log pump thread may still be copying the line
            if "\n" in out.getvalue():
                break
            time.sleep(0.01)
        seen.append(ClusterSecret.from_text(out.getvalue().split("] ", 1)[1].strip()).fingerprint())
    assert seen[0] != seen[1]


def util(part) -> str | None:
    return up._flag_value(part.argv, "--gpu-memory-utilization")


@pytest.mark.parametrize("argv,expected", [
    ([], ["0.45", "0.9"]),  # 1 prefill + 1 decode: each half of 90 %, cumulative in start order
    (["--prefill", "2", "--decode", "1"], ["0.3", "0.6", "0.9"]),
    (["--prefill", "3", "--decode", "4"], ["0.1286", "0.2571", "0.3857", "0.5143", "0.6429", "0.7714", "0.9"]),
    (["--prefill", "0", "--decode", "1"], ["0.9"]),
    (["--engine-args", "--device cpu"], [None, None]),  # no GPU: nothing to split
    (["--engine-args=--device=cpu"], [None, None]),
    (["--engine-args", "--device cpu", "--decode-args", "--device cuda"], [None, "0.9"]),  # only the GPU engine
    (["--engine-args", "--gpu-memory-utilization 0.5"], ["0.5", "0.5"]),  # the user's own setting stays alone
    (["--decode-args=--gpu-memory-utilization=0.7"], [None, "0.7"]),
    (["--prefill-args", "--gpu-memory-utilization 0.2"], ["0.2", None]),
])
def test_engines_on_one_gpu_split_its_memory_evenly(argv, expected):
    engines = plan(*argv)[:-1]
    assert [util(p) for p in engines] == expected
    assert "--gpu-memory-utilization" not in plan(*argv)[-1].argv  # the router holds no GPU memory


def test_prefill_args_reach_prefill_pods_only():
    parts = plan("--prefill-args", "--max-num-seqs 7", "--decode-args", "--max-num-seqs 9")
    assert [flag(p.argv, "--max-num-seqs") for p in parts] == ["7", "9", None]


def test_the_redis_server_gets_no_memory_share(monkeypatch):
    monkeypatch.setattr(up.shutil, "which", lambda name: "/usr/bin/redis-server")
    parts = plan("--kv-connector", "redis")
    assert [util(p) for p in parts] == [None, "0.45", "0.9", None]


@pytest.mark.parametrize("argv,mode,waves", [
    ([], "auto", [["prefill-0"], ["decode-0"]]),  # on a GPU (or maybe): one after the other
    (["--engine-args", "--device cpu"], "auto", [["prefill-0", "decode-0"]]),
    (["--engine-args", "--device cpu", "--decode-args", "--device cuda:0"], "auto", [["prefill-0"], ["decode-0"]]),
    (["--engine-args", "--device cpu"], "sequential", [["prefill-0"], ["decode-0"]]),
    (["--prefill", "2"], "parallel", [["prefill-0", "prefill-1", "decode-0"]]),
])
def test_start_waves(argv, mode, waves):
    parts = plan(*argv)
    assert [[p.name for p in wave] for wave in up.start_waves(parts, mode)] == waves


def test_redis_starts_in_the_first_wave(monkeypatch):
    monkeypatch.setattr(up.shutil, "which", lambda name: "/usr/bin/redis-server")
    parts = plan("--kv-connector", "redis", "--engine-args", "--device cpu")
    assert [[p.name for p in w] for w in up.start_waves(parts, "auto")] == [["redis", "prefill-0", "decode-0"]]
    assert [[p.name for p in w] for w in up.start_waves(parts, "sequential")] == [["redis"], ["prefill-0"],
                                                                                 ["decode-0"]]
