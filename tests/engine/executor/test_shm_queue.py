"""The shared-memory ring buffer: every reader sees every message once, in order; the writer never overwrites a
message a reader has not consumed; waits end through ``on_idle`` / ``timeout_s``."""

from __future__ import annotations

import multiprocessing

import pytest

from pdserve.engine.executor.shm_queue import MessageTooLargeError, ShmRingBuffer


def test_every_reader_gets_every_message_in_order_across_wraparound() -> None:
    ring = ShmRingBuffer(num_readers=2, num_slots=3, capacity=64)
    readers = [ShmRingBuffer.attach(ring.handle()) for _ in range(2)]
    try:
        for i in range(10):  # more messages than slots: slots are reused once both readers consumed them
            ring.write(f"m{i}".encode(), b"|", bytes([i]))
            assert [r.read(k, timeout_s=1) for k, r in enumerate(readers)] == [f"m{i}|".encode() + bytes([i])] * 2
    finally:
        for r in readers:
            r.close()
        ring.close()


def test_writer_waits_for_the_slowest_reader() -> None:
    ring = ShmRingBuffer(num_readers=2, num_slots=2, capacity=16)
    fast, slow = ShmRingBuffer.attach(ring.handle()), ShmRingBuffer.attach(ring.handle())
    try:
        ring.write(b"a")
        ring.write(b"b")
        assert fast.read(0, timeout_s=1) == b"a" and fast.read(0, timeout_s=1) == b"b"

        class Blocked(Exception):
            pass

        def give_up() -> None:
            raise Blocked

        with pytest.raises(Blocked):  # slot of "a" is still unread by the slow reader
            ring.write(b"c", on_idle=give_up)
        assert slow.read(1, timeout_s=1) == b"a"
        ring.write(b"c")
        assert slow.read(1, timeout_s=1) == b"b" and slow.read(1, timeout_s=1) == b"c"
        assert fast.read(0, timeout_s=1) == b"c"
    finally:
        fast.close()
        slow.close()
        ring.close()


def test_limits_are_clear() -> None:
    ring = ShmRingBuffer(num_readers=1, num_slots=1, capacity=8)
    reader = ShmRingBuffer.attach(ring.handle())
    try:
        with pytest.raises(MessageTooLargeError, match="9-byte message does not fit the 8-byte slots"):
            ring.write(b"x" * 9)
        with pytest.raises(TimeoutError, match="no message"):
            reader.read(0, timeout_s=0.1)
    finally:
        reader.close()
        ring.close()


def _echo(handle_in, handle_out) -> None:
    src, dst = ShmRingBuffer.attach(handle_in), ShmRingBuffer.attach(handle_out)
    while (msg := src.read(0, timeout_s=30)) != b"stop":
        dst.write(msg[::-1])
    src.close()
    dst.close()


def test_across_processes() -> None:
    to_child, from_child = ShmRingBuffer(1, 2, 1024), ShmRingBuffer(1, 2, 1024)
    proc = multiprocessing.get_context("spawn").Process(target=_echo, args=(to_child.handle(), from_child.handle()))
    proc.start()
    try:
        for word in (b"abc", b"", b"x" * 1000):
            to_child.write(word)
            assert from_child.read(0, timeout_s=60) == word[::-1]
        to_child.write(b"stop")
        proc.join(timeout=30)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
        to_child.close()
        from_child.close()
