"""The one KV block format every connector moves: a self-describing, versioned, checksummed object per block.

An object is ``b"PDKV" | uint32 header length | KVBlockHeader (protobuf) | payload`` (see
``proto/pdserve/v1/kv_transfer.proto``). The payload is one block's KV in the cache dtype, layer-major
``[num_layers, 2, num_tokens, num_kv_heads, head_dim]``: a block of a paged layer cache
``[2, num_blocks, block_size, Hkv, D]`` is ``cache[:, block_id, :num_tokens]``, and the layers are stacked in front.

A reader never copies a payload it cannot trust: :func:`decode_block` refuses a foreign magic, an unknown format
version, a descriptor that differs from the reader's own (:class:`IncompatibleDescriptorError`), a truncated payload
or a bad CRC-32 (:class:`ChecksumError`), and, given the cluster secret's block key, a missing or wrong MAC
(:class:`MACError`: the CRC only catches accidents, the keyed MAC catches a block planted by anyone without the
secret). Connectors turn those errors into a cache miss or a failed request, following the engine's load-failure
policy (a MAC failure is always a miss). No torch here: stores and the router can import it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from pdserve.engine.core.block_hash import HASH_VERSION, hash_from_bytes, hash_to_bytes

KV_FORMAT_VERSION = 1
KV_LAYOUT = "layer,kv,token,head,dim"
MAGIC = b"PDKV"
_PREFIX = struct.Struct("<4sI")  # magic, header length
# Bytes per element of each KV cache dtype (torch's names; fp8 caches travel as their raw bytes).
DTYPE_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}


class KVFormatError(ValueError):
    """A block object that must not be loaded. ``reason`` is a short label for metrics."""

    reason = "corrupt"


class IncompatibleDescriptorError(KVFormatError):
    reason = "incompatible"


class ChecksumError(KVFormatError):
    reason = "checksum"


class MACError(KVFormatError):
    """The block's keyed MAC is missing or wrong: written by someone without the cluster secret."""

    reason = "mac"


