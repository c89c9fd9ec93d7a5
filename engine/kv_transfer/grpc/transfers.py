"""The transfers a prefill pod holds for decode pods: transfer id -> blocks, under a lease. Pure Python (the
worker half adds what the scheduler half's metadata names, the KV server reads them).

The handle reaches the decode pod in the step that finished the prefill; the transfer is registered at the start
of the next step. A call may come in between: a pull waits briefly for the registration (``wait_s``), and a
``Release`` of a transfer not registered yet is remembered (a tombstone, bounded in number and age), so the
transfer is released the moment it is added."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.engine.kv_transfer.base import BlockRef


@dataclass
class _Transfer:
    blocks: tuple[BlockRef, ...]
    expires_at: float
    active_pulls: int = 0
    released: bool = False  # Release came while pulls were running: freed when the last one ends


class TransferRegistry:
    """Transfers a producer holds for its peers: transfer id -> blocks, with a lease. Thread-safe.

    Pulls are reference-counted: neither ``Release`` nor the lease frees a transfer's blocks while a pull reads
    them (another request would be written into them and streamed under the original hashes); a released
    transfer takes no new pulls and is freed when its last pull ends.
    """

    MAX_TOMBSTONES = 4096
    TOMBSTONE_S = 300.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._added = threading.Condition(self._lock)
        self._transfers: dict[str, _Transfer] = {}
        self._released: set[str] = set()
        # ended (released, expired) or released before added -> when to forget it
        self._tombstones: OrderedDict[str, float] = OrderedDict()

    def add(self, transfer_id: str, blocks: Sequence[BlockRef], lease_s: float) -> None:
        with self._lock:
            if self._tombstones.pop(transfer_id, None) is not None:
                self._released.add(transfer_id)  # its peer gave it up already: free the blocks at once
                return
            self._transfers[transfer_id] = _Transfer(tuple(blocks), time.monotonic() + lease_s)
            self._added.notify_all()

    def _wait_for(self, transfer_id: str, wait_s: float) -> _Transfer | None:
        """The live transfer (lock held), waiting up to ``wait_s`` for it to be added."""
        deadline = time.monotonic() + wait_s
        t = self._transfers.get(transfer_id)
        while t is None and transfer_id not in self._tombstones:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._added.wait(left)
            t = self._transfers.get(transfer_id)
        return None if t is None or t.released else t

    def begin_pull(self, transfer_id: str, wait_s: float = 0.0) -> tuple[BlockRef, ...] | None:
        """The transfer's blocks, pinned until :meth:`end_pull` (None when unknown or expired)."""
        with self._lock:
            t = self._wait_for(transfer_id, wait_s)
            if t is None:
                return None
            t.active_pulls += 1
            return t.blocks

    def pin(self, transfer_id: str, seconds: float, wait_s: float = 0.0) -> tuple[BlockRef, ...] | None:
        """The transfer's blocks, its lease extended to at least ``seconds`` from now (None when unknown or
        expired): a peer copying them itself (CUDA IPC) gets that long before they can be reused."""
        with self._lock:
            t = self._wait_for(transfer_id, wait_s)
            if t is None:
                return None
            t.expires_at = max(t.expires_at, time.monotonic() + seconds)
            return t.blocks

    def end_pull(self, transfer_id: str) -> None:
        with self._lock:
            t = self._transfers.get(transfer_id)
            if t is not None:
                t.active_pulls -= 1
                if t.released and t.active_pulls <= 0:
                    del self._transfers[transfer_id]
                    self._released.add(transfer_id)
                    self._tombstone(transfer_id)

    def release(self, transfer_id: str) -> bool:
        """The peer is done: forget the transfer (after its running pulls end); the worker reports it so the
        scheduler frees the blocks. False when the transfer is unknown or already released."""
        with self._lock:
            t = self._transfers.get(transfer_id)
            if t is None:
                self._tombstone(transfer_id)
                return False
            if t.released:
                return False
            if t.active_pulls > 0:
                t.released = True
                return True
            del self._transfers[transfer_id]
            self._released.add(transfer_id)
            self._tombstone(transfer_id)
            return True

    def _tombstone(self, transfer_id: str) -> None:
        now = time.monotonic()
        while self._tombstones and (len(self._tombstones) >= self.MAX_TOMBSTONES
                                    or next(iter(self._tombstones.values())) < now):
            self._tombstones.popitem(last=False)
        self._tombstones[transfer_id] = now + self.TOMBSTONE_S
        self._added.notify_all()  # a pull waiting for it gives up now

    def take_released(self) -> set[str]:
        with self._lock:
            out, self._released = self._released, set()
            return out

    def expire(self, now: float | None = None) -> list[str]:
        """Forget and return the transfers whose lease ran out (never one being pulled right now)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            gone = [tid for tid, t in self._transfers.items() if t.expires_at <= now and t.active_pulls == 0]
            for tid in gone:
                del self._transfers[tid]
                self._tombstone(tid)  # a late pull is told at once, not after waiting for a registration
            return gone

    def __contains__(self, transfer_id: str) -> bool:
        with self._lock:
            return transfer_id in self._transfers

    def __len__(self) -> int:
        with self._lock:
            return len(self._transfers)
