"""A cluster of simulated prefill and decode pods in virtual time, with faults and the autoscaler.

One process, one event queue: every pod is a :class:`SimEngineCore` (the real scheduler and KV cache manager) on
its own :class:`VirtualClock`; a step advances that pod's clock by the cost model's step time. Prefill pods step
by events; decode pods step on demand, runs of pure-decode steps fast-forwarded (see :class:`Cluster`). Nothing
sleeps, so a 100-pod trace runs as fast as the schedulers can step — this is how ``pdserve sim`` reaches 100+ pods
on one machine, where 100 ``pdserve sim-engine`` processes would not fit. The HTTP/gRPC path of a pod is
``pdserve sim-engine``'s; here requests enter the cores directly.

Routing follows the router's disaggregated flow: a request goes to the prefill pod with the least queued prompt
tokens, its first token comes back from prefill (TTFT), and the KV handle goes with it to the decode pod with the
fewest sequences, which loads it over the simulated connector (faults apply) and streams the rest. With
``prefill=0`` every pod serves both roles (colocated). Pods that start (scale-up, a replacement for a killed pod)
take ``startup_s`` to become ready; a pod scaled down drains: it takes no new request and leaves when empty.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Any

from pdserve.engine.config import EngineConfig
from pdserve.engine.engine_core import EngineCoreRequest
from pdserve.engine.sampling_params import SamplingParams
from pdserve.operator.autoscaler import (AutoscalerState, AutoscalingPolicy, Decision, Observation, decide,
                                        decide_scale_up)
from pdserve.sim.clock import VirtualClock
from pdserve.sim.core import SimEngineCore
from pdserve.sim.cost_model import CostProfile
from pdserve.sim.fast_decode import FastRun, fast_decode_steps
from pdserve.sim.kv import KVFaults
from pdserve.sim.records import Histogram, SimRequest
from pdserve.sim.workload import TraceRequest

__all__ = ["Cluster", "ClusterConfig", "SimRequest"]


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
    fast_forward: bool = True  # decode pods step lazily, pure-decode steps fast-forwarded (same results)
    record_tokens: bool = False  # keep every token and its time on each SimRequest (tests; memory-hungry)


@dataclass
class _Pod:
    name: str
    role: str  # prefill | decode | both
    core: SimEngineCore
    ready_at: float
    state: str = "starting"  # starting | ready | draining | gone
    requests: dict[str, SimRequest] = field(default_factory=dict)
    stepping: bool = False
    lazy: bool = False  # stepped on demand (see Cluster._catch_up), not by events
    fast_steps: int = 0  # steps that took fast_decode_steps' short path
    quiet_until: float = math.inf  # (lazy pods) no request ends in a step of it that starts before this
    born: float = 0.0
    gone_at: float | None = None
    prompt_tokens: int = 0  # prompt tokens of the requests it holds (the router's prefill load signal)
    # window counters for the autoscaler
    busy_mark: float = 0.0
    steps_mark: int = 0
    computed_mark: int = 0
    batch_sum: float = 0.0
    step_sum: float = 0.0
    steps: int = 0


class Cluster:
    """Runs a trace through the pods; :meth:`run` returns the finished :class:`SimRequest` list.

    Prefill pods step by events. Decode (and colocated) pods are *lazy* with ``fast_forward``: their steps
    create no event for anyone else (no handoff leaves a decode pod), so a pod is stepped only when something
    reads or changes it — a request routed to its role, an autoscaler tick, a kill, the end of the run — and then
    runs every step that starts before that moment, exactly the steps an event loop would have run by then.
    Runs of pure-decode steps take :func:`fast_decode_step`'s short path. The results are those of stepping
    every pod by events (``fast_forward=False``), which ``tests/sim/test_sim_fast_forward.py`` checks.
    """

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
        self.timeline: list[tuple[float, int, int]] = []  # (time, prefill pods, decode pods) after each change
        self.decisions: list[tuple[float, Decision]] = []
        self.kills = 0
        self.remaining = 0
        self.requests: list[SimRequest] = []
        self.itl = Histogram()  # every gap between two tokens of a request
        self._end_s = 0.0
        self._state = AutoscalerState()
        self._quick_mark = 0.0  # when the scale-up check's window began
        self._window: dict[str, Any] = self._new_window()
        self._quick_window: dict[str, Any] = self._new_window()  # since the last scale-up check
        roles = ("prefill", "decode") if cfg.prefill else ("both",)
        counts = (cfg.prefill, cfg.decode) if cfg.prefill else (cfg.decode,)
        for role, n in zip(roles, counts):
            for _ in range(n):
                self._add_pod(role, ready_at=0.0)
        self._record_timeline()

    @staticmethod
    def _new_window() -> dict[str, Any]:
        # arrived / n: prompt tokens and requests at the router; out / nd: max_tokens and sequences entering
        # decode (what a decode pod's pdserve:requested_output_tokens and TTFT count say); pout: max_tokens of
        # requests entering prefill (the prefill pods' requested_output_tokens); fin_out / fin_max:
        # generated and asked-for tokens of requests finished on decode pods (pdserve:request_generation_tokens /
        # pdserve:request_params_max_tokens)
        return {"arrived": 0.0, "n": 0, "out": 0.0, "pout": 0.0, "nd": 0, "fin_out": 0.0, "fin_max": 0.0, "ttfts": [],
                "gaps": Histogram()}

    # ------------------------------------------------------------------ pods
    def _add_pod(self, role: str, ready_at: float) -> _Pod:
        name = f"{role}-{next(self._names)}"
        core = SimEngineCore(self._configs[role], self.cfg.profile, clock=VirtualClock(ready_at),
                             faults=KVFaults(**{**self.cfg.faults.__dict__, "seed": self.rng.getrandbits(32)}),
                             pod=name, load_failure_policy=self.cfg.load_failure_policy)
        pod = _Pod(name, role, core, ready_at, lazy=self.cfg.fast_forward and role != "prefill", born=self.now)
        self.pods[name] = pod
        self._push(ready_at, "ready", pod)
        return pod

    def _live(self, role: str, states: tuple[str, ...] = ("ready",)) -> list[_Pod]:
        return [p for p in self.pods.values() if p.role == role and p.state in states]

    def _record_timeline(self, t: float | None = None) -> None:
        alive = ("starting", "ready", "draining")
        decode_role = "decode" if self.cfg.prefill else "both"
        self.timeline.append((self.now if t is None else t, len(self._live("prefill", alive)),
                              len(self._live(decode_role, alive))))

    def _gone(self, pod: _Pod, t: float) -> None:
        pod.state, pod.gone_at = "gone", t
        self._record_timeline(t)

    @property
    def end_s(self) -> float:
        """When the last request ended (answered or failed); the run's end for GPU accounting."""
        return max((r.ended_s for r in self.requests if r.done), default=self.now)

    @property
    def gpu_seconds(self) -> float:
        """GPU-seconds of every pod from its creation (start-up included) until it left or the run ended."""
        end = self.end_s
        return sum(max(0.0, min(end, end if p.gone_at is None else p.gone_at) - p.born) for p in self.pods.values())

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
        record = self.cfg.record_tokens
        self.requests = [SimRequest(f"r{i}", tr, tokens=[] if record else None, token_times=[] if record else None)
                         for i, tr in enumerate(trace)]
        for r in self.requests:
            self._push(r.trace.arrival_s, "arrive", r)
        self._end_s = trace[-1].arrival_s if trace else 0.0
        if self.cfg.kill_decode_every_s > 0:
            self._push(self.cfg.kill_decode_every_s, "kill", None)
        if self.cfg.autoscaling is not None:
            self._push(self.cfg.autoscaling.interval_s, "tick", None)
            if self.cfg.autoscaling.scale_up_interval_s is not None:
                self._push(self.cfg.autoscaling.scale_up_interval_s, "uptick", None)
        self.remaining = len(self.requests)
        return self.requests

    def advance(self, until: float | None) -> None:
        """Run the events up to virtual time ``until`` (None: until every request has ended)."""
        while self._events and self.remaining and (until is None or self._events[0][0] <= until):
            t, _, kind, data = heapq.heappop(self._events)
            self.now = t
            if kind in ("kill", "tick", "uptick"):
                self._catch_up_all(t)
                if not self.remaining:
                    break  # the last request ended in a step that began before this event
            if kind == "arrive":
                self._window["arrived"] += data.trace.num_prompt_tokens
                self._quick_window["arrived"] += data.trace.num_prompt_tokens
                self._quick_window["n"] += 1
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
            elif kind == "uptick" and t <= self._end_s + 60:
                self._autoscale_check()
                self._push(t + self.cfg.autoscaling.scale_up_interval_s, "uptick", None)  # type: ignore
        if self.remaining:  # lazy pods run on to ``until`` (or until they are idle)
            self._catch_up_all(math.inf if until is None else until)
        if until is not None and until > self.now:
            self.now = until

    def finish(self) -> list[SimRequest]:
        """End what never got served (no pod of its role came up) and return every request."""
        for r in self.requests:
            if not r.done:
                self._end(r, "never served: no pod of its role became ready")
        self.timeline.sort(key=lambda row: row[0])
        return self.requests

    def _end(self, req: SimRequest, error: str | None = None, t: float | None = None) -> None:
        if error is None and req.decode_pod is not None and self.cfg.prefill:
            n = req.trace.max_tokens - 1  # what the decode pod was asked for and generated (never EOS)
            self._window["fin_out"] += n
            self._window["fin_max"] += n
        req.error, req.done = error, True
        req.ended_s = self.now if t is None else t
        self.remaining -= 1

    def _dispatch(self, req: SimRequest, role: str, handle: dict | None = None) -> None:
        pods = self._live(role)
        if not pods:
            self.router_queue.append(req)
            req.waiting_for = role
            return
        for p in pods:  # the choice reads their sequence counts as of now
            if p.quiet_until < self.now:
                self._catch_up(p, self.now)
        if role == "prefill":
            pod = min(pods, key=lambda p: p.prompt_tokens)
        else:
            pod = min(pods, key=lambda p: len(p.requests))
        self._catch_up(pod, self.now)  # its steps before now run without the new request
        pod.quiet_until = -math.inf
        prompt = list(req.trace.prompt)
        if role == "decode":
            prompt.append(req.first_token)  # type: ignore[arg-type]
        max_tokens = 1 if role == "prefill" else req.trace.max_tokens - (1 if role == "decode" else 0)
        if role != "prefill":
            req.decode_pod = pod.name
        if role == "prefill":  # a prefill pod is sent the request's max_tokens (it stops after the first)
            self._window["pout"] += req.trace.max_tokens
            self._quick_window["pout"] += req.trace.max_tokens
        if role == "decode":
            self._window["out"] += max_tokens
            self._quick_window["out"] += max_tokens
            self._window["nd"] += 1
            self._quick_window["nd"] += 1
        pod.requests[req.id] = req
        pod.prompt_tokens += req.trace.num_prompt_tokens
        pod.core.add_request(EngineCoreRequest(req.id, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                                               kv_transfer_params=handle))
        if not pod.stepping:
            pod.stepping = True
            pod.core.clock.advance_to(max(pod.core.clock.now(), self.now))
            if not pod.lazy:
                self._push(pod.core.clock.now(), "step", pod)

    def _drain_router_queue(self) -> None:
        queued, self.router_queue = self.router_queue, []
        for req in queued:
            self._dispatch(req, req.waiting_for or "prefill", req.handle)

    def _step(self, pod: _Pod) -> None:
        """A step event of a pod stepped by events."""
        if pod.state == "gone":
            return
        pod.core.clock.advance_to(max(pod.core.clock.now(), self.now))
        self._run_step(pod)
        if pod.stepping:
            self._push(pod.core.clock.now(), "step", pod)

    def _catch_up(self, pod: _Pod, t: float) -> None:
        """Run a lazy pod's steps that start before ``t`` (those an event loop would have run by ``t``)."""
        if not pod.lazy:
            return
        while pod.stepping and pod.state != "gone" and pod.core.clock.now() < t:
            self._run_step(pod, t)

    def _catch_up_all(self, t: float) -> None:
        for pod in list(self.pods.values()):
            self._catch_up(pod, t)

    def _run_step(self, pod: _Pod, until: float = math.inf) -> None:
        """One engine step of ``pod`` at its clock (a lazy pod: a run of pure-decode steps that start before
        ``until``, or one general step), and what its outputs set off."""
        core = pod.core
        start, running = core.clock.now(), core.scheduler.num_running
        fast = fast_decode_steps(core, until) if pod.lazy else None
        if fast is not None:
            t = fast.step_ends[-1]
            pod.quiet_until = fast.quiet_until
            self._on_fast_run(pod, fast, start, running)
        else:
            pod.quiet_until = -math.inf
            outputs = core.step()
            t = core.clock.now()
            if core.runner.last_step_s and t > start:
                pod.steps += 1
                pod.batch_sum += running
                pod.step_sum += t - start
            for out in outputs:
                self._on_output(pod, out, t)
        if core.has_unfinished_requests():
            if t <= start:  # nothing ran and no time passed (waiting on a transfer): look again in 1 ms
                core.clock.advance_to(start + 1e-3)
        else:
            pod.stepping = False
            pod.quiet_until = math.inf
            if pod.state == "draining" and not pod.requests:
                self._gone(pod, t)

    def _gap(self, gap: float, n: int = 1) -> None:
        self._window["gaps"].add(gap, n)
        self.itl.add(gap, n)

    def _add_token(self, req: SimRequest, token: int, t: float) -> None:
        if req.num_tokens:
            self._gap(t - req.last_token_s)  # type: ignore[operator]
        else:
            self._window["ttfts"].append(t - req.trace.arrival_s)
        req.add_token(token, t)

    def _on_fast_run(self, pod: _Pod, run: FastRun, start: float, batch: int) -> None:
        """A fast-forwarded run's tokens and step statistics, as single steps would record them."""
        prev = start
        gaps = []
        for end in run.step_ends:  # summed in the order single steps add them
            pod.step_sum += end - prev
            pod.batch_sum += batch
            gaps.append(end - prev)
            prev = end
        k = len(gaps)
        pod.steps += k
        pod.fast_steps += k
        same = 0  # requests whose last token came at the run's start: their gaps are the steps'
        for rid, tokens in zip(run.request_ids, run.tokens):
            req = pod.requests[rid]
            if req.num_tokens and req.last_token_s == start:
                same += 1
            else:
                self._add_token(req, tokens[0], run.step_ends[0])
                tokens, ends = tokens[1:], run.step_ends[1:]
                req.add_tokens(tokens, ends)
                continue
            req.add_tokens(tokens, run.step_ends)
        n = len(run.request_ids)
        if same:
            self._gap(gaps[0], same)
        for gap in gaps[1:]:
            self._gap(gap, n)
        for rid in run.finished:
            req = pod.requests.pop(rid)
            pod.prompt_tokens -= req.trace.num_prompt_tokens
            self._end(req, None, run.step_ends[-1])

    def _on_output(self, pod: _Pod, out: Any, t: float) -> None:
        req = pod.requests.get(out.request_id)
        if req is None:
            return
        for tok in out.new_token_ids:
            self._add_token(req, tok, t)
        if out.finish_reason is None:
            return
        del pod.requests[req.id]
        pod.prompt_tokens -= req.trace.num_prompt_tokens
        if out.finish_reason == "abort":
            self._end(req, f"{pod.name}: {out.stop_reason or 'aborted'}", t)
        elif pod.role == "prefill" and req.trace.max_tokens > 1:
            req.handle = out.kv_transfer_params
            self._push(t, "handoff", req)  # at the step's end: this event runs at its start
        else:
            self._end(req, None, t)

    # ------------------------------------------------------------------ faults and scaling
    def _kill_a_decode_pod(self) -> None:
        role = "decode" if self.cfg.prefill else "both"
        victims = self._live(role, ("ready", "draining"))
        if not victims:
            return
        pod = self.rng.choice(victims)
        was_draining = pod.state == "draining"
        pod.state, pod.gone_at = "gone", self.now
        self.kills += 1
        for req in list(pod.requests.values()):
            self._end(req, f"decode pod {pod.name} was killed mid-request")
        pod.requests.clear()
        if not was_draining:  # its Deployment replaces it
            self._add_pod(role, ready_at=self.now + self.cfg.startup_s)
        self._record_timeline()

    def observe(self, window_s: float, percentile: float) -> Observation:
        """The autoscaler's view of the last ``window_s`` (what the pods' metrics would say)."""
        self._catch_up_all(self.now)
        w, win = window_s, self._window
        pre, dec = self._live("prefill", ("ready",)), self._live("decode", ("ready",))
        busy = computed = queued = steps = 0.0
        for p in pre:
            steps += p.core.num_steps - p.steps_mark
            p.steps_mark = p.core.num_steps
            busy += p.core.runner.busy_s - p.busy_mark
            computed += p.core.num_computed_tokens_total - p.computed_mark
            p.busy_mark, p.computed_mark = p.core.runner.busy_s, p.core.num_computed_tokens_total
            for r in p.requests.values():  # prompt tokens not computed yet
                engine_req = p.core.scheduler.get_request(r.id)
                queued += r.trace.num_prompt_tokens - (engine_req.num_computed_tokens if engine_req else 0)
        samples = tuple((p.batch_sum / p.steps, p.step_sum / p.steps,
                         _usage_at_batch(p.core.scheduler.kv_cache_manager.usage, p.core.scheduler.num_running,
                                         p.batch_sum / p.steps)) for p in dec if p.steps)
        running = sum(p.core.scheduler.num_running for p in dec)
        usage = sum(p.core.scheduler.kv_cache_manager.usage for p in dec)
        for p in dec:
            p.batch_sum = p.step_sum = 0.0
            p.steps = 0
        n_arrived = max(1, len(win["ttfts"]))
        obs = Observation(
            window_s=w, prefill_pods=len(pre), decode_pods=len(dec), arrived_prompt_tokens=win["arrived"],
            queued_prompt_tokens=queued, prefill_computed_tokens=computed, prefill_busy_s=busy,
            ttft_p=_quantile(win["ttfts"], percentile), decode_sequences=float(sum(len(p.requests) for p in dec)),
            itl_p=win["gaps"].quantile(percentile), itl_samples=samples,
            kv_usage=max((p.core.scheduler.kv_cache_manager.usage for p in dec), default=0.0),
            mean_prompt_tokens=win["arrived"] / n_arrived, kv_usage_per_sequence=usage / running if running else 0.0,
            arrived_output_tokens=max(win["out"], win["pout"]), finished_output_tokens=win["fin_out"],
            prefill_steps=steps, mean_output_tokens=win["out"] / win["nd"] if win["nd"] else 0.0,
            kv_capacity_tokens=_capacity(dec),
            finished_max_tokens=win["fin_max"])
        self._window = self._new_window()
        self._quick_window = self._new_window()
        self._quick_mark = self.now
        return obs

    def observe_demand(self) -> Observation:
        """The scale-up check's view since the last check or decision: demand only (arrivals, the prefill
        backlog, decode sequences and what enters decode); the learned estimates are the last decision's."""
        self._catch_up_all(self.now)
        win = self._quick_window
        pre, dec = self._live("prefill", ("ready",)), self._live("decode", ("ready",))
        queued = 0.0
        for p in pre:
            for r in p.requests.values():
                engine_req = p.core.scheduler.get_request(r.id)
                queued += r.trace.num_prompt_tokens - (engine_req.num_computed_tokens if engine_req else 0)
        running = sum(p.core.scheduler.num_running for p in dec)
        usage = sum(p.core.scheduler.kv_cache_manager.usage for p in dec)
        obs = Observation(
            window_s=self.now - self._quick_mark, prefill_pods=len(pre), decode_pods=len(dec),
            arrived_prompt_tokens=win["arrived"], queued_prompt_tokens=queued, prefill_computed_tokens=0.0,
            prefill_busy_s=0.0, ttft_p=None, decode_sequences=float(sum(len(p.requests) for p in dec)), itl_p=None,
            kv_usage=max((p.core.scheduler.kv_cache_manager.usage for p in dec), default=0.0),
            kv_usage_per_sequence=usage / running if running else 0.0,
            arrived_output_tokens=max(win["out"], win["pout"]),
            mean_prompt_tokens=win["arrived"] / win["n"] if win["n"] else 0.0,
            mean_output_tokens=win["out"] / win["nd"] if win["nd"] else 0.0, kv_capacity_tokens=_capacity(dec))
        self._quick_window = self._new_window()
        self._quick_mark = self.now
        return obs

    def _autoscale_check(self) -> None:
        policy = self.cfg.autoscaling
        assert policy is not None
        if self.now - self._quick_mark < 1e-9:  # a decision just looked at this moment
            return
        decision = decide_scale_up(policy, self._state, self.observe_demand(), self.now)
        if decision is None:
            return
        self.decisions.append((self.now, decision))
        if not policy.dry_run:
            self.scale_to("prefill", decision.prefill)
            self.scale_to("decode", decision.decode)

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
        self._catch_up_all(self.now)
        alive = self._live(role, ("starting", "ready"))
        for _ in range(want - len(alive)):
            self._add_pod(role, ready_at=self.now + self.cfg.startup_s)
        for pod in sorted(alive, key=lambda p: (p.state == "ready", len(p.requests)))[:max(0, len(alive) - want)]:
            if pod.requests or pod.stepping:
                pod.state = "draining"
            else:
                pod.state, pod.gone_at = "gone", self.now
        self._record_timeline()


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _usage_at_batch(usage: float, running: int, batch: float) -> float:
    """A pod's KV usage now, scaled to the window's mean batch (usage per sequence now, times that batch)."""
    return usage / running * batch if running else usage


def _capacity(pods: list[_Pod]) -> float:
    """Tokens a decode pod's KV pool holds (what its pdserve:kv_cache_capacity_tokens says), 0 without pods."""
    return pods[0].core.scheduler.num_blocks * pods[0].core.scheduler.block_size if pods else 0.0
