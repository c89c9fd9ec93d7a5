"""Chained block hashes: the one definition shared by engines, the router and KV stores.

A block's hash covers its parent's hash, the token ids of one full block and optional extra keys, so equal hashes
mean equal prefixes. The seed is configured (never random per process): prefill pods, decode pods, the router and
the KV store must all compute the same values. Pure Python (no torch, no numpy) so the router can import it.

Hashes are 128 bits (Python ints; 16 bytes big-endian on the wire, :func:`hash_to_bytes`): at 64 bits a birthday
collision needs about 2^32 blocks, within reach of someone who can choose prompts; at 128 bits it does not. Bump
``HASH_VERSION`` whenever the byte layout below changes; it is part of the KV block descriptor.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

HASH_VERSION = 2  # 2: 128-bit hashes (1 had 64)
HASH_BYTES = 16
DEFAULT_HASH_ALGO = "sha256"
DEFAULT_HASH_SEED = 0
SUPPORTED_ALGOS = ("sha256", "blake2b")
# The parent of a request's first block: derived from the seed so different seeds never collide.
_ROOT_TAG = b"pdserve-block-hash-root"


def _digest(algo: str, payload: bytes) -> int:
    if algo == "sha256":
        raw = hashlib.sha256(payload).digest()
    elif algo == "blake2b":
        raw = hashlib.blake2b(payload, digest_size=HASH_BYTES).digest()
    else:
        raise ValueError(f"unknown block hash algorithm {algo!r}; supported: {', '.join(SUPPORTED_ALGOS)}")
    return int.from_bytes(raw[:HASH_BYTES], "little")


def root_hash(seed: int = DEFAULT_HASH_SEED, algo: str = DEFAULT_HASH_ALGO) -> int:
    """The parent hash of the first block of every request, for a given seed."""
    return _digest(algo, _ROOT_TAG + struct.pack("<Q", seed & 0xFFFFFFFFFFFFFFFF))


def hash_block(parent_hash: int, token_ids: Sequence[int], extra_keys: Sequence[str | int] = (),
               algo: str = DEFAULT_HASH_ALGO) -> int:
    """Hash one full block given its parent's hash."""
    parts = [parent_hash.to_bytes(HASH_BYTES, "little") + struct.pack("<I", len(token_ids)),
             struct.pack(f"<{len(token_ids)}I", *token_ids)]
    for key in extra_keys:
        encoded = str(key).encode()
        parts.append(struct.pack("<I", len(encoded)) + encoded)
    return _digest(algo, b"".join(parts))


def seed_id(seed: int) -> int:
    """A public 64-bit id of a hash seed for KV descriptors: equal seeds give equal ids, and the id does not reveal
    the seed (whoever knew the seed could hash guessed prompts and test a store for them)."""
    return int.from_bytes(hashlib.sha256(b"pdserve-hash-seed-id" + struct.pack("<Q", seed & (2**64 - 1))).digest()[:8],
                          "little")


def hash_to_bytes(block_hash: int) -> bytes:
    """A block hash as it travels in protobuf ``bytes`` fields and KV events (16 bytes, big-endian)."""
    return block_hash.to_bytes(HASH_BYTES, "big")


def hash_from_bytes(raw: bytes) -> int:
    """The inverse of :func:`hash_to_bytes`; ``ValueError`` for anything but 16 bytes."""
    if len(raw) != HASH_BYTES:
        raise ValueError(f"a block hash is {HASH_BYTES} bytes, got {len(raw)}")
    return int.from_bytes(raw, "big")


class BlockHasher:
    """Hashes token sequences block by block with a fixed block size, seed and algorithm."""

    def __init__(self, block_size: int, seed: int = DEFAULT_HASH_SEED, algo: str = DEFAULT_HASH_ALGO) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if algo not in SUPPORTED_ALGOS:
            raise ValueError(f"unknown block hash algorithm {algo!r}; supported: {', '.join(SUPPORTED_ALGOS)}")
        self.block_size = block_size
        self.seed = seed
        self.algo = algo
        self.root = root_hash(seed, algo)

    def hash_prefix(self, token_ids: Sequence[int], extra_keys: Sequence[str | int] = ()) -> list[int]:
        """Hashes of every full block of ``token_ids`` (a trailing partial block is not hashed)."""
        return self.extend([], token_ids, extra_keys)

    def extend(self, hashes: list[int], token_ids: Sequence[int], extra_keys: Sequence[str | int] = ()) -> list[int]:
        """Append the hashes of the full blocks of ``token_ids`` not yet covered by ``hashes`` (in place)."""
        bs = self.block_size
        parent = hashes[-1] if hashes else self.root
        for start in range(len(hashes) * bs, len(token_ids) - bs + 1, bs):
            # Extra keys only enter the first block; later blocks inherit them through the chain.
            keys = extra_keys if start == 0 else ()
            parent = hash_block(parent, token_ids[start:start + bs], keys, self.algo)
            hashes.append(parent)
        return hashes
