"""The SLO-driven prefill/decode autoscaler's control law: pure functions and a small state, no Kubernetes.

Every ``interval`` the operator (or ``pdserve sim``) hands :func:`decide` one :class:`Observation` of the last
window — what the pods' metrics say — and gets both replica counts back. No profiling run: capacities are
estimated online from what the pods do.

Prefill. Demand is the prompt tokens that arrived in the window plus the backlog still queued, per second. A pod's
capacity ``mu`` is the prompt tokens it computed per second *of busy time* (an exponentially weighted average, so
it follows the prompt mix and the prefix-cache hit rate). The pool must run below a utilization ``headroom`` for
queueing to stay short; the headroom is itself learned from the observed TTFT percentile: above target it shrinks
(more pods for the same load), far below target it grows back; it does not shrink while a backlog explains the
miss (queued prompt tokens over a quarter of the window's arrivals: the backlog term already asks for pods, and
shrinking too would size every later window for the transient). ``prefill = ceil(demand / (mu * headroom))``.
Once windows of different prompt mixes separate a step's fixed and per-token cost (``busy = alpha * steps +
beta * tokens``), ``mu`` is the capacity for the prompts arriving now, ``P / (alpha + beta * P)``.

Decode. Each decode pod's step time is its ITL; it grows with the batch and with the context the batch attends
to (its KV): ``itl = a + c_b * batch + c_u * kv_usage`` is fitted by exponentially weighted least squares over
(batch, ITL, KV usage) samples of every pod and window (with ``c_u = 0`` while the usage does not vary apart from
the batch, or samples carry none). At the KV usage per sequence seen now, ``u``, a sequence costs ``c = c_b +
c_u * u``; the largest batch that keeps the ITL under target is ``b* = (itl_target * headroom_d - a) / c``
(capped by ``max_batch``), and ``decode = ceil(concurrent sequences / b*)``. (A slope fitted on batch alone,
from short-context sequences, sized decode far too small once long prompts came back: a sequence of 4,000
context tokens costs several times one of 700.) Until the fit is usable (two distinct batch sizes seen) the decode
count follows the observed ITL proportionally. Never fewer pods than ``sequences / max_batch`` (a full pod queues
instead of slowing down), and KV memory above 90 % adds a pod.
Where the decode pods report what enters them (``max_tokens`` at a sequence's first token), decode is sized
feed-forward instead: ``inflow * fill * T`` sequences decode at once in steady state (Little's law; ``fill`` is
how much of max_tokens finished requests used), ``b*`` to a pod, at the KV usage an entering sequence will hold.

Scale-up checks (``scale_up_interval_s``): between decisions, :func:`decide_scale_up` sizes both roles from a
short window's demand with the last decision's estimates and only ever raises a count.

Then min/max per role, the GPU budget (shared in proportion to need, each role keeping its minimum), and
hysteresis: scaling up happens at once, scaling down only to the highest count wanted during the last
``scale_down_window_s`` seconds (so a count never goes down and back up within that window because of noise), and a
change smaller than ``tolerance`` of the current count is ignored.

Where disaggregation loses: short prompts at low load make the KV handoff cost more than the interference it
removes. When the mean prompt is under ``colocate_max_prompt_tokens`` and the whole prefill demand needs less than
``colocate_max_prefill_load`` of one pod, the decision says ``colocate=True`` (a recommendation to serve with
``--prefill 0``, reported in status and Events; the operator does not switch on its own).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class AutoscalingPolicy:
    """``spec.autoscaling`` of an InferenceService, parsed (see docs/autoscaling.md)."""

    ttft_target_s: float
    itl_target_s: float
    percentile: float = 0.9
    min_prefill: int = 1
    max_prefill: int = 8
    min_decode: int = 1
    max_decode: int = 8
    gpu_budget: int | None = None  # total GPUs of both roles; None: only the per-role maxima
    gpus_per_prefill: int = 1
    gpus_per_decode: int = 1
    interval_s: float = 30.0
    # Between two decisions, a scale-up check every this many seconds (None: only the decisions): demand that
    # outgrows what was decided adds pods at once, without waiting for the next decision. It never scales down.
    scale_up_interval_s: float | None = None
    scale_down_window_s: float = 300.0
    tolerance: float = 0.1
    max_batch: int = 256
    dry_run: bool = False
    colocate_max_prompt_tokens: int = 256
    colocate_max_prefill_load: float = 0.3

    def __post_init__(self) -> None:
        if not (self.ttft_target_s > 0 and self.itl_target_s > 0):
            raise ValueError("autoscaling: TTFT and ITL targets must be positive")
        if not 0.5 <= self.percentile < 1:
            raise ValueError(f"autoscaling: percentile must be within [0.5, 1), got {self.percentile}")
        if not 0 <= self.min_prefill <= self.max_prefill or not 1 <= self.min_decode <= self.max_decode:
            raise ValueError("autoscaling: need 0 <= minPrefill <= maxPrefill and 1 <= minDecode <= maxDecode")
        if self.gpu_budget is not None and self.gpu_budget < (self.min_prefill * self.gpus_per_prefill
                                                              + self.min_decode * self.gpus_per_decode):
            raise ValueError(f"autoscaling: gpuBudget {self.gpu_budget} cannot hold the minimum replicas")
        if self.interval_s <= 0 or self.scale_down_window_s < 0 or not 0 <= self.tolerance < 1:
            raise ValueError("autoscaling: interval must be > 0, scale-down window >= 0, tolerance within [0, 1)")
        if self.scale_up_interval_s is not None and not 0 < self.scale_up_interval_s <= self.interval_s:
            raise ValueError("autoscaling: the scale-up interval must lie within (0, interval]")


@dataclass(frozen=True)
class Observation:
    """What the pods' metrics say about the last ``window_s`` seconds."""

    window_s: float
    prefill_pods: int  # ready pods of each role now
    decode_pods: int
    arrived_prompt_tokens: float  # prompt tokens of requests that arrived in the window (to be prefilled)
    queued_prompt_tokens: float  # prompt tokens waiting on prefill pods now (backlog)
    prefill_computed_tokens: float  # prompt tokens the prefill pods computed in the window
    prefill_busy_s: float  # summed over prefill pods: seconds spent in engine steps
    ttft_p: float | None  # observed TTFT at the policy's percentile (None: no request finished prefill)
    decode_sequences: float  # sequences running or waiting on decode pods (mean over the window)
    itl_p: float | None  # observed ITL at the percentile
    # (batch, mean ITL) or (batch, mean ITL, KV usage in [0, 1]) per decode pod in the window
    itl_samples: tuple[tuple[float, ...], ...] = ()
    kv_usage: float = 0.0  # highest KV cache usage among decode pods, in [0, 1]
    mean_prompt_tokens: float = 0.0
    kv_usage_per_sequence: float = 0.0  # decode pods' KV usage summed, over their sequences (now)
    # Output tokens asked for (max_tokens) by the requests that arrived in the window: the larger of the prefill
    # pods' and the decode pods' pdserve:requested_output_tokens (the prefill pods see requests first; the decode
    # pods also see those that skip prefill, and the burst when a prefill backlog drains). None: not reported.
    arrived_output_tokens: float | None = None
    prefill_steps: float = 0.0  # engine steps the prefill pods ran in the window (pdserve:iteration_tokens_total)
    # The mean max_tokens of the sequences that entered decode pods in the window (their requested_output_tokens
    # over their first tokens; 0: none) and the tokens a decode pod's KV pool holds (pdserve:kv_cache_capacity_
    # tokens; 0: not reported): with the prompts' mean length they give the KV usage a sequence entering now will
    # hold, which sets its cost per step.
    mean_output_tokens: float = 0.0
    kv_capacity_tokens: float = 0.0
    # Of the requests that finished on decode pods in the window: tokens generated (pdserve:request_generation_
    # tokens) and max_tokens asked for (pdserve:request_params_max_tokens); their ratio is how much of max_tokens
    # requests really use (EOS and stop strings end them sooner).
    finished_output_tokens: float = 0.0
    finished_max_tokens: float = 0.0


