"""The ``shared-fs`` connector: one file per block in a directory that every pod mounts.

Layout: ``<root>/<namespace>/<first two hex digits>/<block hash>.kv``. A writer writes a temporary file in the
same directory and renames it over the final name, so a reader (in any process or pod) opens either a whole block
or nothing; rename is atomic on local filesystems and on NFS within one directory. The directory is a cache with
a size cap: when the files written by this process push the estimated total over ``max_bytes``, the oldest files
(by modification time, which a read refreshes) are deleted until the total is 90 % of the cap. Temporary files left
by a killed writer are removed by the same sweep once they are a minute old.

Other processes can write the directory too, so nothing read from it is trusted: files are opened with
``O_NOFOLLOW`` (a planted symlink is a miss, not a read of another file), only regular files are read (a FIFO or a
device is a miss), and a file larger than the largest block object (``max_object_bytes``) is a miss before any
byte is allocated; the block format then checks the header, the CRC and the MAC. Files are created ``0600`` and
directories ``0700``. The directory is always capped (``DEFAULT_MAX_BYTES`` when no cap is given) and blocks not
read for ``max_age_s`` are swept (a read refreshes the age), at the latest every ``_SWEEP_EVERY_S`` of writes.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
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
DEFAULT_MAX_BYTES = 16 << 30  # the cap when none is configured: a shared volume must not fill up unnoticed
DEFAULT_MAX_AGE_S = 3600.0
_SWEEP_EVERY_S = 60.0
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


class SharedFSStore(BlockStore):
    """Block objects as files under ``root/namespace``; ``max_bytes`` (0: ``DEFAULT_MAX_BYTES``) caps the
    directory, ``max_age_s`` bounds how long an unread block stays, ``max_object_bytes`` (0: no bound) is the
    largest file :meth:`get` reads."""

    name = "shared-fs"

    def __init__(self, root: str, namespace: str, max_bytes: int = 0, max_age_s: float = DEFAULT_MAX_AGE_S,
                 max_object_bytes: int = 0, fault_write_delay_s: float = 0.0) -> None:
        """``fault_write_delay_s``: injected fault (``PDSERVE_FAULT_KV_WRITE_DELAY_S``, tests and drills only):
        every :meth:`put` sleeps this long first, like a slow shared volume."""
        self.fault_write_delay_s = float(fault_write_delay_s)
        if self.fault_write_delay_s:
            logger.warning("fault injection: every KV block write waits %.3f s (PDSERVE_FAULT_KV_WRITE_DELAY_S)",
                           self.fault_write_delay_s)
        if not root:
            raise ValueError("the shared-fs connector needs a directory (--kv-path)")
        self.dir = os.path.join(root, namespace)
        self.max_bytes = int(max_bytes) or DEFAULT_MAX_BYTES
        self.max_age_s = float(max_age_s)
        self.max_object_bytes = int(max_object_bytes)
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailableError(f"cannot create KV directory {self.dir}: {exc}") from exc
        self._lock = threading.Lock()
        self._estimate = self._scan_total()
        self._last_sweep = time.monotonic()

    def path_of(self, key: str) -> str:
        return os.path.join(self.dir, key[:2], key + _SUFFIX)

    def put(self, key: str, blob: Blob) -> None:
        if self.fault_write_delay_s:
            time.sleep(self.fault_write_delay_s)
        final = self.path_of(key)
        tmp = f"{final}{_TMP_MARK}{uuid.uuid4().hex[:12]}"
        parts = list(blob) if isinstance(blob, (list, tuple)) else [blob]
        try:
            os.makedirs(os.path.dirname(final), mode=0o700, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                _write_all(fd, parts)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except OSError as exc:
            _unlink_quietly(tmp)
            raise StoreUnavailableError(f"cannot write KV block {final}: {exc}") from exc
        with self._lock:
            self._estimate += blob_size(blob)
            over = self._estimate > self.max_bytes
            due = time.monotonic() - self._last_sweep > _SWEEP_EVERY_S
            if due:
                self._last_sweep = time.monotonic()
        if over or due:
            self.evict()

    def get(self, key: str) -> bytearray | None:
        """The block file's bytes; None when absent, too old, or not something this store wrote (a symlink, not
        a regular file, larger than ``max_object_bytes``)."""
        path = self.path_of(key)
        try:
            fd = os.open(path, _READ_FLAGS)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink: never follow what another writer planted
                logger.warning("shared-fs: %s is a symlink; ignoring it", path)
                return None
            raise StoreUnavailableError(f"cannot read KV block {key}: {exc.strerror}") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                logger.warning("shared-fs: %s is not a regular file; ignoring it", path)
                return None
            if self.max_object_bytes and st.st_size > self.max_object_bytes:
                logger.warning("shared-fs: %s has %d bytes, more than a block object (%d); ignoring it", path,
                               st.st_size, self.max_object_bytes)
                return None
            if time.time() - st.st_mtime > self.max_age_s:
                _unlink_quietly(path)
                return None
            data = bytearray(st.st_size)  # writable: loaders wrap it without a copy
            with os.fdopen(fd, "rb", closefd=False) as f:
                got = f.readinto(data)
            if got != st.st_size:
                return None  # shrank under us: not a whole block
        except OSError as exc:
            raise StoreUnavailableError(f"cannot read KV block {key}: {exc.strerror}") from exc
        finally:
            os.close(fd)
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
        """Delete blocks unread for ``max_age_s``, then the least recently used ones until the directory is under
        90 % of the cap; returns bytes freed."""
        files, total = self._list()
        target = int(self.max_bytes * 0.9)
        oldest_kept = time.time() - self.max_age_s
        freed = 0
        files.sort()  # oldest mtime first
        for mtime, size, path in files:
            if total - freed <= target and mtime >= oldest_kept:
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
