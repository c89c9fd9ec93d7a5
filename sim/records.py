"""What ``pdserve sim`` keeps of each request and of the latencies, compact enough for 10^8 simulated tokens.

A request keeps its token count, the times of its first, second and last token and a running digest of its
tokens (the answer check compares it with the digest of the answer a correct engine gives); every token and
its time only when asked (``ClusterConfig.record_tokens``, for tests). Inter-token gaps go into histograms of
10-microsecond bins, as a Prometheus histogram would hold them, not into lists.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.sim.workload import TraceRequest

_MOD = (1 << 61) - 1  # a Mersenne prime: the digest is a polynomial hash of the token sequence


def digest_step(digest: int, token: int) -> int:
    """The digest of a token sequence extended by ``token``."""
    return (digest * 1_000_003 + token + 1) % _MOD


@dataclass
class SimRequest:
    id: str
    trace: TraceRequest
    num_tokens: int = 0
    first_token: int | None = None  # its value: the decode pod's prompt ends with it
    first_token_s: float | None = None
    second_token_s: float | None = None
    last_token_s: float | None = None
    digest: int = 0
    tokens: list[int] | None = None  # every token and its time: only with ClusterConfig.record_tokens
    token_times: list[float] | None = None
    error: str | None = None
    done: bool = False
    ended_s: float = 0.0  # when it was answered or failed
    decode_pod: str | None = None
    handle: dict | None = None  # the prefill's KV handle, for the decode pod
    waiting_for: str | None = None  # the role it waits for in the router's queue

    def add_token(self, token: int, t: float) -> None:
        n = self.num_tokens
        if n == 0:
            self.first_token, self.first_token_s = token, t
        elif n == 1:
            self.second_token_s = t
        self.last_token_s = t
        self.num_tokens = n + 1
        self.digest = digest_step(self.digest, token)
        if self.tokens is not None:
            self.tokens.append(token)
            self.token_times.append(t)  # type: ignore[union-attr]

    def add_tokens(self, tokens: list[int], times: list[float]) -> None:
        """``add_token`` for each pair, for a request that has two tokens or more already (or none to add)."""
        if not tokens:
            return
        if self.num_tokens < 2:
            for token, t in zip(tokens, times):
                self.add_token(token, t)
            return
        digest = self.digest
        for token in tokens:
            digest = (digest * 1_000_003 + token + 1) % _MOD  # digest_step, inlined: a few 10^8 tokens a run
        self.digest = digest
        self.num_tokens += len(tokens)
        self.last_token_s = times[len(tokens) - 1]
        if self.tokens is not None:
            self.tokens.extend(tokens)
            self.token_times.extend(times[:len(tokens)])  # type: ignore[union-attr]

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.trace.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (DistServe's per-request metric); None below 2 tokens."""
        if self.num_tokens < 2:
            return None
        return (self.last_token_s - self.first_token_s) / (self.num_tokens - 1)  # type: ignore[operator]


class Histogram:
    """Counts of values in bins of ``resolution`` seconds (quantiles are bin centres)."""

    def __init__(self, resolution: float = 1e-5) -> None:
        self.resolution = resolution
        self.counts: dict[int, int] = {}
        self.total = 0

    def add(self, value: float, n: int = 1) -> None:
        key = round(value / self.resolution)
        self.counts[key] = self.counts.get(key, 0) + n
        self.total += n

    def quantile(self, q: float) -> float | None:
        """The value of rank ``min(total - 1, int(q * total))`` in sorted order, to the bin; None if empty."""
        if not self.total:
            return None
        rank = min(self.total - 1, int(q * self.total))
        seen = 0
        for key in sorted(self.counts):
            seen += self.counts[key]
            if seen > rank:
                return key * self.resolution
        raise AssertionError("unreachable: the counts sum to total")
