"""Where an offline run's time goes: its steps by kind, and (optionally) the GPU kernels of a window of steps.

``pdserve bench throughput ... --step-breakdown`` splits the timed run's steps into pure-decode steps, steps with
prompt chunks that a mixed-step CUDA graph holds, and larger steps with prompt chunks that run eagerly, with each
kind's count, time, tokens and time per token. ``--profile-steps A:B`` also records steps ``A`` to ``B - 1`` of
the timed run with torch.profiler and prints their GPU kernel time by category (matmuls, attention, norms, ...)
against the window's wall time: the gap is time the GPU waited for the host.

The breakdown is what decides where an optimisation pays: e.g. a workload whose time sits in eager mixed steps
gains from graphs of larger steps, one whose decode steps are at the memory roofline does not.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass, field

# (category, pattern) in match order: the first pattern found in a kernel's name decides its category.
KERNEL_CATEGORIES = (
    ("attention", r"paged_attention|combine_splits|flash|fmha|attn"),
    ("matmul", r"gemm|cutlass|xmma|nvjet|cublas|skinny|splitk|sm90_|sm80_"),
    ("norm", r"rms_norm|layer_norm|norm_kernel"),
    ("rotary+kv write", r"rotary|write_kv|reshape_and_cache"),
    ("activation", r"silu|gelu|act_and_mul"),
    ("sampling", r"argmax|argsort|sort|topk|softmax|multinomial|exponential|sampl"),
    ("copy", r"memcpy|memset|copy|cat_|index|gather|scatter|fill"),
)


def kernel_category(name: str) -> str:
    """The category of a GPU kernel, from its name (``other`` when no pattern matches)."""
    lowered = name.lower()
    for category, pattern in KERNEL_CATEGORIES:
        if re.search(pattern, lowered):
            return category
    return "other"


@dataclass
class StepKind:
    """The steps of one kind in a run."""

    name: str
    steps: int = 0
    time_s: float = 0.0
    tokens: int = 0
    seqs: int = 0

    def add(self, stat) -> None:
        self.steps += 1
        self.time_s += stat.duration_s
        self.tokens += stat.num_tokens
        self.seqs += stat.num_seqs


def step_breakdown(stats: list, graph_top: int) -> list[StepKind]:
    """Split :class:`~pdserve.engine.engine_core.StepStat` records into pure decode, mixed steps of at most
    ``graph_top`` tokens (a mixed-step graph holds them; 0: none is captured) and larger mixed steps."""
    kinds = {k: StepKind(k) for k in ("decode", "mixed, graph", "mixed, eager")}
    for s in stats:
        if s.num_seqs and s.num_decodes == s.num_seqs:
            kinds["decode"].add(s)
        elif s.num_tokens <= graph_top:
            kinds["mixed, graph"].add(s)
        else:
            kinds["mixed, eager"].add(s)
    return list(kinds.values())


def format_breakdown(kinds: list[StepKind], wall_s: float) -> str:
    lines = [f"{'steps':<14}{'count':>7}{'time s':>9}{'share':>7}{'tokens':>10}{'tok/step':>10}{'seqs/step':>10}"
             f"{'ms/step':>9}"]
    for k in kinds:
        n = max(k.steps, 1)
        lines.append(f"{k.name:<14}{k.steps:>7}{k.time_s:>9.2f}{k.time_s / max(wall_s, 1e-12):>7.1%}{k.tokens:>10}"
                     f"{k.tokens / n:>10.1f}{k.seqs / n:>10.1f}{k.time_s / n * 1e3:>9.2f}")
    return "\n".join(lines)


@dataclass
class KernelWindow:
    """GPU kernel time of a window of steps, by category."""

    steps: int
    wall_s: float
    by_category: dict[str, float] = field(default_factory=dict)  # seconds
    top: list[tuple[str, float, int]] = field(default_factory=list)  # (name, seconds, calls)

    @property
    def busy_s(self) -> float:
        return sum(self.by_category.values())

    def format(self) -> str:
        lines = [f"kernels of {self.steps} steps: GPU busy {self.busy_s * 1e3:.1f} ms of {self.wall_s * 1e3:.1f} ms "
                 f"wall ({self.busy_s / max(self.wall_s, 1e-12):.1%}; the rest the GPU waited for the host)"]
        for cat, sec in sorted(self.by_category.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {cat:<16}{sec * 1e3:>10.2f} ms {sec / max(self.busy_s, 1e-12):>7.1%}")
        lines.append("  top kernels:")
        for name, sec, calls in self.top:
            lines.append(f"    {sec * 1e3:>9.2f} ms {calls:>7}x  {name[:100]}")
        return "\n".join(lines)


def kernel_window(events, steps: int, wall_s: float, top: int = 12) -> KernelWindow:
    """Aggregate torch.profiler's ``key_averages()`` rows (their device time) into a :class:`KernelWindow`."""
    win = KernelWindow(steps, wall_s)
    rows = []
    for e in events:
        # Only kernels: a CPU op's device time double-counts the kernels it launched.
        if getattr(e, "device_type", None) is None or "cuda" not in str(e.device_type).lower():
            continue
        sec = getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)) / 1e6
        if sec <= 0:
            continue
        cat = kernel_category(e.key)
        win.by_category[cat] = win.by_category.get(cat, 0.0) + sec
        rows.append((e.key, sec, e.count))
    win.top = sorted(rows, key=lambda r: -r[1])[:top]
    return win


def parse_window(text: str | None) -> tuple[int, int] | None:
    """``A:B`` -> ``(A, B)`` with ``0 <= A < B``; None stays None."""
    if not text:
        return None
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"--profile-steps takes A:B (step numbers of the timed run), got {text!r}") from None
    if not 0 <= a < b:
        raise ValueError(f"--profile-steps A:B needs 0 <= A < B, got {text!r}")
    return a, b


class StepWindowProfiler:
    """Wraps an engine core's ``step`` so that steps ``A`` to ``B - 1`` (counted from :meth:`arm`) run under
    torch.profiler; :attr:`result` is then their :class:`KernelWindow` (None if the run had fewer steps)."""

    def __init__(self, core, window: tuple[int, int]) -> None:
        self.core = core
        self.window = window
        self.result: KernelWindow | None = None
        self._count = -1
        self._prof = None
        self._t0 = 0.0
        self._inner = core.step

    def arm(self) -> None:
        self._count = 0
        self.core.step = self._step

    def disarm(self) -> None:
        if self._prof is not None:  # the run ended inside the window
            self._finish(self._count - self.window[0])
        self.core.step = self._inner

    def _step(self):
        a, b = self.window
        if self._count == a:
            import torch
            from torch.profiler import ProfilerActivity, profile

            self._sync()
            # On a CPU nothing runs on a device: the window then reports its wall time and no kernels.
            cuda = torch.cuda.is_available()
            self._prof = profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU])
            self._prof.__enter__()
            self._t0 = time.perf_counter()
        out = self._inner()
        self._count += 1
        if self._count == b and self._prof is not None:
            self._finish(b - a)
        return out

    def _finish(self, steps: int) -> None:
        self._sync()
        wall = time.perf_counter() - self._t0
        with contextlib.suppress(Exception):
            self._prof.__exit__(None, None, None)
        self.result = kernel_window(self._prof.key_averages(), steps, wall)
        self._prof = None

    def _sync(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
