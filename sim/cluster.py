"""A cluster of simulated prefill and decode pods in virtual time, with faults and the autoscaler.

One process, one event queue: every pod is a :class:`SimEngineCore` (the real scheduler and KV cache manager) on
its own :class:`VirtualClock`; an event runs one engine step, which advances that pod's clock by the cost model's
step time. Nothing sleeps, so a 100-pod, 10-minute trace runs as fast as the schedulers can step (minutes on one
core) — this is how ``pdserve sim`` reaches 100+ pods on a laptop, where 100 ``pdserve sim-engine`` processes
would not fit. The HTTP/gRPC path of a pod is ``pdserve sim-engine``'s; here requests enter the cores directly.

Routing follows the router's disaggregated flow: a request goes to the prefill pod with the least queued prompt
tokens, its first token comes back from prefill (TTFT), and the KV handle goes with it to the decode pod with the
fewest sequences, which loads it over the simulated connector (faults apply) and streams the rest. With
``prefill=0`` every pod serves both roles (colocated). Pods that start (scale-up, a replacement for a killed pod)
take ``startup_s`` to become ready; a pod scaled down drains: it takes no new request and leaves when empty.
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field
from typing import Any

from pdserve.engine.config import EngineConfig
from pdserve.engine.engine_core import EngineCoreRequest
from pdserve.engine.sampling_params import SamplingParams
from pdserve.operator.autoscaler import AutoscalerState, AutoscalingPolicy, Decision, Observation, decide
from pdserve.sim.clock import VirtualClock
from pdserve.sim.core import SimEngineCore
from pdserve.sim.cost_model import CostProfile
from pdserve.sim.kv import KVFaults
from pdserve.sim.workload import TraceRequest


@dataclass(frozen=True)
class ClusterConfig:
    """What ``pdserve sim`` simulates. ``prefill=0``: ``decode`` colocated pods serving both roles."""

    profile: CostProfile
    prefill: int
    decode: int
    model: str | None = None  # the engine's shapes (vocabulary, KV descriptor); default: the profile's model preset
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 8192
    faults: KVFaults = KVFaults()
    load_failure_policy: str = "recompute"
    kill_decode_every_s: float = 0.0
    startup_s: float = 30.0
    autoscaling: AutoscalingPolicy | None = None
    seed: int = 0


@dataclass
class SimRequest:
    id: str
    trace: TraceRequest
    tokens: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    error: str | None = None
    done: bool = False
    decode_pod: str | None = None
    handle: dict | None = None  # the prefill's KV handle, for the decode pod
    waiting_for: str | None = None  # the role it waits for in the router's queue


@dataclass
class _Pod:
    name: str
    role: str  # prefill | decode | both
    core: SimEngineCore
    ready_at: float
    state: str = "starting"  # starting | ready | draining | gone
    requests: dict[str, SimRequest] = field(default_factory=dict)
    stepping: bool = False
    prompt_tokens: int = 0  # prompt tokens of the requests it holds (the router's prefill load signal)
    # window counters for the autoscaler
    busy_mark: float = 0.0
    computed_mark: int = 0
    batch_sum: float = 0.0
    step_sum: float = 0.0
    steps: int = 0


class Cluster:
    """Runs a trace through the pods; :meth:`run` returns the finished :class:`SimRequest` list."""

    def __init__(self, cfg: ClusterConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self._events: list[tuple[float, int, str, Any]] = []
        self._seq = itertools.count()
        self.now = 0.0
        kw = dict(max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
                  max_model_len=cfg.max_model_len, block_size=cfg.profile.block_size)
        # No weights and no tokenizer are needed: the model's shape preset (load_format dummy) gives the sizes.
        self._configs = {role: EngineConfig.create(cfg.model or cfg.profile.model, load_format="dummy", role=role, **kw)
                         for role in (("prefill", "decode") if cfg.prefill else ("both",))}
        self.pods: dict[str, _Pod] = {}
        self._names = itertools.count()
        self.router_queue: list[SimRequest] = []  # requests waiting for any ready pod of their role
        self.gpu_seconds = 0.0
        self.timeline: list[tuple[float, int, int]] = []  # (time, prefill pods, decode pods) after each change
        self.decisions: list[tuple[float, Decision]] = []
        self.kills = 0
        self.remaining = 0
        self.requests: list[SimRequest] = []
        self._end_s = 0.0
        self._state = AutoscalerState()
        self._window: dict[str, Any] = {"arrived": 0.0, "ttfts": [], "gaps": []}
        roles = ("prefill", "decode") if cfg.prefill else ("both",)
        counts = (cfg.prefill, cfg.decode) if cfg.prefill else (cfg.decode,)
        for role, n in zip(roles, counts):
            for _ in range(n):
                self._add_pod(role, ready_at=0.0)
        self._record_timeline()

    # ------------------------------------------------------------------ pods
    def _add_pod(self, role: str, ready_at: float) -> _Pod:
        name = f"{role}-{next(self._names)}"
        core = SimEngineCore(self._configs[role], self.cfg.profile, clock=VirtualClock(ready_at),
                             faults=KVFaults(**{**self.cfg.faults.__dict__, "seed": self.rng.getrandbits(32)}),
                             pod=name, load_failure_policy=self.cfg.load_failure_policy)
        pod = _Pod(name, role, core, ready_at)
        self.pods[name] = pod
        self._push(ready_at, "ready", pod)
        return pod

    def _live(self, role: str, states: tuple[str, ...] = ("ready",)) -> list[_Pod]:
        return [p for p in self.pods.values() if p.role == role and p.state in states]

    def _record_timeline(self) -> None:
        alive = ("starting", "ready", "draining")
        decode_role = "decode" if self.cfg.prefill else "both"
        self.timeline.append((self.now, len(self._live("prefill", alive)), len(self._live(decode_role, alive))))

    # ------------------------------------------------------------------ events
    def _push(self, t: float, kind: str, data: Any) -> None:
        heapq.heappush(self._events, (t, next(self._seq), kind, data))

    def run(self, trace: list[TraceRequest]) -> list[SimRequest]:
        """Simulate ``trace`` to the end; every request ends answered or with an error."""
        self.start(trace)
        self.advance(None)
        return self.finish()

    def start(self, trace: list[TraceRequest]) -> list[SimRequest]:
        """Queue the trace (and the faults and autoscaler ticks); :meth:`advance` runs it."""
        self.requests = [SimRequest(f"r{i}", tr) for i, tr in enumerate(trace)]
        for r in self.requests:
            self._push(r.trace.arrival_s, "arrive", r)
        self._end_s = trace[-1].arrival_s if trace else 0.0
        if self.cfg.kill_decode_every_s > 0:
            self._push(self.cfg.kill_decode_every_s, "kill", None)
        if self.cfg.autoscaling is not None:
            self._push(self.cfg.autoscaling.interval_s, "tick", None)
        self.remaining = len(self.requests)
        return self.requests

    def advance(self, until: float | None) -> None:
        """Run the events up to virtual time ``until`` (None: until every request has ended)."""
        while self._events and self.remaining and (until is None or self._events[0][0] <= until):
            t, _, kind, data = heapq.heappop(self._events)
            alive = sum(1 for p in self.pods.values() if p.state != "gone")
            self.gpu_seconds += alive * (t - self.now)
            self.now = t
            if kind == "arrive":
                self._window["arrived"] += data.trace.num_prompt_tokens
                self._dispatch(data, "prefill" if self.cfg.prefill else "both")
            elif kind == "step":
                self._step(data)
            elif kind == "handoff":
                self._dispatch(data, "decode", data.handle)
            elif kind == "ready":
                if data.state == "starting":
                    data.state = "ready"
                    self._drain_router_queue()
            elif kind == "kill" and t <= self._end_s:
                self._kill_a_decode_pod()
                self._push(t + self.cfg.kill_decode_every_s, "kill", None)
            elif kind == "tick" and t <= self._end_s + 60:
                self._autoscale()
                self._push(t + self.cfg.autoscaling.interval_s, "tick", None)  # type: ignore[union-attr]
        if until is not None and until > self.now:
            alive = sum(1 for p in self.pods.values() if p.state != "gone")
            self.gpu_seconds += alive * (until - self.now)
            self.now = until

    def finish(self) -> list[SimRequest]:
        """End what never got served (no pod of its role came up) and return every request."""
        for r in self.requests:
            if not r.done:
                self._end(r, "never served: no pod of its role became ready")
        return self.requests

    def _end(self, req: SimRequest, error: str | None = None) -> None:
        req.error, req.done = error, True
        self.remaining -= 1

    def _dispatch(self, req: SimRequest, role: str, handle: dict | None = None) -> None:
        pods = self._live(role)
        if not pods:
            self.router_queue.append(req)
            req.waiting_for = role
            return
        if role == "prefill":
            pod = min(pods, key=lambda p: p.prompt_tokens)
        else:
            pod = min(pods, key=lambda p: len(p.requests))
        prompt = list(req.trace.prompt) + (req.tokens[:1] if role == "decode" else [])
        max_tokens = 1 if role == "prefill" else req.trace.max_tokens - (1 if role == "decode" else 0)
        if role != "prefill":
            req.decode_pod = pod.name
        pod.requests[req.id] = req
        pod.prompt_tokens += req.trace.num_prompt_tokens
        pod.core.add_request(EngineCoreRequest(req.id, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                                               kv_transfer_params=handle))
        if not pod.stepping:
            pod.stepping = True
            pod.core.clock.advance_to(max(pod.core.clock.now(), self.now))
            self._push(pod.core.clock.now(), "step", pod)

    def _drain_router_queue(self) -> None:
        queued, self.router_queue = self.router_queue, []
        for req in queued:
            self._dispatch(req, req.waiting_for or "prefill", req.handle)

    def _step(self, pod: _Pod) -> None:
        """One engine step of ``pod``, and what its outputs set off."""
        if pod.state == "gone":
            return
        core = pod.core
        core.clock.advance_to(max(core.clock.now(), self.now))
        start, running = core.clock.now(), core.scheduler.num_running
        outputs = core.step()
        t = core.clock.now()
        if core.runner.last_step_s and t > start:
            pod.steps += 1
            pod.batch_sum += running
            pod.step_sum += t - start
        for out in outputs:
            self._on_output(pod, out, t)
        if core.has_unfinished_requests():
            self._push(t if t > start else start + 1e-3, "step", pod)
        else:
            pod.stepping = False
            if pod.state == "draining" and not pod.requests:
                pod.state = "gone"
                self._record_timeline()

    def _on_output(self, pod: _Pod, out: Any, t: float) -> None:
        req = pod.requests.get(out.request_id)
        if req is None:
            return
        if out.new_token_ids:
            for tok in out.new_token_ids:
                if req.token_times:
                    self._window["gaps"].append(t - req.token_times[-1])
                else:
                    self._window["ttfts"].append(t - req.trace.arrival_s)
                req.tokens.append(tok)
                req.token_times.append(t)
        if out.finish_reason is None:
            return
        del pod.requests[req.id]
        pod.prompt_tokens -= req.trace.num_prompt_tokens
        if out.finish_reason == "abort":
            self._end(req, f"{pod.name}: {out.stop_reason or 'aborted'}")
        elif pod.role == "prefill" and req.trace.max_tokens > 1:
            req.handle = out.kv_transfer_params
            self._push(t, "handoff", req)  # at the step's end: this event runs at its start
        else:
            self._end(req)

    # ------------------------------------------------------------------ faults and scaling
    def _kill_a_decode_pod(self) -> None:
        role = "decode" if self.cfg.prefill else "both"
        victims = self._live(role, ("ready", "draining"))
        if not victims:
            return
        pod = self.rng.choice(victims)
        was_draining = pod.state == "draining"
        pod.state = "gone"
        self.kills += 1
        for req in list(pod.requests.values()):
            self._end(req, f"decode pod {pod.name} was killed mid-request")
        pod.requests.clear()
        if not was_draining:  # its Deployment replaces it
            self._add_pod(role, ready_at=self.now + self.cfg.startup_s)
        self._record_timeline()

    def observe(self, window_s: float, percentile: float) -> Observation:
        """The autoscaler's view of the last ``window_s`` (what the pods' metrics would say)."""
        w, win = window_s, self._window
        pre, dec = self._live("prefill", ("ready",)), self._live("decode", ("ready",))
        busy = computed = queued = 0.0
        for p in pre:
            busy += p.core.runner.busy_s - p.busy_mark
            computed += p.core.num_computed_tokens_total - p.computed_mark
            p.busy_mark, p.computed_mark = p.core.runner.busy_s, p.core.num_computed_tokens_total
            for r in p.requests.values():  # prompt tokens not computed yet
                engine_req = p.core.scheduler.get_request(r.id)
                queued += r.trace.num_prompt_tokens - (engine_req.num_computed_tokens if engine_req else 0)
        samples = tuple((p.batch_sum / p.steps, p.step_sum / p.steps) for p in dec if p.steps)
        for p in dec:
            p.batch_sum = p.step_sum = 0.0
            p.steps = 0
        n_arrived = max(1, len(win["ttfts"]))
        obs = Observation(
            window_s=w, prefill_pods=len(pre), decode_pods=len(dec), arrived_prompt_tokens=win["arrived"],
            queued_prompt_tokens=queued, prefill_computed_tokens=computed, prefill_busy_s=busy,
            ttft_p=_quantile(win["ttfts"], percentile), decode_sequences=float(sum(len(p.requests)
                                                                                         for p in dec)),
            itl_p=_quantile(win["gaps"], percentile), itl_samples=samples,
            kv_usage=max((p.core.scheduler.kv_cache_manager.usage for p in dec), default=0.0),
            mean_prompt_tokens=win["arrived"] / n_arrived)
        self._window = {"arrived": 0.0, "ttfts": [], "gaps": []}
        return obs

    def _autoscale(self) -> None:
        policy = self.cfg.autoscaling
        assert policy is not None
        decision = decide(policy, self._state, self.observe(policy.interval_s, policy.percentile), self.now)
        self.decisions.append((self.now, decision))
        if not policy.dry_run:
            self.scale_to("prefill", decision.prefill)
            self.scale_to("decode", decision.decode)

    def scale_to(self, role: str, want: int) -> None:
        """Start pods (ready after ``startup_s``) or drain the emptiest ones until ``want`` remain."""
        alive = self._live(role, ("starting", "ready"))
        for _ in range(want - len(alive)):
            self._add_pod(role, ready_at=self.now + self.cfg.startup_s)
        for pod in sorted(alive, key=lambda p: (p.state == "ready", len(p.requests)))[:max(0, len(alive) - want)]:
            pod.state = "draining" if pod.requests or pod.stepping else "gone"
        self._record_timeline()


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]
