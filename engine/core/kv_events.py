"""KV cache events: what an engine's prefix cache gained or lost, for the router's prefix index.

The block pool records these when events are enabled and the engine drains them each step
(:meth:`BlockPool.take_events`). They carry block hashes from :mod:`pdserve.engine.core.block_hash`, so a router
that hashes prompts the same way (same block size, seed and algorithm) can tell which engine already holds a
prompt's prefix. Plain frozen dataclasses that map one-to-one onto the protobuf KV event messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class BlockStored:
    """Full blocks that became reusable, as one chain.

    ``block_hashes[i]`` is the child of ``block_hashes[i - 1]``; the first one's parent is ``parent_hash``
    (None when the chain starts at a request's first block). ``token_ids`` holds the tokens of all the blocks
    back to back, ``block_size`` of them per block.
    """

    block_hashes: tuple[int, ...]
    parent_hash: int | None
    token_ids: tuple[int, ...]
    block_size: int


@dataclass(frozen=True)
class BlockRemoved:
    """Blocks evicted from the prefix cache (their memory was reused for something else)."""

    block_hashes: tuple[int, ...]


@dataclass(frozen=True)
class AllBlocksCleared:
    """The whole prefix cache was dropped (e.g. after a weight update)."""


KVCacheEvent = Union[BlockStored, BlockRemoved, AllBlocksCleared]
