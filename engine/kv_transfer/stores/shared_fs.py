"""The ``shared-fs`` connector: one file per block in a directory that every pod mounts.

Layout: ``<root>/<namespace>/<first two hex digits>/<block hash>.kv``. A writer writes a temporary file in the
same directory and renames it over the final name, so a reader (in any process or pod) opens either a whole block
or nothing; rename is atomic on local filesystems and on NFS within one directory. The directory is a cache with
a size cap: when the files written by this process push the estimated total over ``max_bytes``, the oldest files
(by modification time, which a read refreshes) are deleted until the total is 90 % of the cap. Temporary files left
by a killed writer are removed by the same sweep once they are a minute old.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence

from pdserve.engine.kv_transfer.stores.store import Blob, BlockStore, StoreUnavailableError, blob_size

logger = logging.getLogger(__name__)

_SUFFIX = ".kv"
_TMP_MARK = ".tmp-"
_STALE_TMP_S = 60.0
_IOV_MAX = 512  # buffers per writev (Linux allows 1024)


class SharedFSStore(BlockStore):
    """Block objects as files under ``root/namespace``; ``max_bytes`` (0: unlimited) caps the directory."""

    name = "shared-fs"

    def __init__(self, root: str, namespace: str, max_bytes: int = 0) -> None:
        if not root:
            raise ValueError("the shared-fs connector needs a directory (--kv-path)")
        self.dir = os.path.join(root, namespace)
        self.max_bytes = int(max_bytes)
        try:
            os.makedirs(self.dir, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailableError(f"cannot create KV directory {self.dir}: {exc}") from exc
        self._lock = threading.Lock()
        self._estimate = self._scan_total() if self.max_bytes else 0

    def path_of(self, key: str) -> str:
        return os.path.join(self.dir, key[:2], key + _SUFFIX)

    def put(self, key: str, blob: Blob) -> None:
        final = self.path_of(key)
        tmp = f"{final}{_TMP_MARK}{uuid.uuid4().hex[:12]}"
        parts = list(blob) if isinstance(blob, (list, tuple)) else [blob]
        try:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _write_all(fd, parts)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except OSError as exc:
            _unlink_quietly(tmp)
            raise StoreUnavailableError(f"cannot write KV block {final}: {exc}") from exc
        if self.max_bytes:
            with self._lock:
                self._estimate += blob_size(blob)
                over = self._estimate > self.max_bytes
            if over:
                self.evict()

    def get(self, key: str) -> bytearray | None:
        path = self.path_of(key)
        try:
            with open(path, "rb") as f:
                data = bytearray(os.fstat(f.fileno()).st_size)  # writable: loaders wrap it without a copy
                f.readinto(data)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreUnavailableError(f"cannot read KV block {path}: {exc}") from exc
        try:
            os.utime(path)  # a read makes the block recently used for the LRU sweep
        except OSError:
            pass  # evicted meanwhile: the bytes we hold are still whole
        return data

    def contains(self, keys: Sequence[str]) -> list[bool]:
        if not os.path.isdir(self.dir):
            raise StoreUnavailableError(f"KV directory {self.dir} is gone")
        return [os.path.exists(self.path_of(k)) for k in keys]

    def delete(self, key: str) -> None:
        _unlink_quietly(self.path_of(key))

    # ------------------------------------------------------------------ size cap
    def evict(self) -> int:
        """Delete the least recently used blocks until the directory is under 90 % of the cap; returns bytes freed."""
        files, total = self._list()
        target = int(self.max_bytes * 0.9)
        freed = 0
        files.sort()  # oldest mtime first
        for _mtime, size, path in files:
            if total - freed <= target:
                break
            _unlink_quietly(path)
            freed += size
        with self._lock:
            self._estimate = total - freed
        if freed:
            logger.debug("shared-fs: evicted %d bytes from %s", freed, self.dir)
        return freed

    def total_bytes(self) -> int:
        return self._list()[1]

    def _scan_total(self) -> int:
        return self._list()[1]

    def _list(self) -> tuple[list[tuple[float, int, str]], int]:
        """(mtime, size, path) of every block file, and their total size; removes stale temporary files."""
        out, total, now = [], 0, time.time()
        try:
            subdirs = list(os.scandir(self.dir))
        except FileNotFoundError:
            return [], 0
        for sub in subdirs:
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub.path):
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                if _TMP_MARK in entry.name:
                    if now - st.st_mtime > _STALE_TMP_S:
                        _unlink_quietly(entry.path)
                    continue
                if entry.name.endswith(_SUFFIX):
                    out.append((st.st_mtime, st.st_size, entry.path))
                    total += st.st_size
        return out, total


def _write_all(fd: int, parts: list) -> None:
    """Write buffers with as few system calls as possible (``writev``), handling short writes."""
    views = [memoryview(p).cast("B") for p in parts if memoryview(p).nbytes]
    while views:
        batch = views[:_IOV_MAX]
        written = os.writev(fd, batch)
        while written:
            n = batch[0].nbytes
            if written >= n:
                written -= n
                batch.pop(0)
                views.pop(0)
            else:
                views[0] = batch[0] = batch[0][written:]
                written = 0


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
