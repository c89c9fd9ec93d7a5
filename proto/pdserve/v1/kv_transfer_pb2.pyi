from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KVCacheDescriptor(_message.Message):
    __slots__ = ("format_version", "model_fingerprint", "dtype", "layout", "block_size", "num_layers", "num_kv_heads", "head_dim", "hash_algo", "hash_seed_id", "hash_version", "tp_rank", "tp_size")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    HASH_ALGO_FIELD_NUMBER: _ClassVar[int]
    HASH_SEED_ID_FIELD_NUMBER: _ClassVar[int]
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
    hash_seed_id: int
    hash_version: int
    tp_rank: int
    tp_size: int
    def __init__(self, format_version: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., dtype: _Optional[str] = ..., layout: _Optional[str] = ..., block_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., hash_algo: _Optional[str] = ..., hash_seed_id: _Optional[int] = ..., hash_version: _Optional[int] = ..., tp_rank: _Optional[int] = ..., tp_size: _Optional[int] = ...) -> None: ...

class KVBlockHeader(_message.Message):
    __slots__ = ("descriptor", "block_hash", "num_tokens", "payload_bytes", "checksum", "mac")
    DESCRIPTOR_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    descriptor: KVCacheDescriptor
    block_hash: bytes
    num_tokens: int
    payload_bytes: int
    checksum: int
    mac: bytes
    def __init__(self, descriptor: _Optional[_Union[KVCacheDescriptor, _Mapping]] = ..., block_hash: _Optional[bytes] = ..., num_tokens: _Optional[int] = ..., payload_bytes: _Optional[int] = ..., checksum: _Optional[int] = ..., mac: _Optional[bytes] = ...) -> None: ...

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

class ShareCacheRequest(_message.Message):
    __slots__ = ("descriptor", "node_id")
    DESCRIPTOR_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    descriptor: KVCacheDescriptor
    node_id: str
    def __init__(self, descriptor: _Optional[_Union[KVCacheDescriptor, _Mapping]] = ..., node_id: _Optional[str] = ...) -> None: ...

class IpcTensor(_message.Message):
    __slots__ = ("handle", "storage_offset_bytes", "storage_size_bytes", "ref_counter_handle", "ref_counter_offset", "event_handle", "event_sync_required", "shape", "stride", "tensor_offset")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    STORAGE_OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORAGE_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_HANDLE_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_OFFSET_FIELD_NUMBER: _ClassVar[int]
    EVENT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    EVENT_SYNC_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_OFFSET_FIELD_NUMBER: _ClassVar[int]
    handle: bytes
    storage_offset_bytes: int
    storage_size_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    shape: _containers.RepeatedScalarFieldContainer[int]
    stride: _containers.RepeatedScalarFieldContainer[int]
    tensor_offset: int
    def __init__(self, handle: _Optional[bytes] = ..., storage_offset_bytes: _Optional[int] = ..., storage_size_bytes: _Optional[int] = ..., ref_counter_handle: _Optional[bytes] = ..., ref_counter_offset: _Optional[int] = ..., event_handle: _Optional[bytes] = ..., event_sync_required: _Optional[bool] = ..., shape: _Optional[_Iterable[int]] = ..., stride: _Optional[_Iterable[int]] = ..., tensor_offset: _Optional[int] = ...) -> None: ...

class CacheShare(_message.Message):
    __slots__ = ("node_id", "gpu_uuid", "cache_id", "layers", "process_id")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    GPU_UUID_FIELD_NUMBER: _ClassVar[int]
    CACHE_ID_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    PROCESS_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    gpu_uuid: str
    cache_id: str
    layers: _containers.RepeatedCompositeFieldContainer[IpcTensor]
    process_id: str
    def __init__(self, node_id: _Optional[str] = ..., gpu_uuid: _Optional[str] = ..., cache_id: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[IpcTensor, _Mapping]]] = ..., process_id: _Optional[str] = ...) -> None: ...

class LocateBlocksRequest(_message.Message):
    __slots__ = ("transfer_id", "descriptor", "first_block", "num_blocks", "pin_seconds")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTOR_FIELD_NUMBER: _ClassVar[int]
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    descriptor: KVCacheDescriptor
    first_block: int
    num_blocks: int
    pin_seconds: float
    def __init__(self, transfer_id: _Optional[str] = ..., descriptor: _Optional[_Union[KVCacheDescriptor, _Mapping]] = ..., first_block: _Optional[int] = ..., num_blocks: _Optional[int] = ..., pin_seconds: _Optional[float] = ...) -> None: ...

class BlockLocation(_message.Message):
    __slots__ = ("block_index", "block_id", "block_hash", "num_tokens")
    BLOCK_INDEX_FIELD_NUMBER: _ClassVar[int]
    BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    block_index: int
    block_id: int
    block_hash: bytes
    num_tokens: int
    def __init__(self, block_index: _Optional[int] = ..., block_id: _Optional[int] = ..., block_hash: _Optional[bytes] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class BlockLocations(_message.Message):
    __slots__ = ("cache_id", "blocks")
    CACHE_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    cache_id: str
    blocks: _containers.RepeatedCompositeFieldContainer[BlockLocation]
    def __init__(self, cache_id: _Optional[str] = ..., blocks: _Optional[_Iterable[_Union[BlockLocation, _Mapping]]] = ...) -> None: ...
