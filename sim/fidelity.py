"""Does the simulator reproduce the real engine? Replay one trace through both and compare TTFT and ITL.

Three parts, used by ``pdserve sim-check`` and by the CPU test of issue 18's first acceptance point:

- :func:`calibrate` runs a short fixed workload (prefills of a few lengths, decodes at batch 1 and 8) through the
  real engine core and fits the cost model's three coefficients to its recorded steps (:func:`fit_profile`), so
  the profile is this machine's, measured a moment before the comparison;
- :func:`replay_real` drives the real :class:`EngineCore` with the trace in wall time: each request is added when
  its arrival time comes, the core steps while it has work, and every token is stamped when its step returns;
- :func:`replay_sim` runs the same trace through one simulated colocated pod (:class:`~pdserve.sim.cluster.Cluster`
  with the same scheduler limits and KV pool) in virtual time.

The calibration workload and the trace differ (the trace has arrivals, mixed prefill/decode steps, queueing), so
agreement tests the simulator's scheduling and the cost model's form, not a fit to the very steps compared.
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass
from typing import Any

from pdserve.engine.engine_core import EngineCoreRequest
from pdserve.engine.sampling_params import SamplingParams
from pdserve.sim.cost_model import CostProfile
from pdserve.sim.workload import TraceRequest


@dataclass(frozen=True)
class Timings:
    """Per-request TTFT (s, from arrival) and mean ITL (s between tokens after the first; None with one token)."""

    ttft_s: list[float]
    itl_s: list[float | None]

    @property
    def mean_ttft_s(self) -> float:
        return statistics.fmean(self.ttft_s)

    @property
    def mean_itl_s(self) -> float:
        return statistics.fmean(x for x in self.itl_s if x is not None)


def _timings(trace: list[TraceRequest], token_times: list[list[float]]) -> Timings:
    ttft, itl = [], []
    for req, times in zip(trace, token_times):
        if len(times) != req.max_tokens:
            raise RuntimeError(f"a request got {len(times)} tokens, not the {req.max_tokens} it asked for")
        ttft.append(times[0] - req.arrival_s)
        itl.append((times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None)
    return Timings(ttft, itl)


def _request(rid: str, prompt: list[int] | tuple[int, ...], max_tokens: int) -> EngineCoreRequest:
    return EngineCoreRequest(rid, list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                               ignore_eos=True))


def _run_to_end(core: Any) -> None:
    while core.has_unfinished_requests():
        core.step()


def calibrate(core: Any, vocab_size: int, prompt_lens: tuple[int, ...] = (32, 128, 256),
              decode_batches: tuple[int, ...] = (1, 8), decode_tokens: int = 24) -> list[Any]:
    """Run the calibration workload through ``core`` (a real engine core) and return its step records."""
    ids = itertools.count()
    distinct = itertools.count(1)

    def prompt(n: int) -> list[int]:  # never repeated: no prefix-cache hit skews a prefill
        return [next(distinct) % (vocab_size - 1) + 1 for _ in range(n)]

    core.add_request(_request("warm", prompt(16), 4))  # first-call costs (allocations, lazy init) stay out
    _run_to_end(core)
    core.record_step_stats()
    for n in prompt_lens:
        for _ in range(2):
            core.add_request(_request(f"cal{next(ids)}", prompt(n), 1))
            _run_to_end(core)
    for batch in decode_batches:
        for _ in range(batch):
            core.add_request(_request(f"cal{next(ids)}", prompt(64), decode_tokens))
        _run_to_end(core)
    stats = list(core.step_stats)
    core.record_step_stats(False)
    return stats


def fit_profile(stats: list[Any], *, name: str, model: str, gpu: str, kv_bytes_per_token: int, num_blocks: int,
                block_size: int) -> CostProfile:
    """The non-negative least-squares fit of ``step_ms = base + per_token * tokens + per_context * context``."""
    rows = [(1.0, float(s.num_tokens), float(s.total_context)) for s in stats if s.num_tokens]
    ys = [s.duration_s * 1e3 for s in stats if s.num_tokens]
    if len(rows) < 3:
        raise ValueError("need at least three recorded steps to fit a cost profile")
    best: tuple[float, list[float]] | None = None
    for active in itertools.product((False, True), repeat=3):  # every subset of the terms: NNLS for 3 unknowns
        if not any(active):
            continue
        coef = _least_squares([[x for x, on in zip(r, active) if on] for r in rows], ys)
        if coef is None or min(coef) < 0:
            continue
        full = iter(coef)
        values = [next(full) if on else 0.0 for on in active]
        err = sum((y - sum(c * x for c, x in zip(values, r))) ** 2 for r, y in zip(rows, ys))
        if best is None or err < best[0]:
            best = (err, values)
    assert best is not None  # the base-only fit is a mean of durations, never negative
    base, per_token, per_context = best[1]
    return CostProfile(name=name, model=model, gpu=gpu, base_ms=base, per_token_ms=per_token,
                       per_context_ms=per_context, kv_bytes_per_token=kv_bytes_per_token, num_blocks=num_blocks,
                       block_size=block_size, source=f"fitted to {len(rows)} calibration steps (sim/fidelity.py)")


def _least_squares(xs: list[list[float]], ys: list[float]) -> list[float] | None:
    """Solve the normal equations (k <= 3 unknowns) by Gaussian elimination; None if singular."""
    k = len(xs[0])
    a = [[sum(r[i] * r[j] for r in xs) for j in range(k)] + [sum(r[i] * y for r, y in zip(xs, ys))]
         for i in range(k)]
    for col in range(k):
        pivot = max(range(col, k), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-12 * max(1.0, abs(a[col][col])):
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(k):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [v - f * p for v, p in zip(a[r], a[col])]
    return [a[i][k] / a[i][i] for i in range(k)]


def replay_real(core: Any, trace: list[TraceRequest]) -> Timings:
    """``trace`` through the real engine ``core`` in wall time (arrivals at their times, tokens stamped as their
    steps return)."""
    times: dict[str, list[float]] = {f"t{i}": [] for i in range(len(trace))}
    pending = list(enumerate(trace))
    start = time.perf_counter()
    while pending or core.has_unfinished_requests():
        now = time.perf_counter() - start
        while pending and pending[0][1].arrival_s <= now:
            i, req = pending.pop(0)
            core.add_request(_request(f"t{i}", req.prompt, req.max_tokens))
        if not core.has_unfinished_requests():
            time.sleep(max(0.0, pending[0][1].arrival_s - now))
            continue
        outputs = core.step()
        t = time.perf_counter() - start
        for out in outputs:
            times[out.request_id].extend(t for _ in out.new_token_ids)
    return _timings(trace, [times[f"t{i}"] for i in range(len(trace))])


def replay_real_with_steps(core: Any, trace: list[TraceRequest]) -> tuple[Timings, list[Any]]:
    """:func:`replay_real`, also returning the engine's record of every step it ran (to fit a profile to)."""
    core.record_step_stats(True)
    try:
        timings = replay_real(core, trace)
        steps = list(core.step_stats or [])
    finally:
        core.record_step_stats(False)
    return timings, steps


