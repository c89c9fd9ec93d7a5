"""Token-level traces for ``pdserve sim``: phases of arrivals with their own rate, burstiness, prompt/output mix
and tenants.

The arrival process is the one of ``pdserve bench serve`` (gamma-distributed gaps of mean ``1/rate``; burstiness 1
is Poisson, below 1 burstier). Requests are token ids, not text: a tenant's requests start with that tenant's
shared prefix, so prefix caching sees what a multi-tenant workload gives it.

A trace is written as ``PHASE[;PHASE...]``, each ``key=value,...`` with keys ``duration`` (s), ``rate`` (req/s),
``in`` and ``out`` (mean tokens; ``in=200:2000`` draws uniformly), ``burst`` (gamma shape), ``tenants`` and
``prefix`` (tokens shared per tenant). Example, prompt-heavy then decode-heavy::

    duration=120,rate=20,in=3000,out=50;duration=120,rate=20,in=200,out=600
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Phase:
    duration_s: float
    rate: float
    input_len: tuple[int, int]
    output_len: tuple[int, int]
    burstiness: float = 1.0
    tenants: int = 0
    prefix_len: int = 0

    def __post_init__(self) -> None:
        if self.duration_s <= 0 or self.rate <= 0 or self.burstiness <= 0:
            raise ValueError("a phase needs a positive duration, rate and burstiness")
        for lo, hi in (self.input_len, self.output_len):
            if not 1 <= lo <= hi:
                raise ValueError(f"token lengths must satisfy 1 <= low <= high, got {lo}:{hi}")
        if self.tenants < 0 or self.prefix_len < 0 or (self.prefix_len and not self.tenants):
            raise ValueError("a shared prefix needs tenants >= 1")


@dataclass(frozen=True)
class TraceRequest:
    """One request. Its prompt (a tenant's shared head, then a body of distinct tokens) is made when asked for,
    so a trace of 10^8 prompt tokens takes a few bytes a request."""

    arrival_s: float
    max_tokens: int
    tenant: int | None
    head: tuple[int, ...]
    body_start: int
    body_len: int
    vocab_size: int

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.head) + self.body_len

    @property
    def prompt(self) -> tuple[int, ...]:
        # A random start and a fixed stride: distinct prompts, cheap to make.
        v, stride = self.vocab_size - 1, 2654435761
        start = self.body_start
        return self.head + tuple([x % v + 1 for x in range(start, start + self.body_len * stride, stride)])


def _span(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    return int(lo), int(hi or lo)


def parse_trace(text: str) -> list[Phase]:
    """Phases from ``key=value`` lists separated by ``;`` (``ValueError`` naming a bad key or value)."""
    phases = []
    keys = {"duration", "rate", "in", "out", "burst", "tenants", "prefix"}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        kv = dict(item.split("=", 1) for item in part.split(",") if "=" in item)
        unknown = set(kv) - keys
        if unknown or len(kv) != len(part.split(",")):
            raise ValueError(f"trace phase {part!r}: use key=value pairs of {sorted(keys)}")
        try:
            phases.append(Phase(float(kv.get("duration", 60)), float(kv.get("rate", 1)),
                                _span(kv.get("in", "512")), _span(kv.get("out", "128")),
                                float(kv.get("burst", 1)), int(kv.get("tenants", 0)), int(kv.get("prefix", 0))))
        except ValueError as exc:
            raise ValueError(f"trace phase {part!r}: {exc}") from None
    if not phases:
        raise ValueError("a trace needs at least one phase")
    return phases


def generate(phases: list[Phase], vocab_size: int = 32000, seed: int = 0) -> list[TraceRequest]:
    """The requests of ``phases`` in arrival order (deterministic for a seed)."""
    rng = random.Random(seed)
    out: list[TraceRequest] = []
    start = 0.0
    for ph in phases:
        prefixes = [tuple(rng.randrange(1, vocab_size) for _ in range(ph.prefix_len)) for _ in range(ph.tenants)]
        t = start
        while True:
            t += rng.gammavariate(ph.burstiness, 1.0 / (ph.rate * ph.burstiness))
            if t >= start + ph.duration_s:
                break
            n_in, n_out = rng.randint(*ph.input_len), rng.randint(*ph.output_len)
            tenant = rng.randrange(ph.tenants) if ph.tenants else None
            head = prefixes[tenant] if tenant is not None else ()
            out.append(TraceRequest(t, n_out, tenant, head, rng.getrandbits(32), max(1, n_in - len(head)), vocab_size))
        start += ph.duration_s
    return out