@dataclass(frozen=True)
class Decision:
    prefill: int
    decode: int
    wanted_prefill: int  # before hysteresis and the budget: what the load asks for
    wanted_decode: int
    budget_limited: bool
    colocate: bool
    reason: str


@dataclass
class AutoscalerState:
    """What the law learns across windows (kept by the operator per InferenceService, or by the simulator)."""

    prefill_mu: float | None = None  # prompt tokens per busy second of one prefill pod
    prefill_headroom: float = 0.7
    decode_headroom: float = 0.9
    # exponentially weighted sums for the least-squares fit of itl = a + c_b * batch + c_u * kv_usage:
    # w, wb, wu, wbb, wbu, wuu, wi, wbi, wui
    fit: list[float] = field(default_factory=lambda: [0.0] * 9)
    history: list[tuple[float, int, int]] = field(default_factory=list)  # (time, wanted prefill, wanted decode)
    last_prefill: int = 0  # the prefill count last decided
    last_decode: int = 0  # the decode count last decided
    output_fill: float = 1.0  # generated / max_tokens of finished requests (EWMA); 1 until a request finished
    itl_p: float | None = None  # the ITL percentile the last decision saw (a scale-up check's window has none)
    # exponentially weighted sums for busy = alpha * steps + beta * tokens of the prefill pods: w, ss, sn, nn, sb, nb
    prefill_fit: list[float] = field(default_factory=lambda: [0.0] * 6)

    def prefill_cost(self) -> tuple[float, float] | None:
        """``(alpha, beta)``: a prefill step's fixed seconds and seconds per prompt token, or None until windows
        with different tokens per step (different prompt mixes) make them separable."""
        w, ss, sn, nn, sb, nb = self.prefill_fit
        det = ss * nn - sn * sn
        if w <= 0 or det <= 1e-3 * ss * nn:
            return None
        alpha, beta = (sb * nn - nb * sn) / det, (nb * ss - sb * sn) / det
        return (alpha, beta) if alpha >= 0 and beta > 0 else None

    def prefill_capacity(self, mean_prompt_tokens: float) -> float | None:
        """Prompt tokens a prefill pod computes per busy second for prompts of this mean length: from the step
        cost when it is known (one prompt a step, the unbatched end; it follows a new mix at once), else the
        running average of what the pods computed."""
        cost = self.prefill_cost()
        if cost is not None and mean_prompt_tokens > 0:
            return mean_prompt_tokens / (cost[0] + cost[1] * mean_prompt_tokens)
        return self.prefill_mu

    def itl_model(self) -> tuple[float, float, float] | None:
        """``(a, c_b, c_u)`` of ``itl = a + c_b * batch + c_u * kv_usage``, or None until two batch sizes make
        the batch slope meaningful. ``c_u`` is 0 unless the usage varied apart from the batch."""
        w, wb, wu, wbb, wbu, wuu, wi, wbi, wui = self.fit
        if w <= 0:
            return None
        mb, mu, mi = wb / w, wu / w, wi / w
        vbb, vbu, vuu = wbb / w - mb * mb, wbu / w - mb * mu, wuu / w - mu * mu
        vbi, vui = wbi / w - mb * mi, wui / w - mu * mi
        if vbb < 1.0:  # batches too alike to see a slope
            return None
        det = vbb * vuu - vbu * vbu
        cb, cu = vbi / vbb, 0.0
        if vuu > 1e-8 and det > 1e-3 * vbb * vuu:  # the usage varies apart from the batch: both slopes
            cb2, cu2 = (vbi * vuu - vui * vbu) / det, (vui * vbb - vbi * vbu) / det
            if cb2 >= 0 and cu2 >= 0:
                cb, cu = cb2, cu2
        if cb <= 0 and cu <= 0:
            return None
        return mi - cb * mb - cu * mu, cb, cu

    def itl_line(self) -> tuple[float, float] | None:
        """``(a, c)`` of the fitted ITL against the batch alone, at the mean KV usage of the samples (or None)."""
        model = self.itl_model()
        if model is None:
            return None
        a, cb, cu = model
        w, wu = self.fit[0], self.fit[2]
        return (a + cu * wu / w, cb) if cb > 0 else None


