"""The per-request timeline: where the time to first token (and after it) went, phase by phase.

A timeline is a start mark and a list of phases, each ending at a measured wall-clock mark (``time.time()``);
a phase lasts from the previous phase's end to its own, so the phases tile the timeline and their sum up to the
first token *is* the measured time to first token. Every mark is a real measurement taken where the event
happened (the router, a pod's handler, the engine core); hand-offs between processes are phases of their own
(``router_to_prefill``, ``prefill_to_router``, ...), so no phase is a remainder. Across hosts the hand-off phases
also carry the hosts' clock offset (their sum stays exact).

A remote-prefill request through the router::

    received ─routing─▶ routed ─router_to_prefill─▶ [prefill pod: queue ─▶ kv_load ─▶ compute ─▶ respond]
      ─prefill_to_router─▶ router_respond ══ first token to the client (TTFT ends here)
      ─router_to_decode─▶ [decode pod: queue ─▶ kv_load ─▶ compute ─▶ respond] ─decode_to_router─▶
      ─decode_stream─▶ last token

A decode-only request goes ``routing`` → ``router_to_decode`` → decode pod → ``decode_to_router`` →
``router_respond`` (first token) → ``decode_stream``. A single server (``pdserve serve``) has ``api_receive``
(HTTP handler to engine queue) → ``queue`` → ``kv_load`` → ``compute`` → ``respond`` → ``stream``.
docs/observability.md describes each phase.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Any

# Marks an engine front end attaches to a sequence's outputs (``RequestOutput.timing``): its own "arrival" (the
# engine queued it) and the core's (``Request.timing_marks``).
ENGINE_MARKS = ("arrival", "kv_load_start", "kv_load_end", "scheduled", "first_token")


@dataclass
class RequestTiming:
    """What a front end knows about one HTTP/gRPC request before the engine sees it (set by the front end in
    :data:`CURRENT`): when it arrived, and whether the client asked for the timeline."""

    received: float
    wanted: bool = False
    header: str = ""  # the compact timeline, once known (the response header of a non-streamed response)


# The request being handled (HTTP middleware / gRPC handler -> engine client), or None outside one.
CURRENT: contextvars.ContextVar[RequestTiming | None] = contextvars.ContextVar("pdserve_request_timing",
                                                                               default=None)


@dataclass
class PodMarks:
    """One engine pod's marks of one sequence (``PodTiming`` on the wire); 0 for a mark that did not happen."""

    received: float = 0.0
    kv_load_start: float = 0.0
    kv_load_end: float = 0.0
    kv_load_bytes: int = 0
    scheduled: float = 0.0
    first_token: float = 0.0
    sent: float = 0.0
    role: str = ""
    connector: str = ""

    @classmethod
    def from_engine(cls, marks: dict[str, float] | None, *, received: float, sent: float, role: str,
                    connector: str | None) -> "PodMarks":
        """From an engine output's ``timing`` and the handler's own marks."""
        m = marks or {}
        return cls(received=received, kv_load_start=m.get("kv_load_start", 0.0),
                   kv_load_end=m.get("kv_load_end", 0.0), kv_load_bytes=int(m.get("kv_load_bytes", 0)),
                   scheduled=m.get("scheduled", 0.0), first_token=m.get("first_token", 0.0), sent=sent, role=role,
                   connector=connector or "")

    def to_pb(self, pb_cls: Any) -> Any:
        return pb_cls(received=self.received, kv_load_start=self.kv_load_start, kv_load_end=self.kv_load_end,
                      kv_load_bytes=self.kv_load_bytes, scheduled=self.scheduled, first_token=self.first_token,
                      sent=self.sent, role=self.role, connector=self.connector)

    @classmethod
    def from_pb(cls, msg: Any) -> "PodMarks":
        return cls(received=msg.received, kv_load_start=msg.kv_load_start, kv_load_end=msg.kv_load_end,
                   kv_load_bytes=int(msg.kv_load_bytes), scheduled=msg.scheduled, first_token=msg.first_token,
                   sent=msg.sent, role=msg.role, connector=msg.connector)

    @property
    def complete(self) -> bool:
        """Whether the marks every pod phase needs are there (a pod of an older version sends none)."""
        return bool(self.received and self.first_token and self.sent)


