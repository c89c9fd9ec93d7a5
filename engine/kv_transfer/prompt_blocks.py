"""Which blocks hold a prompt's KV, and under which keys: shared by every connector's scheduler half.

Full blocks are keyed by their chained hash (:mod:`pdserve.engine.core.block_hash`). A prompt whose length is not
a multiple of the block size ends in a partial block; it travels too, keyed by the same hash function applied to
its fewer tokens (the token count is part of the hashed bytes, so it never collides with a full block), so a
decode pod computes nothing of the prompt at all. Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.engine.core.block_hash import BlockHasher, hash_block


@dataclass(frozen=True)
class PromptBlock:
    index: int  # position in the request's block table
    block_hash: int
    num_tokens: int  # block_size, or fewer for the last, partial block


def prompt_blocks(hasher: BlockHasher, token_ids: Sequence[int], extra_keys: Sequence[str | int] = ()
                  ) -> list[PromptBlock]:
    """The blocks that hold ``token_ids``: every full block, then the partial one if any."""
    bs = hasher.block_size
    hashes = hasher.hash_prefix(token_ids, extra_keys)
    out = [PromptBlock(i, h, bs) for i, h in enumerate(hashes)]
    rest = len(token_ids) - len(hashes) * bs
    if rest:
        parent = hashes[-1] if hashes else hasher.root
        keys = extra_keys if not hashes else ()  # extra keys enter the first block only, as in the chain
        tail = hash_block(parent, token_ids[len(hashes) * bs:], keys, hasher.algo)
        out.append(PromptBlock(len(hashes), tail, rest))
    return out


def extra_keys_of(request: object) -> tuple[str, ...]:
    salt = getattr(request, "cache_salt", None)
    return (salt,) if salt else ()


def tokens_covered(blocks: Sequence[PromptBlock]) -> int:
    return sum(b.num_tokens for b in blocks)