@dataclass(frozen=True)
class KVDescriptor:
    """What a KV cache is made of; two engines exchange blocks only when their descriptors are equal."""

    model_fingerprint: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hash_algo: str
    hash_seed_id: int  # block_hash.seed_id(seed): tells seeds apart, never the seed itself
    hash_version: int = HASH_VERSION
    tp_rank: int = 0
    tp_size: int = 1
    layout: str = KV_LAYOUT
    format_version: int = KV_FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_SIZES:
            raise ValueError(f"unsupported KV dtype {self.dtype!r}; supported: {', '.join(DTYPE_SIZES)}")
        for name in ("block_size", "num_layers", "num_kv_heads", "head_dim", "tp_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"KV descriptor {name} must be positive, got {getattr(self, name)}")

    @property
    def element_size(self) -> int:
        return DTYPE_SIZES[self.dtype]

    def payload_bytes(self, num_tokens: int | None = None) -> int:
        """Bytes of one block's payload holding ``num_tokens`` tokens (default: a full block)."""
        n = self.block_size if num_tokens is None else num_tokens
        return self.num_layers * 2 * n * self.num_kv_heads * self.head_dim * self.element_size

    @property
    def namespace(self) -> str:
        """The key prefix of this cache's blocks in a shared store.

        It separates what makes blocks with equal token hashes different objects (the model, the tensor-parallel
        shard); dtype and layout are left out on purpose, so that a misconfigured peer is caught by the
        descriptor check with a clear error rather than silently never hitting.
        """
        raw = f"{self.model_fingerprint}|{self.tp_rank}|{self.tp_size}|{self.format_version}".encode()
        return f"{hashlib.sha256(raw).hexdigest()[:16]}-tp{self.tp_rank}of{self.tp_size}"

    def mismatches(self, other: "KVDescriptor") -> list[str]:
        """Fields on which ``other`` differs from this descriptor, as ``name: ours != theirs``."""
        out = []
        for f in dataclasses.fields(self):
            ours, theirs = getattr(self, f.name), getattr(other, f.name)
            if ours != theirs:
                out.append(f"{f.name}: {ours!r} != {theirs!r}")
        return out

    def check_compatible(self, other: "KVDescriptor", what: str = "KV block") -> None:
        """Raise :class:`IncompatibleDescriptorError` naming every differing field."""
        diff = self.mismatches(other)
        if diff:
            raise IncompatibleDescriptorError(f"{what} is incompatible with this engine's KV cache ("
                                              + "; ".join(diff) + ")")

    # ------------------------------------------------------------------ conversions
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "KVDescriptor":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise IncompatibleDescriptorError(f"KV descriptor has unknown fields {sorted(unknown)}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise IncompatibleDescriptorError(f"invalid KV descriptor: {exc}") from None

    def to_proto(self) -> Any:
        pb = _pb()
        return pb.KVCacheDescriptor(**self.to_dict())

    @classmethod
    def from_proto(cls, msg: Any) -> "KVDescriptor":
        return cls.from_dict({f.name: getattr(msg, f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class BlockHeader:
    """The decoded header of one block object."""

    descriptor: KVDescriptor
    block_hash: int
    num_tokens: int
    payload_bytes: int
    checksum: int
    mac: bytes = b""


def block_mac(key: bytes, header: BlockHeader, payload: Any) -> bytes:
    """HMAC-SHA256 under ``key`` (``ClusterSecret.derive("kv-block")``) over the header's fields but ``mac``
    and the payload (one buffer or a sequence of them); equal to ``ClusterSecret.sign("kv-block", ...)`` of the
    same bytes. hashlib releases the GIL on large buffers, so I/O threads compute it in parallel."""
    desc = json.dumps(header.descriptor.to_dict(), sort_keys=True, separators=(",", ":"))
    mac = hmac.new(key, f"pdkv-block-v1|{desc}|{header.block_hash:x}|{header.num_tokens}|"
                        f"{header.payload_bytes}|{header.checksum}|".encode(), hashlib.sha256)
    for part in payload if isinstance(payload, (list, tuple)) else (payload,):
        mac.update(part)
    return mac.digest()


def verify_mac(key: bytes, header: BlockHeader, payload: Any) -> None:
    """Raise :class:`MACError` unless the header carries the right MAC of ``payload``."""
    if not header.mac:
        raise MACError(f"KV block {header.block_hash:032x} carries no MAC (not written by this cluster)")
    if not hmac.compare_digest(block_mac(key, header, payload), header.mac):
        raise MACError(f"KV block {header.block_hash:032x} failed its MAC check (planted or written under "
                       f"another cluster secret)")


def checksum(payload: Any) -> int:
    """CRC-32 of a payload given as one bytes-like object or a sequence of them (in order).

    zlib's CRC-32: in the standard library, enough against corruption, and it releases the GIL on large
    buffers, so several I/O threads checksum in parallel.
    """
    if isinstance(payload, (list, tuple)):
        crc = 0
        for part in payload:
            crc = zlib.crc32(part, crc)
        return crc & 0xFFFFFFFF
    return zlib.crc32(payload) & 0xFFFFFFFF


def _nbytes(payload: Any) -> int:
    if isinstance(payload, (list, tuple)):
        return sum(memoryview(p).nbytes for p in payload)
    return memoryview(payload).nbytes


def make_header(desc: KVDescriptor, block_hash: int, num_tokens: int, payload: Any,
                mac_key: bytes | None = None) -> BlockHeader:
    """The header of ``payload`` (one buffer or a sequence of buffers); checks its size against the descriptor.
    With ``mac_key`` the header carries the block's MAC."""
    if not 0 < num_tokens <= desc.block_size:
        raise ValueError(f"a block holds 1..{desc.block_size} tokens, got {num_tokens}")
    size = _nbytes(payload)
    if size != desc.payload_bytes(num_tokens):
        raise ValueError(f"payload of {size} bytes does not match {num_tokens} tokens of this KV cache "
                         f"({desc.payload_bytes(num_tokens)} bytes)")
    header = BlockHeader(desc, block_hash, num_tokens, size, checksum(payload))
    return dataclasses.replace(header, mac=block_mac(mac_key, header, payload)) if mac_key else header


def header_to_proto(header: BlockHeader) -> Any:
    return _pb().KVBlockHeader(descriptor=header.descriptor.to_proto(), block_hash=hash_to_bytes(header.block_hash),
                               num_tokens=header.num_tokens, payload_bytes=header.payload_bytes,
                               checksum=header.checksum, mac=header.mac)


def header_from_proto(msg: Any) -> BlockHeader:
    try:
        block_hash = hash_from_bytes(msg.block_hash)
    except ValueError as exc:
        raise KVFormatError(f"KV block header: {exc}") from None
    return BlockHeader(KVDescriptor.from_proto(msg.descriptor), block_hash, msg.num_tokens,
                       msg.payload_bytes, msg.checksum, bytes(msg.mac))


def encode_block_parts(desc: KVDescriptor, block_hash: int, num_tokens: int, payload: Any,
                       mac_key: bytes | None = None) -> list[Any]:
    """One block object as a list of buffers: prefix and header, then the payload's parts (no copy of them)."""
    header = header_to_proto(make_header(desc, block_hash, num_tokens, payload, mac_key)).SerializeToString()
    parts = list(payload) if isinstance(payload, (list, tuple)) else [payload]
    return [_PREFIX.pack(MAGIC, len(header)) + header, *parts]


def encode_block(desc: KVDescriptor, block_hash: int, num_tokens: int, payload: Any,
                 mac_key: bytes | None = None) -> bytes:
    """One block object in one bytes object (``payload``: a buffer or a sequence of buffers)."""
    return b"".join(encode_block_parts(desc, block_hash, num_tokens, payload, mac_key))


def decode_block(blob: Any, expected: KVDescriptor, block_hash: int | None = None,
                 num_tokens: int | None = None, mac_key: bytes | None = None) -> tuple[BlockHeader, memoryview]:
    """Validate a block object against the reader's descriptor; return its header and a view of its payload.

    ``block_hash`` / ``num_tokens``, when given, must match too (a store must never hand back another block);
    with ``mac_key`` the block's MAC must verify. Raises :class:`KVFormatError` (or a subclass) with a message
    that says what is wrong.
    """
    header = verify_header(blob, expected, block_hash, num_tokens)
    view = memoryview(blob)
    start = _PREFIX.size + struct.unpack_from("<I", view, 4)[0]
    payload = view[start:]
    if payload.nbytes != header.payload_bytes:
        raise KVFormatError(f"KV block {header.block_hash:032x} is truncated: {payload.nbytes} of "
                            f"{header.payload_bytes} payload bytes")
    verify_payload(header, payload)
    if mac_key is not None:
        verify_mac(mac_key, header, payload)
    return header, payload


def verify_header(blob: Any, expected: KVDescriptor, block_hash: int | None = None,
                  num_tokens: int | None = None) -> BlockHeader:
    """Parse and check the prefix and header of a block object (not the payload)."""
    view = memoryview(blob)
    if view.nbytes < _PREFIX.size:
        raise KVFormatError(f"KV block object of {view.nbytes} bytes is too short")
    magic, header_len = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise KVFormatError(f"not a pdserve KV block (magic {bytes(magic)!r})")
    if _PREFIX.size + header_len > view.nbytes:
        raise KVFormatError("KV block header is truncated")
    msg = _pb().KVBlockHeader()
    try:
        msg.ParseFromString(view[_PREFIX.size:_PREFIX.size + header_len].tobytes())
    except Exception as exc:  # protobuf's DecodeError; any parse failure means garbage
        raise KVFormatError(f"KV block header does not parse: {exc}") from None
    header = header_from_proto(msg)
    check_header(header, expected, block_hash, num_tokens)
    return header


def check_header(header: BlockHeader, expected: KVDescriptor, block_hash: int | None = None,
                 num_tokens: int | None = None) -> None:
    """Descriptor, identity and size checks of an already parsed header."""
    if header.descriptor.format_version != expected.format_version:
        raise IncompatibleDescriptorError(f"KV block format version {header.descriptor.format_version} is not "
                                          f"this engine's ({expected.format_version})")
    expected.check_compatible(header.descriptor)
    if block_hash is not None and header.block_hash != block_hash:
        raise KVFormatError(f"KV block {header.block_hash:032x} was returned for {block_hash:032x}")
    if num_tokens is not None and header.num_tokens != num_tokens:
        raise KVFormatError(f"KV block {header.block_hash:032x} holds {header.num_tokens} tokens, "
                            f"expected {num_tokens}")
    if not 0 < header.num_tokens <= expected.block_size or \
            header.payload_bytes != expected.payload_bytes(header.num_tokens):
        raise KVFormatError(f"KV block {header.block_hash:032x} has an inconsistent size "
                            f"({header.num_tokens} tokens, {header.payload_bytes} bytes)")


def verify_payload(header: BlockHeader, payload: Any) -> None:
    """Raise :class:`ChecksumError` unless the payload's CRC-32 matches the header's."""
    got = checksum(payload)
    if got != header.checksum:
        raise ChecksumError(f"KV block {header.block_hash:032x} failed its checksum "
                            f"(crc32 {got:08x}, expected {header.checksum:08x})")


def _pb() -> Any:
    from pdserve.proto.pdserve.v1 import kv_transfer_pb2

    return kv_transfer_pb2
