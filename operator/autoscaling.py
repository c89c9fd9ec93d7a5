"""``spec.autoscaling`` of an InferenceService: parsing, the pods' metrics as an :class:`Observation`, and one
round of the autoscaling loop (decide, patch both Deployments' replicas, post an Event, write status).

The control law itself is :mod:`pdserve.operator.autoscaler` (pure). A :class:`MetricsSource` turns what the pods
report into observations; :class:`PodMetricsSource` scrapes each engine pod's ``/metrics`` (metrics port) and
differences the counters and histograms between two rounds. Tests and ``pdserve sim`` feed the loop from the
simulator instead.
"""

from __future__ import annotations

import logging
import math
import re
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from pdserve.operator import constants as c
from pdserve.operator.autoscaler import (AutoscalerState, AutoscalingPolicy, Decision, Observation, decide,
                                        decide_scale_up)
from pdserve.operator.fields import Fields, SpecError

log = logging.getLogger(__name__)

AUTOSCALING_FIELDS = ("ttftTargetSeconds", "itlTargetSeconds", "percentile", "minPrefill", "maxPrefill",
                      "minDecode", "maxDecode", "gpuBudget", "intervalSeconds", "scaleUpIntervalSeconds",
                      "scaleDownWindowSeconds",
                      "tolerance", "dryRun")


def parse_autoscaling(f: Fields, s: Any) -> AutoscalingPolicy:
    """The policy of ``spec.autoscaling`` (``f``) of the ServiceSpec ``s``, whose roles' replicas are the starting
    counts; :class:`SpecError` naming the field for a bad value."""
    d = AutoscalingPolicy
    for key in ("ttftTargetSeconds", "itlTargetSeconds"):
        if not f.has(key):
            raise SpecError(f"{f.path}.{key}", "is required with autoscaling")
    budget = f.int("gpuBudget", None, minimum=1)
    try:
        policy = AutoscalingPolicy(
            ttft_target_s=f.number("ttftTargetSeconds", 0.0), itl_target_s=f.number("itlTargetSeconds", 0.0),
            percentile=f.number("percentile", d.percentile),
            min_prefill=f.int("minPrefill", d.min_prefill, minimum=0),
            max_prefill=f.int("maxPrefill", d.max_prefill, minimum=0),
            min_decode=f.int("minDecode", d.min_decode, minimum=1),
            max_decode=f.int("maxDecode", d.max_decode, minimum=1), gpu_budget=budget,
            gpus_per_prefill=max(1, s.prefill.gpu_count), gpus_per_decode=max(1, s.decode.gpu_count),
            interval_s=f.number("intervalSeconds", d.interval_s),
            scale_up_interval_s=f.number("scaleUpIntervalSeconds", None) if f.has("scaleUpIntervalSeconds") else None,
            scale_down_window_s=f.number("scaleDownWindowSeconds", d.scale_down_window_s),
            tolerance=f.number("tolerance", d.tolerance), max_batch=s.engine.max_num_seqs,
            dry_run=f.bool("dryRun", False))
    except ValueError as exc:
        raise SpecError(f.path, str(exc).removeprefix("autoscaling: ")) from None
    for role, lo, hi in (("prefill", policy.min_prefill, policy.max_prefill),
                         ("decode", policy.min_decode, policy.max_decode)):
        if not lo <= s.role(role).replicas <= hi:
            raise SpecError(f"spec.{role}.replicas", f"must be within the autoscaling range [{lo}, {hi}] (it is the "
                                                     f"starting count), got {s.role(role).replicas}")
    return policy


class MetricsSource(Protocol):
    """Where the loop's observations come from (one per InferenceService, kept across rounds)."""

    def observe(self, api: Any, namespace: str, name: str, policy: AutoscalingPolicy,
                check: bool = False) -> Observation | None:
        """The window since the previous decision (``check``: since the previous scale-up check or decision), or
        None when nothing can be observed yet (first round)."""


