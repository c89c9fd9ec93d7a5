"""The ``redis`` connector: an LMCache-style block store in a Redis server shared by every pod.

Any prefill pod writes block hash -> block object; any decode pod (or prefill pod, for its own misses) reads
it, so a prefix computed once anywhere is reused everywhere. Each value has a TTL that a read renews, and the
namespace has a size budget enforced by this client, atomically (the value's SET and a Lua accounting script in
one MULTI/EXEC; values themselves never go through Lua, which is slow with large arguments)::

    pdkv:<ns>:<block hash>   the block object (SET ... EX ttl; GETEX renews)
    pdkv:<ns>:lru            sorted set: key -> last write/read time (ms, Redis clock)
    pdkv:<ns>:sizes          hash: key -> bytes
    pdkv:<ns>:bytes          total bytes of live keys

A write over the budget deletes the least recently used keys first; entries whose TTL ran out are dropped from
the accounting by the next write. A down or unreachable server raises :class:`StoreUnavailableError` quickly
(short socket timeouts, no retries): the engine then computes the KV itself.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from pdserve.engine.kv_transfer.stores.store import Blob, BlockStore, StoreUnavailableError, join_blob, redact_url

logger = logging.getLogger(__name__)

# Runs in the same MULTI as the SET of the value (values never pass through Lua: big arguments are slow there).
# KEYS: block key, lru, sizes, total. ARGV: value size, ttl s, budget bytes (0: none). Returns the total bytes.
_ACCOUNT = """
local key, lru, sizes, total = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local size, ttl, budget = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function forget(k)
  local s = redis.call('HGET', sizes, k)
  if s then redis.call('DECRBY', total, s) end
  redis.call('HDEL', sizes, k)
  redis.call('ZREM', lru, k)
end
forget(key)
if ttl > 0 then
  for _, k in ipairs(redis.call('ZRANGEBYSCORE', lru, '-inf', now - ttl * 1000)) do forget(k) end
end
redis.call('ZADD', lru, now, key)
redis.call('HSET', sizes, key, size)
local n = redis.call('INCRBY', total, size)
while budget > 0 and n > budget do
  local oldest = redis.call('ZRANGE', lru, 0, 0)
  if #oldest == 0 or oldest[1] == key then break end
  forget(oldest[1])
  redis.call('DEL', oldest[1])
  n = tonumber(redis.call('GET', total))
end
return n
"""

# KEYS: block key, lru. Marks a key just read as recently used (if it is still there).
_TOUCH = """
local t = redis.call('TIME')
return redis.call('ZADD', KEYS[2], 'XX', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), KEYS[1])
"""


class RedisStore(BlockStore):
    """Block objects in Redis under ``pdkv:<namespace>:``, with a TTL (seconds, 0: none) and a byte budget."""

    name = "redis"

    def __init__(self, url: str, namespace: str, ttl_s: int = 3600, max_bytes: int = 0,
                 timeout_s: float = 2.0, password: str | None = None) -> None:
        if not url:
            raise ValueError("the redis connector needs a server URL (--redis-url redis://host:port/db)")
        check_redis_url(url)
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
        # Fail fast: a down server must cost a request milliseconds (then it recomputes), not a retry loop.
        # rediss:// URLs connect over TLS (redis-py's own handling of the scheme).
        self._client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                            retry=Retry(NoBackoff(), 0), health_check_interval=0,
                                            password=password or None)
        self.url = redact_url(url)  # the only form kept: it reaches logs and errors
        self.prefix = f"pdkv:{namespace}:"
        self.ttl_s = int(ttl_s)
        self.max_bytes = int(max_bytes)
        self._lru, self._sizes, self._total = (self.prefix + "lru", self.prefix + "sizes", self.prefix + "bytes")
        self._account = self._client.register_script(_ACCOUNT)
        self._touch = self._client.register_script(_TOUCH)

    def put(self, key: str, blob: Blob) -> None:
        value = join_blob(blob)
        full = self.prefix + key
        pipe = self._client.pipeline(transaction=True)  # MULTI/EXEC: value and accounting change together
        pipe.set(full, value if isinstance(value, bytes) else bytes(value), ex=self.ttl_s or None)
        self._account(keys=[full, self._lru, self._sizes, self._total],
                      args=[len(value), self.ttl_s, self.max_bytes], client=pipe)
        self._wrap(pipe.execute)

    def get(self, key: str) -> bytes | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            full = self.prefix + key
            if self.ttl_s:
                pipe.getex(full, ex=self.ttl_s)  # a read renews the TTL
            else:
                pipe.get(full)
            self._touch(keys=[full, self._lru], client=pipe)
        return self._wrap(pipe.execute)[0::2]

    def contains(self, keys: Sequence[str]) -> list[bool]:
        if not keys:
            return []
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.exists(self.prefix + key)
        return [bool(n) for n in self._wrap(pipe.execute)]

    def delete(self, key: str) -> None:
        self._wrap(lambda: self._client.delete(self.prefix + key))

    def total_bytes(self) -> int:
        return int(self._wrap(lambda: self._client.get(self._total)) or 0)

    def close(self) -> None:
        self._client.close()

    def _wrap(self, fn: Any) -> Any:
        try:
            return fn()
        except self._errors as exc:
            # The details (address, OS error) go to the pod's log; clients see only that the store is down.
            logger.warning("Redis KV store at %s is unavailable: %s", self.url, type(exc).__name__)
            raise StoreUnavailableError("the redis KV store is unavailable") from exc


def check_redis_url(url: str) -> None:
    """Refuse a Redis URL that is not redis://, rediss:// (TLS) or unix:// (a socket), or that carries credentials
    (they would end up in process lists, configs and logs): the password comes from ``PDSERVE_REDIS_PASSWORD``."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError("--redis-url is not a valid URL") from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError("--redis-url must start with redis://, rediss:// (TLS) or unix://")
    if parts.password is not None or parts.username is not None:
        raise ValueError("--redis-url must not carry credentials: set the password in PDSERVE_REDIS_PASSWORD")
