"""Prompt -> block hashes on the router, with the engine's own module (:mod:`pdserve.engine.core.block_hash`).

The router must agree with every engine on block size, seed, algorithm and extra keys, or its prefix index would
never match anything. This is the one place the router hashes, mirroring the engine's KV cache manager: the
cache salt (if any) enters the first block only, and a trailing partial block is not hashed.
"""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.engine.core.block_hash import DEFAULT_HASH_ALGO, DEFAULT_HASH_SEED, HASH_VERSION, BlockHasher, seed_id


class PromptHasher:
    """Hashes prompts exactly as the engines do for a given block size, seed and algorithm."""

    def __init__(self, block_size: int, seed: int = DEFAULT_HASH_SEED, algo: str = DEFAULT_HASH_ALGO) -> None:
        self._hasher = BlockHasher(block_size, seed, algo)
        self.block_size = block_size
        self.seed = seed
        self.algo = algo
        self.version = HASH_VERSION

    def hash_prompt(self, token_ids: Sequence[int], cache_salt: str | None = None) -> list[int]:
        return self._hasher.hash_prefix(token_ids, (cache_salt,) if cache_salt else ())

    def describe(self) -> dict[str, object]:
        """What must equal the engines' settings (shown by the router's info endpoint and checked at start).
        The seed appears only as its public id (the seed is a secret when derived from the cluster secret)."""
        return {"block_size": self.block_size, "hash_seed_id": seed_id(self.seed), "hash_algo": self.algo,
                "hash_version": self.version}