# ---------------------------------------------------------------------------------------------------------- scraping
_SAMPLE = re.compile(r'^(pdserve:[a-z_]+)(\{[^}]*\})? ([0-9.eE+-]+|NaN|\+Inf)$')
_LE = re.compile(r'le="([^"]+)"')


def parse_metrics(text: str) -> dict[str, Any]:
    """The samples of one pod's ``/metrics`` the law needs: gauges and counters by name, histograms as
    ``{name: {"sum": s, "count": n, "buckets": {le: cumulative}}}``."""
    out: dict[str, Any] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        for suffix in ("_bucket", "_sum", "_count"):
            base = name[:-len(suffix)]
            if name.endswith(suffix) and base in _HISTOGRAMS:
                h = out.setdefault(base, {"sum": 0.0, "count": 0.0, "buckets": {}})
                if suffix == "_bucket":
                    le = _LE.search(labels)
                    h["buckets"][float(le.group(1)) if le else math.inf] = value
                else:
                    h[suffix[1:]] = value
                break
        else:
            out[name] = value
    return out


_HISTOGRAMS = {"pdserve:time_to_first_token_seconds", "pdserve:inter_token_latency_seconds",
               "pdserve:request_prefill_time_seconds", "pdserve:iteration_tokens_total",
               "pdserve:request_generation_tokens", "pdserve:request_params_max_tokens"}


def histogram_quantile(prev: dict | None, cur: dict | None, q: float) -> float | None:
    """The ``q`` quantile of the observations between two scrapes of a histogram (upper bucket bound)."""
    if not cur:
        return None
    before = (prev or {}).get("buckets", {})
    buckets = sorted((le, n - before.get(le, 0.0)) for le, n in cur["buckets"].items())
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None
    for le, n in buckets:
        if n >= q * total:
            return le if math.isfinite(le) else buckets[-2][0] if len(buckets) > 1 else None
    return None


def _delta(prev: dict, cur: dict, key: str, part: str | None = None) -> float:
    a, b = prev.get(key), cur.get(key)
    if part is not None:
        a, b = (a or {}).get(part, 0.0), (b or {}).get(part, 0.0)
    return max(0.0, (b or 0.0) - (a or 0.0))


def pod_metrics_urls(api: Any, namespace: str, name: str, role: str, port: int = c.METRICS_PORT) -> dict[str, str]:
    """``/metrics`` URLs of the ready pods of one role of ``namespace/name``, by pod name."""
    import kubernetes

    core = kubernetes.client.CoreV1Api(api)
    pods = core.list_namespaced_pod(namespace, label_selector=f"{c.LABEL_SERVICE}={name},{c.LABEL_ROLE}={role}")
    out = {}
    for pod in pods.items:
        ip = pod.status.pod_ip if pod.status else None
        ready = any(cond.type == "Ready" and cond.status == "True" for cond in (pod.status.conditions or []))
        if ip and ready:
            out[pod.metadata.name] = f"http://{ip}:{port}/metrics"
    return out


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 (a pod IP the API server gave)
        return resp.read().decode()


