"""Fault tests with real engine processes behind an in-process router (acceptance 3 of the router issue).

Engines are ``pdserve serve`` processes (the bundled model on CPU); the router runs in the test's event loop with
its real gRPC pod backend, health checker and retry logic. Each test kills or restarts processes it started
itself, by pid, and checks the client-visible tokens against an undisturbed run: nothing lost, nothing hung.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from pdserve.engine.sampling_params import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

LAUNCH = "import sys; from pdserve.cli.main import main; sys.exit(main(sys.argv[1:]))"
MODEL = "smollm2-135m-instruct"


def free_port() -> int:
    from pdserve.cli.local_servers import free_port

    return free_port()


class Engine:
    """One engine process (``serve``, ``prefill`` or ``decode``) on fixed ports (a restart comes back at the same
    address)."""

    def __init__(self, name: str, workdir: str, command: str = "serve", extra: tuple[str, ...] = ()) -> None:
        self.name, self.workdir, self.command, self.extra = name, workdir, command, extra
        self.http, self.grpc, self.events = free_port(), free_port(), free_port()
        self.proc: subprocess.Popen | None = None
        self.log = open(os.path.join(workdir, f"{name}.log"), "ab")

    def start(self) -> "Engine":
        argv = [sys.executable, "-c", LAUNCH, self.command, "--model", MODEL, "--device", "cpu", "--host", "127.0.0.1",
                "--port", str(self.http), "--grpc-port", str(self.grpc), "--max-model-len", "512",
                "--cpu-kv-cache-gib", "0.25", "--max-num-seqs", "8", "--log-level", "warning",
                "--kv-events-endpoint", f"tcp://127.0.0.1:{self.events}", *self.extra]
        self.proc = subprocess.Popen(argv, cwd=self.workdir, stdout=self.log, stderr=subprocess.STDOUT)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


@pytest.fixture(scope="module")
def tokenizer():
    from pdserve.engine.model_loader import resolve_model
    from pdserve.engine.frontend.tokenizer import load_tokenizer

    return load_tokenizer(resolve_model(MODEL).tokenizer_path)


@pytest.fixture
def engines(tmp_path):
    started: list[Engine] = []

    def make(n: int, command: str = "serve", extra: tuple[str, ...] = ()) -> list[Engine]:
        prefix = {"serve": "engine", "prefill": "prefill", "decode": "decode"}[command]
        new = [Engine(f"{prefix}-{len(started) + i}", str(tmp_path), command, extra).start() for i in range(n)]
        started.extend(new)
        return new

    yield make
    for e in started:
        e.stop()


async def start_router(engines_, tokenizer, routing=None):
    from pdserve.engine.security import load_cluster_secret
    from pdserve.services.api.settings import ServerSettings
    from pdserve.services.router.discovery import StaticDiscovery, static_endpoints
    from pdserve.services.router.engine import ModelInfo
    from pdserve.services.router.routing_config import preset
    from pdserve.services.router.sequence import RetryPolicy
    from pdserve.services.router.server import RouterConfig, start_router as start
    from pdserve.services.router.cli import router_hash_seed

    def entries(command: str) -> list[str]:
        return [f"grpc://127.0.0.1:{e.grpc},events=tcp://127.0.0.1:{e.events},name={e.name}"
                for e in engines_ if e.command == command]

    pods = static_endpoints(entries("prefill"), entries("decode"), entries("serve"))
    config = RouterConfig(model=ModelInfo(MODEL, 512, len(tokenizer), tokenizer.eos_token_id),
                          settings=ServerSettings((MODEL,)), discovery=StaticDiscovery(pods),
                          routing=routing or preset("prefix-load"), retry=RetryPolicy(max_attempts=4, no_pod_wait_s=10),
                          health_interval_s=0.3,
                          # The engines (pdserve CLIs) seed their block hashes from the cluster secret.
                          hash_seed=router_hash_seed(None, load_cluster_secret()), cluster_secret=load_cluster_secret())
    return await start(config, tokenizer)


async def wait_ready(running, n: int, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while sum(p.ready for p in running.pods.all()) < n:
        assert time.monotonic() < end, "engines did not become healthy"
        await asyncio.sleep(0.2)


PROMPT = "Write a long story about a lighthouse keeper who finds a strange map. Once upon a time,"


async def generate(engine, tokenizer, max_tokens: int, on_token=None) -> list[int]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    tokens: list[int] = []
    async for out in engine.generate(tokenizer(PROMPT).input_ids, params):
        tokens.extend(out.outputs[0].token_ids)
        if on_token is not None:
            await on_token(len(tokens))
    return tokens


async def test_decode_pod_killed_mid_stream_resumes_and_a_restarted_pod_gets_traffic(engines, tokenizer):
    pool = engines(2)
    running = await start_router(pool, tokenizer)
    try:
        await wait_ready(running, 2)
        reference = await generate(running.engine, tokenizer, 48)
        # The engines' KV events reached the router: the pod that served the prompt holds its blocks, exactly.
        prompt_hashes = running.router.hasher.hash_prompt(tokenizer(PROMPT).input_ids)
        for _ in range(50):
            matched = running.router.deps.prefix.exact.match(prompt_hashes, [e.name for e in pool])
            if max(matched.values()) == len(prompt_hashes) > 0:
                break
            await asyncio.sleep(0.1)
        assert max(matched.values()) == len(prompt_hashes) > 0, matched
        assert all(p.events_live() and p.load is not None for p in running.pods.all())
        # The first call opened that pod's Deltas subscription: the next stream's tokens come over it, and the
        # kill below loses it mid-sequence (services/router/delta_mux.py).
        for _ in range(50):
            subs = running.backend.subscriptions
            if any(s.ready for s in subs.values()):
                break
            await asyncio.sleep(0.1)
        victim: list[str] = []
        lost = []

        async def kill_serving_pod(n_tokens: int) -> None:
            if n_tokens >= 8 and not victim:
                busy = next(p for p in running.pods.all() if p.in_flight > 0)
                victim.append(busy.name)
                lost.append(subs[busy.endpoint.grpc_target])
                next(e for e in pool if e.name == busy.name).kill()

        resumed = await asyncio.wait_for(generate(running.engine, tokenizer, 48, kill_serving_pod), 120)
        assert victim, "the stream finished before a pod could be killed"
        assert lost[0].closed and lost[0].items >= 8, "the killed stream did not come over the subscription"
        assert resumed == reference  # one unbroken stream, token for token
        assert running.router.metrics.resumes._value.get() == 1
        assert all(p.in_flight == 0 for p in running.pods.all())
        # Under load with one pod down, every request still succeeds.
        results = await asyncio.gather(*(generate(running.engine, tokenizer, 8) for _ in range(4)))
        assert all(r == reference[:8] for r in results)
        # The killed pod comes back at the same address: health checks return it to rotation and it serves.
        dead = next(e for e in pool if e.name == victim[0])
        dead.start()
        await wait_ready(running, 2)
        before = _requests_to(running, dead.name)
        prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(6)]
        await asyncio.gather(*(_complete(running.engine, tokenizer, p) for p in prompts))
        assert _requests_to(running, dead.name) > before, "the restarted pod got no traffic"
    finally:
        await running.stop()


async def _complete(engine, tokenizer, prompt: str) -> None:
    async for _ in engine.generate(tokenizer(prompt).input_ids, SamplingParams(max_tokens=4, temperature=0.0)):
        pass


async def _kv_usage(engine: Engine) -> float:
    import urllib.request

    def read() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{engine.http}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                    if line.startswith("pdserve:kv_cache_usage_perc"))

    for _ in range(20):  # the gauge follows the engine's steps
        usage = await asyncio.to_thread(read)
        if usage == 0.0:
            break
        await asyncio.sleep(0.2)
    return usage


def _requests_to(running, pod: str) -> float:
    return running.router.metrics.pod_requests.labels(pod)._value.get()


LONG = [f"Tenant {t}: " + " ".join(f"rule {i} says item {i * t} is fine." for i in range(12)) + " Question: why?"
        for t in range(6)]


async def _answer(engine, tokenizer, prompt: str, max_tokens: int = 12) -> list[int]:
    tokens: list[int] = []
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    async for out in engine.generate(tokenizer(prompt).input_ids, params):
        tokens.extend(out.outputs[0].token_ids)
    return tokens


async def test_prefill_pod_killed_under_load_requests_still_succeed(engines, tmp_path, tokenizer):
    from pdserve.services.router.routing_config import parse_routing_spec

    kv = ("--kv-connector", "shared-fs", "--kv-path", str(tmp_path / "kv"))
    pool = engines(1, "prefill", kv) + engines(1, "decode", kv)
    # Remote prefill for every prompt of 32+ tokens, so the prefill pod is on the path of each request.
    routing = parse_routing_spec({"decode": {"scorers": [{"type": "load", "weight": 1}]},
                                  "pd_decider": {"type": "prefix-aware", "min_prompt_tokens": 32,
                                                 "max_cached_fraction": 1.0}})
    running = await start_router(pool, tokenizer, routing)
    try:
        await wait_ready(running, 2)
        reference = [await _answer(running.engine, tokenizer, p) for p in LONG[:2]]
        assert running.router.metrics.pd.labels("remote-prefill", "remote-prefill")._value.get() >= 2

        async def kill_prefill_soon() -> None:
            # Kill it while it is computing a prompt (a Prefill call in flight), i.e. under load.
            while running.pods.get(pool[0].name).in_flight == 0:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            pool[0].kill()

        results = await asyncio.wait_for(asyncio.gather(
            *(_answer(running.engine, tokenizer, p) for p in LONG), kill_prefill_soon()), 180)
        assert results[:2] == reference  # the same greedy answers, with or without the prefill pod
        assert all(len(r) == 12 for r in results[:-1])
        assert all(p.in_flight == 0 for p in running.pods.all())
        retried = sum(s.value for m in running.router.metrics.retries.collect() for s in m.samples
                      if s.name.endswith("_total"))
        assert retried + running.router.metrics.resumes._value.get() >= 1  # the kill did hit a request
        # Afterwards the decode pod alone serves long prompts (decode-only: no prefill pod is ready).
        assert await _answer(running.engine, tokenizer, LONG[0]) == reference[0]
        assert await _kv_usage(pool[1]) == 0.0  # no request left holding blocks on the decode pod
    finally:
        await running.stop()
