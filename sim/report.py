"""What ``pdserve sim`` reports: latency quantiles, SLO attainment and goodput, errors by cause, answers checked,
GPU-hours, and the pod counts over time."""

from __future__ import annotations

from collections import Counter
from typing import Any

from pdserve.sim.core import sim_next_token
from pdserve.sim.records import digest_step


def expected_digest(prompt: tuple[int, ...], n: int, vocab_size: int, eos: int | None) -> int:
    """The digest (:func:`digest_step`) of the ``n`` tokens a correct engine answers ``prompt`` with (the
    simulated model is a function of the sequence so far)."""
    last, length, digest = prompt[-1], len(prompt), 0
    for _ in range(n):
        last = sim_next_token(last, length, vocab_size, eos)
        length += 1
        digest = digest_step(digest, last)
    return digest


def _q(values: list[float], qs: tuple[float, ...] = (0.5, 0.9, 0.99)) -> dict[str, float | None]:
    s = sorted(values)
    return {f"p{round(q * 100)}": (s[min(len(s) - 1, int(q * len(s)))] if s else None) for q in qs}


def summarize(requests: list[Any], cluster: Any, ttft_slo_s: float, tpot_slo_s: float) -> dict[str, Any]:
    """The report of one run. TPOT is a request's mean time per output token after the first (DistServe's
    per-request SLO metric); ITL quantiles are over every gap between two tokens (of all requests, to the
    histogram's 10-microsecond bins)."""
    cfg = cluster.cfg
    core = next(iter(cluster.pods.values())).core
    vocab, eos = core.vocab_size, None
    ok = [r for r in requests if r.error is None]
    wrong = [r for r in ok if r.num_tokens != r.trace.max_tokens
             or r.digest != expected_digest(r.trace.prompt, r.trace.max_tokens, vocab, eos)]
    ttft = [r.ttft_s for r in ok]
    tpot = [r.tpot_s for r in ok if r.num_tokens > 1]
    e2e = [r.last_token_s - r.trace.arrival_s for r in ok]
    met = [r for r in ok if r.ttft_s <= ttft_slo_s and (r.num_tokens < 2 or r.tpot_s <= tpot_slo_s)]
    duration = max((r.last_token_s for r in ok), default=0.0) or 1.0
    loads: Counter = Counter()
    for pod in cluster.pods.values():
        loads.update(pod.core.kv_state.counters)
    return {
        "pods": {"prefill": cfg.prefill, "decode": cfg.decode, "profile": cfg.profile.name,
                 "autoscaling": cfg.autoscaling is not None},
        "requests": len(requests), "ok": len(ok) - len(wrong), "wrong_answers": len(wrong),
        "errors": dict(Counter(_cause(r.error) for r in requests if r.error is not None)),
        "kv_loads": dict(loads), "decode_pods_killed": cluster.kills,
        "ttft_s": _q(ttft), "tpot_s": _q(tpot), "itl_s": {f"p{round(q * 100)}": cluster.itl.quantile(q)
                                                          for q in (0.5, 0.9, 0.99)},
        "e2e_s": _q(e2e),
        "slo": {"ttft_s": ttft_slo_s, "tpot_s": tpot_slo_s},
        "slo_attainment": len(met) / len(requests) if requests else 0.0,
        "goodput_rps": len(met) / duration,
        "gpu_hours": cluster.gpu_seconds / 3600.0,
        "timeline": cluster.timeline,
    }


def _cause(error: str) -> str:
    """An error message without the pod name, to count errors by cause."""
    if "killed" in error:
        return "decode pod killed mid-request"
    return error.split(": ", 1)[-1][:120]
