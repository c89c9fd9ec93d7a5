"""Per-request block tables on top of the block pool, with prefix caching.

The scheduler talks to this class only: it asks which prefix of a request is already cached, asks for slots for
the tokens it schedules, and frees a request's blocks when it finishes or is preempted. Block objects are
opaque to callers; they see block ids.
"""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.engine.core.block_hash import BlockHasher
from pdserve.engine.core.block_pool import BlockPool
from pdserve.engine.core.free_block_queue import KVCacheBlock
from pdserve.engine.core.kv_events import KVCacheEvent
from pdserve.engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Maps each request to a list of blocks and keeps full blocks findable by their chained hash.

    A request's slots, block_size 4. At admission, prefix-cache hits come first, then fresh blocks::

        | h  h  h  h | h  h  h  h | n  n  n  n | n  n  .  . |
        |<-- num_new_computed_tokens ->|<---- num_new_tokens ---->|
         new_computed_blocks: shared,   fresh blocks from the head of the free queue
         taken out of the free queue    (the last one partly empty)

    Later calls (prefill chunks, decodes) fill the last block's free slots before taking fresh blocks::

        | c  c  c  c | c  c  n  n | n  .  .  . |
        |<-- num_computed_tokens ->|<- new ->|

    A block becomes cached (hash -> block) as soon as all of its slots are scheduled and its tokens known,
    i.e. at allocation time, before the model has run. That is safe because the runner writes a step's KV for
    a layer before attention reads it and later steps run after this one: whoever hits such a block sees its
    KV by the time it reads it. "Known" excludes a pending token (asynchronous scheduling: sampled by a step
    still in flight, see ``Request.num_pending_tokens``): a block it completes is cached by the first allocation
    after its value arrives, so a hash never covers a placeholder.
    """

    def __init__(self, block_size: int, num_blocks: int, enable_prefix_caching: bool = True,
                 hash_seed: int = 0, hash_algo: str = "sha256", max_model_len: int | None = None,
                 enable_kv_events: bool = False) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.max_model_len = max_model_len
        self.pool = BlockPool(num_blocks, block_size, enable_prefix_caching, enable_kv_events)
        self.hasher = BlockHasher(block_size, hash_seed, hash_algo)
        self._tables: dict[str, list[KVCacheBlock]] = {}
        self._table_ids: dict[str, list[int]] = {}  # the same tables as ids, kept to hand out cheap copies
        # How many leading blocks of each table are already registered in the prefix cache (or skipped as
        # duplicates); caching resumes from there.
        self._num_cached: dict[str, int] = {}
        self.prefix_cache_queries = 0  # tokens of admitted requests looked up (cumulative)
        self.prefix_cache_hits = 0  # of which found in the cache

    # ------------------------------------------------------------------ queries
    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests, in [0, 1]."""
        return self.pool.usage

    def get_num_free_blocks(self) -> int:
        return self.pool.get_num_free_blocks()

    def num_blocks_needed(self, num_tokens: int) -> int:
        """Blocks a table needs to hold ``num_tokens`` slots."""
        return cdiv(num_tokens, self.block_size)

    def get_block_ids(self, request: Request) -> list[int]:
        """The request's block table as ids (a copy; empty for a request without blocks)."""
        return list(self._table_ids.get(request.request_id, ()))

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The longest cached prefix of the request's full blocks, and how many tokens it covers.

        At most ``num_tokens - 1`` tokens are reported, rounded down to whole blocks: the last token must be
        computed so that the step produces logits to sample from. Nothing is reserved here; pass the result to
        :meth:`allocate_slots`, which takes the references. Only meaningful for a request without blocks.
        """
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0  # prompt logprobs need the logits of every prompt position: nothing may be skipped
        max_hit_blocks = max(0, request.num_tokens - 1) // self.block_size
        hashes = self._hashes_for(request, max_hit_blocks)
        blocks: list[KVCacheBlock] = []
        for block_hash in hashes[:max_hit_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks, len(blocks) * self.block_size

    def allocation_is_noop(self, request: Request, num_new_tokens: int, delay_caching: bool = False) -> bool:
        """Whether :meth:`allocate_slots` for ``num_new_tokens`` more tokens of a request that holds blocks would
        change nothing: they fit in its blocks and no block became full (nothing to register in the prefix
        cache). The common decode step, decided in a few lookups."""
        table_ids = self._table_ids.get(request.request_id)
        if table_ids is None:
            return False
        total_slots = request.num_computed_tokens + num_new_tokens
        return (total_slots <= len(table_ids) * self.block_size
                and (self.max_model_len is None or total_slots <= self.max_model_len)
                and (not self.enable_prefix_caching or delay_caching
                     or min(total_slots, request.num_tokens) // self.block_size
                     <= self._num_cached[request.request_id]))

    def num_held_slots(self, request: Request) -> int:
        """Token slots the request's blocks hold (0 without blocks)."""
        return len(self._table_ids.get(request.request_id, ())) * self.block_size

    # ------------------------------------------------------------------ updates
    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: Sequence[KVCacheBlock] | None = None,
                       num_new_computed_tokens: int = 0,
                       delay_caching: bool = False) -> list[int] | None:
        """Make room for ``num_new_tokens`` more tokens (after the cached ones, see the class diagram).

        ``new_computed_blocks`` / ``num_new_computed_tokens`` come from :meth:`get_computed_blocks` when the
        request is admitted. Returns the request's block ids, or None (and changes nothing) when the pool has
        too few free blocks. Full blocks whose tokens are known get registered in the prefix cache, unless
        ``delay_caching``: slots a KV connector will fill asynchronously must not be found by other requests
        before they hold the KV (a later call, once the request is scheduled, registers them).
        """
        rid = request.request_id
        table_ids = self._table_ids.get(rid)
        if (not new_computed_blocks and not num_new_computed_tokens
                and self.allocation_is_noop(request, num_new_tokens, delay_caching)):
            return list(table_ids)  # type: ignore[arg-type]
        computed = list(new_computed_blocks or ())
        if num_new_computed_tokens != len(computed) * self.block_size:
            raise ValueError(f"{num_new_computed_tokens} computed tokens do not fill {len(computed)} blocks")
        table = self._tables.get(rid, [])
        total_slots = request.num_computed_tokens + num_new_computed_tokens + num_new_tokens
        if self.max_model_len is not None and total_slots > self.max_model_len:
            raise ValueError(f"request {rid!r} asks for {total_slots} slots, beyond max_model_len "
                             f"{self.max_model_len}")
        num_new_blocks = self.num_blocks_needed(total_slots) - len(table) - len(computed)
        # Hit blocks that sit free in the queue stop being allocatable once touched.
        num_revived = sum(1 for b in computed if b.ref_cnt == 0)
        if num_new_blocks > self.pool.get_num_free_blocks() - num_revived:
            return None

        first_allocation = rid not in self._tables
        if first_allocation and self.enable_prefix_caching:
            # Counted here, once per admission, rather than per lookup: a request stuck at the head of the
            # queue is looked up every step and would inflate the hit statistics.
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += num_new_computed_tokens
        self.pool.touch(computed)  # before get_new_blocks, so the hits cannot be evicted by it
        new_blocks = computed + (self.pool.get_new_blocks(num_new_blocks) if num_new_blocks > 0 else [])
        table.extend(new_blocks)
        self._tables[rid] = table
        table_ids = self._table_ids.setdefault(rid, [])
        table_ids.extend(b.block_id for b in new_blocks)
        num_cached = self._num_cached.get(rid, 0) + (len(computed) if first_allocation else 0)
        self._num_cached[rid] = num_cached

        if self.enable_prefix_caching and not delay_caching:
            # num_tokens counts known tokens only: slots of pending ones are never hashed (see the class doc).
            num_full = min(total_slots, request.num_tokens) // self.block_size
            if num_full > num_cached:
                hashes = self._hashes_for(request, num_full)
                self.pool.cache_full_blocks(table, hashes, num_cached, num_full, request.all_token_ids)
                self._num_cached[rid] = num_full
        return list(table_ids)

    def free(self, request: Request) -> None:
        """Release the request's blocks (tail first, so a sequence's end is evicted before its shared start)."""
        table = self._tables.pop(request.request_id, [])
        self._table_ids.pop(request.request_id, None)
        self._num_cached.pop(request.request_id, None)
        self.pool.free_blocks(reversed(table))

    def free_excess_blocks(self, request: Request, num_slots: int) -> None:
        """Release the table's blocks beyond the first ``num_slots`` slots (speculative decoding: blocks that
        held only rejected drafts). They were never registered in the prefix cache: only blocks full of known
        tokens are, and drafts are not known tokens."""
        table = self._tables.get(request.request_id)
        keep = self.num_blocks_needed(num_slots)
        if table is None or len(table) <= keep:
            return
        if self._num_cached[request.request_id] > keep:
            raise ValueError(f"request {request.request_id!r}: cannot free prefix-cached blocks")
        extra = table[keep:]
        del table[keep:]
        del self._table_ids[request.request_id][keep:]
        self.pool.free_blocks(reversed(extra))

    def reset_prefix_cache(self) -> bool:
        """Drop every cached block hash; refused (False) while requests hold blocks."""
        return self.pool.reset_prefix_cache()

    def take_events(self) -> list[KVCacheEvent]:
        """KV events recorded since the last call (see :mod:`pdserve.engine.core.kv_events`)."""
        return self.pool.take_events()

    # ------------------------------------------------------------------ internals
    def _hashes_for(self, request: Request, num_blocks: int) -> list[int]:
        """``request.block_hashes``, extended so that it covers at least ``num_blocks`` full blocks."""
        if len(request.block_hashes) < num_blocks:
            extra = (request.cache_salt,) if request.cache_salt else ()
            tokens = request.all_token_ids[:num_blocks * self.block_size]
            self.hasher.extend(request.block_hashes, tokens, extra)
        return request.block_hashes