@dataclass(frozen=True)
class Phase:
    name: str
    role: str  # router | prefill | decode | both (a single server)
    pod: str
    start: float
    end: float
    connector: str = ""
    kv_bytes: int = 0

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass
class Timeline:
    """Phases from ``start`` on; see the module docstring. ``first_token_at`` closes the TTFT part."""

    start: float
    phases: list[Phase] = field(default_factory=list)
    first_token_at: float | None = None
    connector: str = ""

    @property
    def end(self) -> float:
        return self.phases[-1].end if self.phases else self.start

    def add(self, name: str, end: float, role: str, pod: str, *, kv_bytes: int = 0) -> None:
        """A phase from the current end to ``end`` (a measured mark)."""
        self.phases.append(Phase(name, role, pod, self.end, end, self.connector, kv_bytes))

    def add_pod(self, prefix: str, marks: PodMarks, pod: str, hop_name: str) -> None:
        """The hop to a pod and the pod's own phases: ``hop_name`` (to ``received``), ``{prefix}_queue``,
        ``{prefix}_kv_load`` (only when a load happened), ``{prefix}_compute``, ``{prefix}_respond``."""
        role = marks.role or prefix
        if marks.connector and not self.connector:
            self.connector = marks.connector
        self.add(hop_name, marks.received, role, pod)
        loaded = marks.kv_load_start > 0
        if loaded:
            self.add(f"{prefix}_queue", marks.kv_load_start, role, pod)
            self.add(f"{prefix}_kv_load", marks.kv_load_end, role, pod, kv_bytes=marks.kv_load_bytes)
        elif marks.scheduled:
            self.add(f"{prefix}_queue", marks.scheduled, role, pod)
        # From the first scheduling (or the load's end) to the token the core produced.
        self.add(f"{prefix}_compute", marks.first_token, role, pod)
        self.add(f"{prefix}_respond", marks.sent, role, pod)

    def mark_first_token(self) -> None:
        self.first_token_at = self.end

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.start

    def ttft_phases(self) -> list[Phase]:
        """The phases that make up the time to first token."""
        if self.first_token_at is None:
            return []
        return [p for p in self.phases if p.end <= self.first_token_at]

    def as_dict(self) -> dict[str, Any]:
        """The ``pdserve_timing`` object of a response (docs/observability.md)."""
        ttft = self.ttft
        return {"ttft_s": _r(ttft) if ttft is not None else None, "total_s": _r(self.end - self.start),
                "start": self.start, "connector": self.connector or None,
                "phases": [{"phase": p.name, "role": p.role, "pod": p.pod, "seconds": _r(p.seconds),
                            "ttft": self.first_token_at is not None and p.end <= self.first_token_at,
                            **({"kv_bytes": p.kv_bytes} if p.name.endswith("kv_load") else {})}
                           for p in self.phases]}

    def header_value(self) -> str:
        """The compact ``x-pdserve-timing`` header: ``name=milliseconds`` pairs, TTFT first."""
        parts = [f"ttft={self.ttft * 1000:.2f}"] if self.ttft is not None else []
        parts += [f"{p.name}={p.seconds * 1000:.2f}" for p in self.phases]
        return ";".join(parts)


def header_from_dict(timing: dict[str, Any]) -> str:
    """:meth:`Timeline.header_value` of a timeline already turned into :meth:`Timeline.as_dict`."""
    parts = [f"ttft={timing['ttft_s'] * 1000:.2f}"] if timing.get("ttft_s") is not None else []
    parts += [f"{p['phase']}={p['seconds'] * 1000:.2f}" for p in timing.get("phases", [])]
    return ";".join(parts)


def engine_timeline(received: float, marks: dict[str, float], delivered: float, last: float, role: str,
                    connector: str | None, pod: str) -> Timeline:
    """The timeline of a sequence served by one engine behind its own front end (``pdserve serve``):
    ``api_receive`` (handler to engine queue), ``queue``, ``kv_load``, ``compute``, ``respond`` (core to the
    handler), then ``stream`` to the last token."""
    tl = Timeline(received, connector=connector or "")
    tl.add("api_receive", marks.get("arrival", received), role, pod)
    pod_marks = PodMarks.from_engine(marks, received=tl.end, sent=delivered, role=role, connector=connector)
    if pod_marks.kv_load_start > 0:
        tl.add("queue", pod_marks.kv_load_start, role, pod)
        tl.add("kv_load", pod_marks.kv_load_end, role, pod, kv_bytes=pod_marks.kv_load_bytes)
    elif pod_marks.scheduled:
        tl.add("queue", pod_marks.scheduled, role, pod)
    tl.add("compute", pod_marks.first_token, role, pod)
    tl.add("respond", delivered, role, pod)
    tl.mark_first_token()
    tl.add("stream", max(last, delivered), role, pod)
    return tl


def _r(x: float) -> float:
    return round(x, 6)
