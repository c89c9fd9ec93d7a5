"""The key-value block store that the ``shared-fs`` and ``redis`` connectors write to and read from.

Keys are block hashes (hex) inside a namespace derived from the KV descriptor (model and tensor-parallel shard);
values are block objects in the format of :mod:`.block_format`. Stores are content-addressed caches: writing a key
twice writes the same bytes, anything may be evicted at any time, and a reader validates whatever it gets back.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Callable, Union

# A whole object, or its parts in order (written without joining them where the store can).
Blob = Union[bytes, bytearray, memoryview, Sequence[Any]]


class StoreUnavailableError(RuntimeError):
    """The backing store cannot be reached (Redis down, volume not mounted). Callers treat it as a miss."""

    reason = "store_unavailable"


def redact_url(url: str) -> str:
    """``url`` without its userinfo (``redis://user:pass@host`` -> ``redis://host``): for logs, errors, labels."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
    except ValueError:
        return "<unparsable URL>"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def block_key(block_hash: int) -> str:
    """The store key of a block: its chained 128-bit hash as 32 hex digits."""
    return f"{block_hash & ((1 << 128) - 1):032x}"


class BlockStore(ABC):
    """A shared cache of block objects. Implementations are thread-safe (a loader and a writer use one)."""

    name = "abstract"

    @abstractmethod
    def put(self, key: str, blob: Blob) -> None:
        """Store ``blob`` (bytes, or a list of buffers making one object) under ``key`` atomically: a reader
        sees the whole object or nothing."""

    @abstractmethod
    def get(self, key: str) -> bytes | None:
        """The object under ``key``, or None when absent (evicted, expired, never written)."""

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """``get`` for several keys (stores with a network round trip batch them)."""
        return [self.get(k) for k in keys]

    @abstractmethod
    def contains(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key is present now (it may still vanish before it is read)."""

    def count_prefix(self, keys: Sequence[str]) -> int:
        """How many leading keys are present."""
        n = 0
        for present in self.contains(keys):
            if not present:
                break
            n += 1
        return n

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key`` if present (tests and repair; eviction is the store's own business)."""

    def close(self) -> None:
        """Release connections and files."""


def join_blob(blob: Blob) -> Any:
    """One bytes-like object from a blob given whole or in parts."""
    return b"".join(blob) if isinstance(blob, (list, tuple)) else blob


def blob_size(blob: Blob) -> int:
    return sum(memoryview(p).nbytes for p in blob) if isinstance(blob, (list, tuple)) else memoryview(blob).nbytes


class ShardStores:
    """The store of each tensor-parallel shard's namespace (see :mod:`..head_shards`): ``own`` for this cache's,
    others opened with ``open_namespace`` on first use and kept (a cross-TP load reads a peer layout's shards)."""

    def __init__(self, own: BlockStore, own_namespace: str, open_namespace: Callable[[str], BlockStore] | None
                 ) -> None:
        self.own = own
        self._open = open_namespace
        self._stores: dict[str, BlockStore] = {own_namespace: own}
        self._lock = threading.Lock()

    def get(self, namespace: str) -> BlockStore:
        with self._lock:
            store = self._stores.get(namespace)
            if store is None:
                if self._open is None:
                    raise StoreUnavailableError(f"no store for KV namespace {namespace} (this connector reads only "
                                                f"its own tensor-parallel layout)")
                store = self._stores[namespace] = self._open(namespace)
            return store

    def close(self) -> None:
        with self._lock:
            for store in self._stores.values():
                store.close()
            self._stores.clear()