EWMA = 0.3  # weight of the newest window in the running estimates


def _learn_prefill(policy: AutoscalingPolicy, state: AutoscalerState, obs: Observation) -> None:
    if obs.prefill_busy_s > 0 and obs.prefill_computed_tokens > 0:
        mu = obs.prefill_computed_tokens / obs.prefill_busy_s
        state.prefill_mu = mu if state.prefill_mu is None else (1 - EWMA) * state.prefill_mu + EWMA * mu
        if obs.prefill_steps > 0:
            s_, n_, b_ = obs.prefill_steps, obs.prefill_computed_tokens, obs.prefill_busy_s
            state.prefill_fit = [(1 - EWMA) * v + EWMA * x
                                 for v, x in zip(state.prefill_fit, (1.0, s_ * s_, s_ * n_, n_ * n_, s_ * b_, n_ * b_))]
    # Learn the headroom only once the pods last decided are ready: a TTFT that misses while new pods still start
    # says nothing about the headroom (without this it winds down to its floor during every scale-up).
    backlog = obs.queued_prompt_tokens > 0.25 * obs.arrived_prompt_tokens
    if obs.ttft_p is not None and obs.prefill_pods >= state.last_prefill:
        if obs.ttft_p > policy.ttft_target_s and not backlog:
            state.prefill_headroom = max(0.3, state.prefill_headroom * 0.85)
        elif obs.ttft_p < 0.5 * policy.ttft_target_s:
            state.prefill_headroom = min(0.9, state.prefill_headroom * 1.05)


