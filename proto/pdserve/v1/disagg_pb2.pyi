from . import generate_pb2 as _generate_pb2
from . import kv_transfer_pb2 as _kv_transfer_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KVTransferHandle(_message.Message):
    __slots__ = ("connector", "transfer_id", "num_tokens", "block_hashes", "descriptor", "engine_id", "kv_server", "expires_at", "mac")
    CONNECTOR_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTOR_FIELD_NUMBER: _ClassVar[int]
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    KV_SERVER_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    connector: str
    transfer_id: str
    num_tokens: int
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    descriptor: _kv_transfer_pb2.KVCacheDescriptor
    engine_id: str
    kv_server: str
    expires_at: float
    mac: str
    def __init__(self, connector: _Optional[str] = ..., transfer_id: _Optional[str] = ..., num_tokens: _Optional[int] = ..., block_hashes: _Optional[_Iterable[bytes]] = ..., descriptor: _Optional[_Union[_kv_transfer_pb2.KVCacheDescriptor, _Mapping]] = ..., engine_id: _Optional[str] = ..., kv_server: _Optional[str] = ..., expires_at: _Optional[float] = ..., mac: _Optional[str] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: _generate_pb2.GenerateRequest
    def __init__(self, request: _Optional[_Union[_generate_pb2.GenerateRequest, _Mapping]] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "choice", "kv_transfer_params", "num_cached_tokens", "max_tokens", "timing")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CHOICE_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_PARAMS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    choice: _generate_pb2.Choice
    kv_transfer_params: KVTransferHandle
    num_cached_tokens: int
    max_tokens: int
    timing: _generate_pb2.PodTiming
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., choice: _Optional[_Union[_generate_pb2.Choice, _Mapping]] = ..., kv_transfer_params: _Optional[_Union[KVTransferHandle, _Mapping]] = ..., num_cached_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ..., timing: _Optional[_Union[_generate_pb2.PodTiming, _Mapping]] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("request", "kv_transfer_params")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_PARAMS_FIELD_NUMBER: _ClassVar[int]
    request: _generate_pb2.GenerateRequest
    kv_transfer_params: KVTransferHandle
    def __init__(self, request: _Optional[_Union[_generate_pb2.GenerateRequest, _Mapping]] = ..., kv_transfer_params: _Optional[_Union[KVTransferHandle, _Mapping]] = ...) -> None: ...
