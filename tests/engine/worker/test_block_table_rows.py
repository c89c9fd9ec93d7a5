"""Block tables kept as device rows: only missing ids travel, and a row never serves a table it does not hold."""

from __future__ import annotations

import torch

from pdserve.engine.core.sched_output import ScheduledChunk
from pdserve.engine.worker.block_table_rows import BlockTableRows


def step(rows: BlockTableRows, tables: dict[str, list[int]]) -> tuple[list[int], int]:
    """Assign rows for one step, apply the updates as the graph runner does; returns (rows, ids sent)."""
    chunks = [ScheduledChunk(rid, [1], 0, table, True) for rid, table in tables.items()]
    got, index, ids = [], [], []
    rows.assign(chunks, got, index, ids)
    rows.table.view(-1)[torch.tensor(index, dtype=torch.int32)] = torch.tensor(ids, dtype=torch.int32)
    for row, table in zip(got, tables.values()):
        assert rows.table[row, :len(table)].tolist() == table
    return got, len(ids)


def test_only_new_ids_travel_and_replaced_tables_are_rewritten() -> None:
    rows = BlockTableRows(num_rows=4, width=8, device=torch.device("cpu"))
    (ra, rb), sent = step(rows, {"a": [5, 6], "b": [7]})
    assert sent == 3 and ra != rb and rows.pad_row == 4
    assert step(rows, {"a": [5, 6], "b": [7]}) == ([ra, rb], 0)  # unchanged: nothing sent
    assert step(rows, {"b": [7, 9], "a": [5, 6]}) == ([rb, ra], 1)  # b grew by one block
    # "a" comes back with another table (say, readmitted after preemption): its row is rewritten whole.
    assert step(rows, {"a": [3, 6, 2]})[1] == 3
    assert step(rows, {"a": [3, 6, 1]})[1] == 3  # same length, different ids: rewritten too
    assert rows.table[rows.pad_row].tolist() == [0] * 8


def test_rows_are_recycled_and_rebuilt_when_exhausted() -> None:
    rows = BlockTableRows(num_rows=2, width=4, device=torch.device("cpu"))
    (ra, rb), _ = step(rows, {"a": [1], "b": [2]})
    rows.release(["a", "unknown"])
    (rc,), sent = step(rows, {"c": [3]})
    assert rc == ra and sent == 1
    # Two new requests, no free row: every row is dropped and rebuilt, tables sent whole.
    got, sent = step(rows, {"d": [4], "e": [5, 6]})
    assert sorted(got) == [0, 1] and sent == 3