def _prefill_wanted(state: AutoscalerState, obs: Observation, backlog_s: float) -> int:
    """Prefill pods for the window's arrivals plus the backlog drained within ``backlog_s``."""
    demand = obs.arrived_prompt_tokens / obs.window_s + obs.queued_prompt_tokens / backlog_s
    mu = state.prefill_capacity(obs.mean_prompt_tokens)
    if mu is None:  # nothing computed yet: keep what runs, one more if a backlog waits
        return obs.prefill_pods + (1 if obs.queued_prompt_tokens > 0 else 0)
    return math.ceil(demand / (mu * state.prefill_headroom))


def _learn_decode(state: AutoscalerState, obs: Observation) -> None:
    decay = 1 - EWMA
    state.fit = [v * decay for v in state.fit]
    for sample in obs.itl_samples:
        b, itl = sample[0], sample[1]
        u = sample[2] if len(sample) > 2 else 0.0
        if b > 0 and itl > 0:
            for i, v in enumerate((1.0, b, u, b * b, b * u, u * u, itl, b * itl, u * itl)):
                state.fit[i] += EWMA * v
    if obs.finished_max_tokens > 0:
        fill = min(1.0, obs.finished_output_tokens / obs.finished_max_tokens)
        state.output_fill = (1 - EWMA) * state.output_fill + EWMA * fill


def decode_inflow(state: AutoscalerState, obs: Observation, backlog_s: float) -> float | None:
    """Output tokens per second the requests entering decode will generate (max_tokens times the fill learned
    from finished requests), or None when the pods do not report what arrives. The prefill backlog enters decode
    too, within ``backlog_s`` (as the prefill law drains it): its prompt tokens times the output tokens asked per
    prompt token of the window's arrivals."""
    if obs.arrived_output_tokens is None:
        return None
    queued = 0.0
    if obs.arrived_prompt_tokens > 0:
        queued = obs.queued_prompt_tokens * obs.arrived_output_tokens / obs.arrived_prompt_tokens
    return (obs.arrived_output_tokens / obs.window_s + queued / backlog_s) * state.output_fill


def inflow_usage_per_sequence(state: AutoscalerState, obs: Observation) -> float:
    """The KV usage (fraction of a pod's pool) of a sequence entering decode now, over its life: its prompt plus
    half what it will generate, over the pool; the usage per sequence decoding now when that is not known."""
    if obs.kv_capacity_tokens > 0 and obs.mean_output_tokens > 0 and obs.mean_prompt_tokens > 0:
        generated = obs.mean_output_tokens * state.output_fill
        return (obs.mean_prompt_tokens + generated / 2) / obs.kv_capacity_tokens
    return obs.kv_usage_per_sequence