def busy_s_per_request(profile: CostProfile, trace: list[TraceRequest], **limits: Any) -> float:
    """Modelled engine-busy seconds per request of ``trace`` run alone (to pick a rate that loads an engine to
    a given utilization)."""
    from pdserve.sim.cluster import Cluster, ClusterConfig

    cluster = Cluster(ClusterConfig(profile=profile, prefill=0, decode=1, **limits))
    cluster.run(trace)
    return sum(p.core.runner.busy_s for p in cluster.pods.values()) / max(1, len(trace))


def replay_sim(profile: CostProfile, trace: list[TraceRequest], *, model: str, max_num_seqs: int,
               max_num_batched_tokens: int, max_model_len: int) -> Timings:
    """``trace`` through one simulated colocated pod with the same scheduler limits, in virtual time."""
    from pdserve.sim.cluster import Cluster, ClusterConfig

    cluster = Cluster(ClusterConfig(profile=profile, prefill=0, decode=1, model=model, max_num_seqs=max_num_seqs,
                                    max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len))
    done = cluster.run(trace)
    errors = [r.error for r in done if r.error]
    if errors:
        raise RuntimeError(f"the simulation failed requests: {errors[:3]}")
    if any(r.num_tokens != r.trace.max_tokens for r in done):
        raise RuntimeError("a simulated request got fewer tokens than it asked for")
    return Timings([r.ttft_s for r in done], [r.tpot_s for r in done])


def relative_error(simulated: float, measured: float) -> float:
    """|simulated - measured| / measured."""
    return abs(simulated - measured) / measured
