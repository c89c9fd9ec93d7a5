"""``PDSERVE_STEP_TRACE=FILE``: one JSON line per engine step, for telling an engine stall from a server one.

A streaming client sees an inter-token gap whenever the engine takes long over a step *or* the process between
the engine and the socket (the API server) stops for a while. With this set, every engine core appends, per step,
when it ended (wall clock, seconds since the epoch, comparable with a benchmark's request timestamps), how long it
took and what it held, so a benchmark's gaps can be matched against the engine's steps
(``scripts/serve_gaps.py --steps FILE``). A gap the steps do not explain happened outside the engine.

Lines are written unbuffered-per-line (a write per step, microseconds), so a killed server loses nothing. Several
processes (data-parallel cores, ``pdserve up``'s prefill and decode engines) may share one file: each line carries
its process id and the engine's role.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, TextIO

ENV = "PDSERVE_STEP_TRACE"


class StepTrace:
    """Appends step records to a file; see the module docstring."""

    def __init__(self, path: str, role: str = "both") -> None:
        self.path = path
        self._prefix = {"pid": os.getpid(), "role": role}
        self._file: TextIO | None = open(path, "a", buffering=1, encoding="utf-8")

    @classmethod
    def from_env(cls, role: str = "both") -> "StepTrace | None":
        """The trace ``PDSERVE_STEP_TRACE`` names, or None when it is unset or empty."""
        path = os.environ.get(ENV, "").strip()
        if not path:
            return None
        try:
            return cls(path, role)
        except OSError as err:
            raise ValueError(f"{ENV}={path!r}: cannot append to it ({err.strerror})") from None

    def write(self, stat: Any, end: float | None = None) -> None:
        """One step: ``stat`` is a :class:`~pdserve.engine.engine_core.StepStat`; ``end`` its wall-clock end."""
        if self._file is None:
            return
        record = dict(self._prefix, end=round(time.time() if end is None else end, 6),
                      ms=round(stat.duration_s * 1e3, 3), tokens=stat.num_tokens, seqs=stat.num_seqs,
                      decodes=stat.num_decodes, context=stat.total_context)
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")

    def close(self) -> None:
        """Stop writing (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None