def _decode_wanted(policy: AutoscalingPolicy, state: AutoscalerState, obs: Observation, backlog_s: float) -> int:
    model = state.itl_model()
    inflow = decode_inflow(state, obs, backlog_s)
    if model is not None:
        a, cb, cu = model
        # A sequence's cost per step at the context of the sequences entering now (feed-forward) or decoding now
        c = cb + cu * (inflow_usage_per_sequence(state, obs) if inflow is not None else obs.kv_usage_per_sequence)
        itl = policy.itl_target_s * state.decode_headroom
        best = (itl - a) / c if c > 0 else float(policy.max_batch)
        best = max(1.0, min(float(policy.max_batch), best))
        if inflow is not None:
            # Feed-forward (Little's law): at the target ITL a sequence emits one token per ``itl`` seconds, so
            # ``inflow * itl`` sequences decode at once in steady state, ``best`` to a pod. Sized from what enters,
            # not from the sequences already decoding: those lag a shift by a sequence's lifetime, and pile up
            # beyond the steady state while decode is short (sizing from them overshot 2x at 100 pods).
            wanted = math.ceil(inflow * itl / best - 1e-9)
        else:
            wanted = math.ceil(obs.decode_sequences / best) if obs.decode_sequences > 0 else policy.min_decode
    elif (obs.itl_p or state.itl_p) is not None and obs.decode_pods > 0:
        itl_p: float = obs.itl_p or state.itl_p  # type: ignore[assignment]
        target = policy.itl_target_s * state.decode_headroom
        wanted = math.ceil(obs.decode_pods * itl_p / target)
        if inflow is not None and obs.decode_sequences > 0 and inflow * target > 2 * obs.decode_sequences:
            # No slope yet (every pod ran alike batches), and what enters will more than double the sequences
            # decoding now: take the ITL as proportional to the batch (an upper bound: it ignores the fixed part
            # of a step) and the batch to grow to the steady state of what enters, ``inflow * target``. Smaller
            # moves are left to the rule above (with tiny batches, where the fixed part is most of a step, the
            # proportional bound asked for pods that then asked for more).
            wanted = math.ceil(obs.decode_pods * itl_p * inflow / obs.decode_sequences)
    else:
        wanted = obs.decode_pods
    # Sequence slots: beyond max_batch a pod queues sequences instead of slowing its ITL, which the fit cannot see.
    wanted = max(wanted, math.ceil(obs.decode_sequences / policy.max_batch))
    if obs.kv_usage > 0.9:
        wanted = max(wanted, obs.decode_pods + 1)
    return wanted


