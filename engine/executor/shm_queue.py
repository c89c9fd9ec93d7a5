"""A one-writer, many-reader ring buffer in shared memory: how a step reaches every rank.

The engine core writes each step's scheduler output once; every worker reads the same bytes from the same shared
pages (no socket, no copy per reader). The result queue is the same structure with one reader (the core) and one
writer (the rank that holds the logits).

Layout of the shared block (all counters are 8-byte signed integers, written and read whole)::

    [ read count of reader 0 | ... | reader N-1 ]            N counters: messages each reader has consumed
    [ slot 0: seq | length | payload (capacity bytes) ]       seq = message number + 1 once written
    [ slot 1: ... ]  ...  [ slot S-1 ]

Message ``m`` goes to slot ``m % S``. The writer may reuse a slot once every reader has consumed the message that
was in it (``m - min(read counts) < S``); it writes the payload and length first and the ``seq`` last, so a reader
that sees ``seq == m + 1`` sees the whole message (stores are not reordered on x86-64; on weaker memory models the
Python interpreter's own locking between the writes orders them too).

Waiting polls: a short burst of yields (a step's message usually arrives within microseconds), then sleeps that
grow to a millisecond so that idle ranks do not burn the CPU. ``on_idle`` is called every ~50 ms while waiting:
supervision (a dead peer, a dead parent) raises from there, so no wait can hang.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from multiprocessing import shared_memory

_WORD = 8
_SPIN = 200  # polls with time.sleep(0) before sleeping for real
_MAX_SLEEP_S = 1e-3
_IDLE_EVERY_S = 0.05


class MessageTooLargeError(ValueError):
    """A message does not fit one slot of the ring buffer."""


class ShmRingBuffer:
    """One writer, ``num_readers`` readers, ``num_slots`` slots of ``capacity`` bytes in a named shared block.

    The creator (``create=True``) owns the block and unlinks it in :meth:`close`; other processes attach by
    :attr:`name`. A process is either the writer or reader ``reader_index``.
    """

    def __init__(self, num_readers: int, num_slots: int, capacity: int, *, name: str | None = None,
                 create: bool = True) -> None:
        if num_readers < 1 or num_slots < 1 or capacity < 1:
            raise ValueError("a ring buffer needs at least one reader, one slot and one byte per slot")
        capacity = -(-capacity // _WORD) * _WORD  # whole words, so the block casts to 8-byte integers
        self.num_readers, self.num_slots, self.capacity = num_readers, num_slots, capacity
        self._slot_size = 2 * _WORD + capacity
        size = num_readers * _WORD + num_slots * self._slot_size
        self._owner = create
        self._shm = shared_memory.SharedMemory(name=name, create=create, size=size)
        if create:
            self._shm.buf[:size] = bytes(size)  # every counter starts at 0 (seq 0: never written)
        self._words = self._shm.buf.cast("q")  # the whole block as 8-byte integers (for the counters)
        self._written = 0  # writer: messages written
        self._read = 0  # reader: messages consumed

    @property
    def name(self) -> str:
        return self._shm.name

    def handle(self) -> tuple[int, int, int, str]:
        """What another process passes to :meth:`attach`."""
        return self.num_readers, self.num_slots, self.capacity, self.name

    @classmethod
    def attach(cls, handle: tuple[int, int, int, str]) -> "ShmRingBuffer":
        num_readers, num_slots, capacity, name = handle
        return cls(num_readers, num_slots, capacity, name=name, create=False)

    # ------------------------------------------------------------------ writer
    def write(self, *parts: bytes | memoryview, on_idle: Callable[[], None] | None = None) -> None:
        """Write one message, the concatenation of ``parts`` (a header and a tensor's bytes, say: no join copy)."""
        views = [memoryview(p) for p in parts]
        views = [v.cast("B") for v in views if v.nbytes]  # (an empty tensor's view cannot be cast: skipped)
        length = sum(len(v) for v in views)
        if length > self.capacity:
            raise MessageTooLargeError(f"a {length}-byte message does not fit the {self.capacity}-byte slots of "
                                       f"the shared-memory queue")
        m = self._written
        _wait(lambda: m - min(self._words[:self.num_readers]) < self.num_slots, on_idle)
        base = self._slot_base(m)
        pos = base + 2 * _WORD
        for view in views:
            self._shm.buf[pos:pos + len(view)] = view
            pos += len(view)
        self._words[base // _WORD + 1] = length
        self._words[base // _WORD] = m + 1  # published: readers may take it from here on
        self._written = m + 1

    # ------------------------------------------------------------------ reader
    def read(self, reader_index: int, on_idle: Callable[[], None] | None = None,
             timeout_s: float | None = None) -> bytes:
        """The next message for reader ``reader_index`` (a copy: the slot is released on return).
        ``TimeoutError`` after ``timeout_s`` seconds without one."""
        m = self._read
        base = self._slot_base(m)
        _wait(lambda: self._words[base // _WORD] == m + 1, on_idle, timeout_s)
        length = self._words[base // _WORD + 1]
        data = bytes(self._shm.buf[base + 2 * _WORD:base + 2 * _WORD + length])
        self._read = m + 1
        self._words[reader_index] = m + 1
        return data

    def close(self) -> None:
        """Detach; the creator also unlinks the block (attached processes keep their mapping until they close)."""
        self._words.release()
        self._shm.close()
        if self._owner:
            try:
                self._shm.unlink()
            except FileNotFoundError:
                pass

    def _slot_base(self, m: int) -> int:
        return self.num_readers * _WORD + (m % self.num_slots) * self._slot_size


def _wait(ready: Callable[[], bool], on_idle: Callable[[], None] | None, timeout_s: float | None = None) -> None:
    polls, sleep = 0, 1e-5
    start = last_idle = time.monotonic()
    while not ready():
        polls += 1
        if polls < _SPIN:
            time.sleep(0)
            continue
        time.sleep(sleep)
        sleep = min(sleep * 2, _MAX_SLEEP_S)
        now = time.monotonic()
        if now - last_idle >= _IDLE_EVERY_S:
            last_idle = now
            if on_idle is not None:
                on_idle()
            if timeout_s is not None and now - start > timeout_s:
                raise TimeoutError(f"no message in the shared-memory queue after {timeout_s:.0f}s")
