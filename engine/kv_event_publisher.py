"""KV events and load reports on the wire: what an engine publishes for routers, over ZeroMQ PUB/SUB.

The engine-core process publishes one :class:`EventBatch` per step that changed its prefix cache, and at least
one every ``report_interval_s`` (with its load), so a subscriber can tell a quiet engine from a dead stream.
Frames: ``[b"kv", msgpack(EventBatch)]``. ``seq`` counts batches from 0 for one engine incarnation
(``engine_id``): a gap means lost batches, a new ``engine_id`` a restarted engine with an empty cache.

Torch-free (msgspec + pyzmq only): the router imports the message types from here.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec

from pdserve.engine.core.block_hash import hash_from_bytes, hash_to_bytes
from pdserve.engine.core.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVCacheEvent

TOPIC = b"kv"
WIRE_VERSION = 2  # 2: block hashes are 128 bits, sent as 16 bytes (msgpack integers stop at 64 bits)


class StoredMsg(msgspec.Struct, tag="stored", array_like=True):
    block_hashes: list[bytes]
    parent_hash: bytes | None
    token_ids: list[int]
    block_size: int


class RemovedMsg(msgspec.Struct, tag="removed", array_like=True):
    block_hashes: list[bytes]


class ClearedMsg(msgspec.Struct, tag="cleared", array_like=True):
    pass


class LoadMsg(msgspec.Struct, array_like=True):
    num_waiting: int
    num_running: int
    kv_cache_usage: float


class EventBatch(msgspec.Struct, array_like=True):
    version: int
    engine_id: str
    seq: int
    timestamp: float
    events: list[StoredMsg | RemovedMsg | ClearedMsg]
    load: LoadMsg | None = None


def to_wire(event: KVCacheEvent) -> StoredMsg | RemovedMsg | ClearedMsg:
    if isinstance(event, BlockStored):
        parent = None if event.parent_hash is None else hash_to_bytes(event.parent_hash)
        return StoredMsg([hash_to_bytes(h) for h in event.block_hashes], parent, list(event.token_ids),
                         event.block_size)
    if isinstance(event, BlockRemoved):
        return RemovedMsg([hash_to_bytes(h) for h in event.block_hashes])
    if isinstance(event, AllBlocksCleared):
        return ClearedMsg()
    raise TypeError(f"not a KV cache event: {event!r}")


def from_wire(msg: StoredMsg | RemovedMsg | ClearedMsg) -> KVCacheEvent:
    if isinstance(msg, StoredMsg):
        parent = None if msg.parent_hash is None else hash_from_bytes(msg.parent_hash)
        return BlockStored(tuple(hash_from_bytes(h) for h in msg.block_hashes), parent, tuple(msg.token_ids),
                           msg.block_size)
    if isinstance(msg, RemovedMsg):
        return BlockRemoved(tuple(hash_from_bytes(h) for h in msg.block_hashes))
    return AllBlocksCleared()


def batch_decoder() -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(EventBatch)


class KVEventPublisher:
    """Binds a PUB socket and publishes event batches; cheap enough to call after every engine step."""

    def __init__(self, endpoint: str, report_interval_s: float = 0.5, engine_id: str | None = None) -> None:
        import zmq

        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 10_000)  # a slow router loses batches (it notices the gap), never blocks
        self._sock.bind(endpoint)
        self.endpoint = endpoint
        self.engine_id = engine_id or uuid.uuid4().hex
        self.report_interval_s = report_interval_s
        self._encoder = msgspec.msgpack.Encoder()
        self._seq = 0
        self._last = 0.0

    def publish(self, events: list[KVCacheEvent], stats: Any = None, force: bool = False) -> bool:
        """Send ``events`` (and the load from ``stats``, a ``SchedulerStats``) if there are any or a report is
        due. Returns whether a batch went out."""
        now = time.time()
        if not events and not force and now - self._last < self.report_interval_s:
            return False
        load = None if stats is None else LoadMsg(int(stats.num_waiting), int(stats.num_running),
                                                  float(stats.kv_cache_usage))
        batch = EventBatch(WIRE_VERSION, self.engine_id, self._seq, now, [to_wire(e) for e in events], load)
        self._sock.send_multipart([TOPIC, self._encoder.encode(batch)], copy=False)
        self._seq += 1
        self._last = now
        return True

    def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()
