from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KVCacheDescriptor(_message.Message):
    __slots__ = ("format_version", "model_fingerprint", "dtype", "layout", "block_size", "num_layers", "num_kv_heads", "head_dim", "hash_algo", "hash_seed", "hash_version", "tp_rank", "tp_size")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    HASH_ALGO_FIELD_NUMBER: _ClassVar[int]
    HASH_SEED_FIELD_NUMBER: _ClassVar[int]
    HASH_VERSION_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    model_fingerprint: str
    dtype: str
    layout: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hash_algo: str
    hash_seed: int
    hash_version: int
    tp_rank: int
    tp_size: int
    def __init__(self, format_version: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., dtype: _Optional[str] = ..., layout: _Optional[str] = ..., block_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., hash_algo: _Optional[str] = ..., hash_seed: _Optional[int] = ..., hash_version: _Optional[int] = ..., tp_rank: _Optional[int] = ..., tp_size: _Optional[int] = ...) -> None: ...

class KVBlockHeader(_message.Message):
    __slots__ = ("descriptor", "block_hash", "num_tokens", "payload_bytes", "checksum")
    DESCRIPTOR_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    descriptor: KVCacheDescriptor
    block_hash: int
    num_tokens: int
    payload_bytes: int
    checksum: int
    def __init__(self, descriptor: _Optional[_Union[KVCacheDescriptor, _Mapping]] = ..., block_hash: _Optional[int] = ..., num_tokens: _Optional[int] = ..., payload_bytes: _Optional[int] = ..., checksum: _Optional[int] = ...) -> None: ...

class PullBlocksRequest(_message.Message):
    __slots__ = ("transfer_id", "descriptor", "first_block", "chunk_bytes", "num_blocks")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTOR_FIELD_NUMBER: _ClassVar[int]
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    descriptor: KVCacheDescriptor
    first_block: int
    chunk_bytes: int
    num_blocks: int
    def __init__(self, transfer_id: _Optional[str] = ..., descriptor: _Optional[_Union[KVCacheDescriptor, _Mapping]] = ..., first_block: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., num_blocks: _Optional[int] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("block_index", "header", "data")
    BLOCK_INDEX_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    block_index: int
    header: KVBlockHeader
    data: bytes
    def __init__(self, block_index: _Optional[int] = ..., header: _Optional[_Union[KVBlockHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("transfer_id",)
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    def __init__(self, transfer_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...
