"""Running requests' block tables kept on the device between steps, one row per request, sent incrementally.

The scheduler hands the runner every request's whole block table every step, but while a request runs its table
only grows, by one block every ``block_size`` decode steps (the KV cache manager extends tables and never rewrites
them). Copying every table every step costs the host a numpy row copy per request and the bus ``B x W`` ids;
instead each request keeps a row of a device tensor, a step sends only the ids that row lacks, and the decode
graph gathers its batch's rows on the device.

A row is reused only for the very table it holds: a step's table must extend the ids the row was last sent
(a list comparison, cheap because both lists hold the same int objects), or the row is rewritten whole. So a
request id that comes back with another table (preempted and readmitted, or reused after finishing) can never
read stale blocks. Rows of requests the scheduler reports finished or preempted are recycled; when rows run out
anyway (a report was missed) every row is dropped and rebuilt from the next step's tables.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from pdserve.engine.core.sched_output import ScheduledChunk


class BlockTableRows:
    """``num_rows`` device rows of ``width`` block ids, plus an all-zero row (``pad_row``) for batch padding."""

    def __init__(self, num_rows: int, width: int, device: torch.device) -> None:
        self.num_rows = num_rows
        self.width = width
        self.pad_row = num_rows
        self.table = torch.zeros(num_rows + 1, width, dtype=torch.int32, device=device)  # [R + 1, W]
        self._reset()

    def _reset(self) -> None:
        self._row_of: dict[str, int] = {}
        self._sent: list[list[int] | None] = [None] * self.num_rows  # the table each row holds on the device
        self._free = list(range(self.num_rows - 1, -1, -1))

    def release(self, request_ids: Iterable[str]) -> None:
        """Recycle the rows of requests that finished or were preempted."""
        for rid in request_ids:
            row = self._row_of.pop(rid, None)
            if row is not None:
                self._sent[row] = None
                self._free.append(row)

    def assign(self, chunks: list[ScheduledChunk], rows: list[int], update_index: list[int],
               update_ids: list[int]) -> None:
        """Append each chunk's row to ``rows``, and the flat ``table`` index and value of every block id the
        device lacks to ``update_index`` / ``update_ids`` (to be scattered before the rows are read)."""
        if len(self._free) < sum(1 for c in chunks if c.request_id not in self._row_of):
            self._reset()  # more requests than rows: start over, every table sent whole
        row_of, sent, width = self._row_of, self._sent, self.width
        for c in chunks:
            ids = c.block_ids
            row = row_of.get(c.request_id)
            if row is None:
                row = self._free.pop()
                row_of[c.request_id] = row
            prev = sent[row]
            if prev is not None and (ids == prev or (len(ids) > len(prev) and ids[:len(prev)] == prev)):
                start = len(prev)  # the same table, perhaps grown: send the new ids only
            else:
                start = 0
            n = len(ids)
            if n > start:
                if n > width:
                    raise ValueError(f"request {c.request_id}: a block table of {n} blocks is wider than {width}")
                base = row * width
                update_index.extend(range(base + start, base + n))
                update_ids.extend(ids[start:] if start else ids)
                sent[row] = ids
            rows.append(row)