@dataclass
class PodMetricsSource:
    """Scrapes the ready engine pods of both roles (``targets``: by default the pods' IPs on the metrics port).

    Prefill capacity uses the summed time requests spent in prefill as busy time: requests batched together count
    it twice, so the capacity comes out low and the law errs towards more prefill pods.
    """

    targets: Callable[[Any, str, str, str], dict[str, str]] = pod_metrics_urls
    fetch: Callable[[str], str] = _fetch
    _last: dict[str, dict] = field(default_factory=dict)
    _last_time: float | None = None
    _check: dict[str, dict] = field(default_factory=dict)  # the scrape the next scale-up check differences from
    _check_time: float | None = None

    def _scrape(self, api: Any, namespace: str, name: str, role: str) -> dict[str, dict]:
        out = {}
        for pod, url in self.targets(api, namespace, name, role).items():
            try:
                out[pod] = parse_metrics(self.fetch(url))
            except OSError as exc:
                log.info("metrics of %s/%s unavailable: %s", namespace, pod, exc)
        return out

    def observe(self, api: Any, namespace: str, name: str, policy: AutoscalingPolicy,
                check: bool = False) -> Observation | None:
        now = time.monotonic()
        pre, dec = self._scrape(api, namespace, name, "prefill"), self._scrape(api, namespace, name, "decode")
        if check:
            last, since = self._check, self._check_time
        else:
            last, since = self._last, self._last_time
            self._last, self._last_time = {**pre, **dec}, now
        self._check, self._check_time = {**pre, **dec}, now  # a decision starts the next check's window too
        window = (now - since) if since is not None else None
        if window is None or window <= 0:
            return None
        z: dict = {}
        arrived = sum(_delta(last.get(p, z), m, "pdserve:prompt_tokens_total") for p, m in pre.items())
        busy = sum(_delta(last.get(p, z), m, "pdserve:request_prefill_time_seconds", "sum") for p, m in pre.items())
        waiting = sum(m.get("pdserve:num_requests_waiting", 0.0) for m in pre.values())
        n_req = sum(_delta(last.get(p, z), m, "pdserve:time_to_first_token_seconds", "count") for p, m in pre.items())
        mean_prompt = arrived / n_req if n_req else 0.0
        ttft = _merged_quantile(last, pre, "pdserve:time_to_first_token_seconds", policy.percentile)
        itl = _merged_quantile(last, dec, "pdserve:inter_token_latency_seconds", policy.percentile)
        samples = []
        for p, m in dec.items():
            n = _delta(last.get(p, z), m, "pdserve:inter_token_latency_seconds", "count")
            steps = _delta(last.get(p, z), m, "pdserve:iteration_tokens_total", "count")
            if n and steps:  # the window's mean batch: tokens per step (a decode step computes one per sequence)
                batch = _delta(last.get(p, z), m, "pdserve:iteration_tokens_total", "sum") / steps
                running = m.get("pdserve:num_requests_running", 0.0)
                usage = m.get("pdserve:kv_cache_usage_perc", 0.0)
                samples.append((batch, _delta(last.get(p, z), m, "pdserve:inter_token_latency_seconds", "sum") / n,
                                usage / running * batch if running else usage))  # KV usage at the mean batch
        def dsum(pods: dict, key: str, part: str | None = None) -> float:
            return sum(_delta(last.get(p, z), m, key, part) for p, m in pods.items())

        # What arrives (None while no pod reports it: pods of an older image)
        out_key = "pdserve:requested_output_tokens_total"
        reports = any(out_key in m for m in (*pre.values(), *dec.values()))
        entered = dsum(dec, "pdserve:time_to_first_token_seconds", "count")
        return Observation(
            window_s=window, prefill_pods=len(pre), decode_pods=len(dec), arrived_prompt_tokens=arrived,
            queued_prompt_tokens=waiting * mean_prompt, prefill_computed_tokens=arrived, prefill_busy_s=busy,
            ttft_p=ttft, decode_sequences=sum(m.get("pdserve:num_requests_running", 0.0)
                                              + m.get("pdserve:num_requests_waiting", 0.0) for m in dec.values()),
            itl_p=itl, itl_samples=tuple(samples),
            kv_usage=max((m.get("pdserve:kv_cache_usage_perc", 0.0) for m in dec.values()), default=0.0),
            mean_prompt_tokens=mean_prompt, kv_usage_per_sequence=_usage_per_sequence(dec),
            arrived_output_tokens=max(dsum(pre, out_key), dsum(dec, out_key)) if reports else None,
            finished_output_tokens=dsum(dec, "pdserve:request_generation_tokens", "sum"),
            finished_max_tokens=dsum(dec, "pdserve:request_params_max_tokens", "sum"),
            prefill_steps=dsum(pre, "pdserve:iteration_tokens_total", "count"),
            mean_output_tokens=dsum(dec, out_key) / entered if entered else 0.0,
            kv_capacity_tokens=max((m.get("pdserve:kv_cache_capacity_tokens", 0.0) for m in dec.values()),
                                   default=0.0))