def _fit_budget(policy: AutoscalingPolicy, p: int, d: int) -> tuple[int, int, bool]:
    """Cut (p, d) to the GPU budget in proportion to what each role asked, each keeping its minimum."""
    gp, gd, budget = policy.gpus_per_prefill, policy.gpus_per_decode, policy.gpu_budget
    if budget is None or p * gp + d * gd <= budget:
        return p, d, False
    share = p * gp / (p * gp + d * gd)
    p2 = max(policy.min_prefill, min(p, int(budget * share) // gp))
    d2 = max(policy.min_decode, min(d, (budget - p2 * gp) // gd))
    p2 = max(policy.min_prefill, min(p, (budget - d2 * gd) // gp))  # hand back what decode could not use
    return p2, d2, True


def _settle(current: int, wanted: int, recent_max: int, tolerance: float) -> int:
    """Never below the highest count wanted within the window (so up at once, down only once the window has
    forgotten the peak); a move within ``tolerance`` of the current count is ignored.

    ``current`` counts ready pods; pods decided earlier may still be starting, and the window keeps them.
    """
    target = max(wanted, recent_max)
    if target == current or abs(target - current) <= tolerance * current:
        return current
    return target


def decide(policy: AutoscalingPolicy, state: AutoscalerState, obs: Observation, now: float) -> Decision:
    """Both replica counts for the next window (updates ``state``)."""
    if obs.window_s <= 0:
        raise ValueError("an observation window must be positive")
    _learn_prefill(policy, state, obs)
    _learn_decode(state, obs)
    if obs.itl_p is not None:
        state.itl_p = obs.itl_p
    raw_p = _prefill_wanted(state, obs, obs.window_s)
    raw_d = _decode_wanted(policy, state, obs, obs.window_s)
    want_p = min(policy.max_prefill, max(policy.min_prefill, raw_p))
    want_d = min(policy.max_decode, max(policy.min_decode, raw_d))
    state.history = [h for h in state.history if now - h[0] < policy.scale_down_window_s]
    state.history.append((now, want_p, want_d))
    recent_p = max(h[1] for h in state.history)
    recent_d = max(h[2] for h in state.history)
    p = _settle(obs.prefill_pods, want_p, recent_p, policy.tolerance)
    d = _settle(obs.decode_pods, want_d, recent_d, policy.tolerance)
    p, d, limited = _fit_budget(policy, p, d)
    state.last_prefill, state.last_decode = p, d
    mu = state.prefill_mu
    colocate = (obs.mean_prompt_tokens > 0 and obs.mean_prompt_tokens < policy.colocate_max_prompt_tokens
                and mu is not None
                and (obs.arrived_prompt_tokens / obs.window_s) / mu < policy.colocate_max_prefill_load)
    model = state.itl_model()
    reason = (f"prefill {obs.prefill_pods}->{p} (wants {raw_p}: mu={mu or 0:.0f} tok/s, "
              f"headroom {state.prefill_headroom:.2f}, ttft_p={_fmt(obs.ttft_p)}); "
              f"decode {obs.decode_pods}->{d} (wants {raw_d}: {obs.decode_sequences:.0f} seqs, "
              f"inflow {_fmt_rate(decode_inflow(state, obs, obs.window_s))}, "
              f"itl fit {'a=%.4f c_b=%.6f c_u=%.4f' % model if model else 'none'}, itl_p={_fmt(obs.itl_p)})"
              + ("; GPU budget binds" if limited else ""))
    return Decision(p, d, want_p, want_d, limited, colocate, reason)


def decide_scale_up(policy: AutoscalingPolicy, state: AutoscalerState, obs: Observation,
                    now: float) -> Decision | None:
    """A scale-up check between two decisions, on a short window: the learned estimates (capacity, headroom, the
    ITL fit) stay as the last decision left them; only the demand is new. A role whose wanted count exceeds what
    was last decided (beyond ``tolerance``) goes up at once; nothing goes down (that waits for a decision and its
    window). Returns None when nothing changes."""
    if obs.window_s <= 0:
        raise ValueError("an observation window must be positive")
    # The backlog is drained within a decision interval, as a decision would: over this short window it would
    # ask for several times the pods, for tokens already queued on pods that new ones cannot take over.
    want_p = min(policy.max_prefill, max(policy.min_prefill, _prefill_wanted(state, obs, policy.interval_s)))
    want_d = min(policy.max_decode, max(policy.min_decode, _decode_wanted(policy, state, obs, policy.interval_s)))
    if not state.history:  # no decision yet: nothing learned to size with
        return None
    p, d = max(state.last_prefill, obs.prefill_pods), max(state.last_decode, obs.decode_pods)

    def up(last: int, want: int) -> int:
        return want if want > last and want - last > policy.tolerance * last else last

    p2, d2 = up(p, want_p), up(d, want_d)
    if (p2, d2) == (p, d):
        return None
    state.history.append((now, want_p, want_d))
    p2, d2, limited = _fit_budget(policy, p2, d2)
    if (p2, d2) == (p, d):
        return None
    state.last_prefill, state.last_decode = p2, d2
    reason = (f"scale-up check: prefill {p}->{p2} (wants {want_p}), decode {d}->{d2} (wants {want_d}: "
              f"{obs.decode_sequences:.0f} seqs, inflow {_fmt_rate(decode_inflow(state, obs, policy.interval_s))})"
              + ("; GPU budget binds" if limited else ""))
    return Decision(p2, d2, want_p, want_d, limited, False, reason)


def _fmt_rate(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f} tok/s"


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}s"