def _usage_per_sequence(pods: dict) -> float:
    """The decode pods' KV usage summed, over their running sequences (0 when none run)."""
    running = sum(m.get("pdserve:num_requests_running", 0.0) for m in pods.values())
    usage = sum(m.get("pdserve:kv_cache_usage_perc", 0.0) for m in pods.values())
    return usage / running if running else 0.0


def _merged_quantile(last: dict, pods: dict, key: str, q: float) -> float | None:
    """A quantile over every pod's histogram delta (buckets are the same on every pod)."""
    prev: dict = {"buckets": {}}
    cur: dict = {"buckets": {}}
    for p, m in pods.items():
        for le, n in (m.get(key) or {}).get("buckets", {}).items():
            cur["buckets"][le] = cur["buckets"].get(le, 0.0) + n
        for le, n in ((last.get(p) or {}).get(key) or {}).get("buckets", {}).items():
            prev["buckets"][le] = prev["buckets"].get(le, 0.0) + n
    return histogram_quantile(prev, cur, q) if cur["buckets"] else None


# ---------------------------------------------------------------------------------------------------------- the loop
@dataclass
class AutoscalerRun:
    """Per-InferenceService memory of the loop: the law's state and the metrics source."""

    source: MetricsSource
    state: AutoscalerState = field(default_factory=AutoscalerState)
    last_decision: float | None = None  # monotonic time of the last full decision (the rest are scale-up checks)

    def next_delay(self, policy: AutoscalingPolicy) -> float:
        """Seconds to the next round: a scale-up check, or the decision when it comes first."""
        if policy.scale_up_interval_s is None or self.last_decision is None:
            return policy.interval_s
        to_decision = self.last_decision + policy.interval_s - time.monotonic()
        return max(0.0, min(policy.scale_up_interval_s, to_decision))


def status_fields(decision: Decision, policy: AutoscalingPolicy, when: str) -> dict[str, Any]:
    """``status.autoscaling``: what the last round decided, and why."""
    return {"prefillReplicas": decision.prefill, "decodeReplicas": decision.decode,
            "wantedPrefill": decision.wanted_prefill, "wantedDecode": decision.wanted_decode,
            "budgetLimited": decision.budget_limited, "colocateRecommended": decision.colocate,
            "dryRun": policy.dry_run, "lastDecisionTime": when, "reason": decision.reason[:1000]}


def autoscale_round(api: Any, namespace: str, name: str, parsed: Any, run: AutoscalerRun,
                    when: str) -> tuple[Decision, list[str]] | None:
    """One round for a parsed spec with autoscaling: observe, decide, patch the Deployments (unless dry-run),
    write ``status.autoscaling``. Returns the decision and the replica changes made (``role old->new``), or None
    when there was nothing to observe yet."""
    from pdserve.operator import kube

    policy = parsed.autoscaling
    now = time.monotonic()
    # A decision when its interval has passed (a little early counts: the loop's sleeps are not exact), else a
    # scale-up check.
    check = (policy.scale_up_interval_s is not None and run.last_decision is not None
             and now - run.last_decision < policy.interval_s - 0.1 * policy.scale_up_interval_s)
    obs = (run.source.observe(api, namespace, name, policy, check=True) if check
           else run.source.observe(api, namespace, name, policy))
    if obs is None:
        return None
    if check:
        checked = decide_scale_up(policy, run.state, obs, now)
        if checked is None:
            return None
        decision = checked
    else:
        decision = decide(policy, run.state, obs, now)
        run.last_decision = now
    changes = []
    for role, want in (("prefill", decision.prefill), ("decode", decision.decode)):
        dep = kube.read_deployment(api, namespace, f"{name}-{role}")
        have = ((dep or {}).get("spec") or {}).get("replicas")
        if dep is None or have == want:
            continue
        changes.append(f"{role} {have}->{want}")
        if not policy.dry_run:
            kube.scale_deployment(api, namespace, f"{name}-{role}", want)
    kube.patch_status(api, namespace, name, {"autoscaling": status_fields(decision, policy, when)})
    return decision, changes
