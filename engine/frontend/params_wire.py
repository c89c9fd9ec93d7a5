"""The one mapping of :class:`SamplingParams` to and from the wire: the HTTP API's request models and protobuf.

Fields are matched by name, so a new sampling parameter is one field in ``SamplingParams`` plus its declaration
in each schema that carries it (the pydantic request model, the ``.proto`` message) -- no list of names to keep
in step. A message-typed field (``structured_outputs``) adds its two conversions to ``_MESSAGE_FIELDS``.
Everything past the first conversion (fan-out, retries, resumes) copies with ``dataclasses.replace``, which runs
the same checks again.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.structured_output.params import StructuredOutputsParams
from pdserve.proto.pdserve.v1 import generate_pb2 as pb

PARAM_NAMES = tuple(f.name for f in dataclasses.fields(SamplingParams))


def _structured_to_pb(value: StructuredOutputsParams, msg: pb.StructuredOutputs) -> None:
    kind = value.kind
    if kind == "choice":
        msg.choice.values.extend(value.choice)
    else:
        setattr(msg, kind, getattr(value, kind))
    msg.num_prefix_tokens = value.num_prefix_tokens


def _structured_from_pb(msg: pb.StructuredOutputs) -> dict[str, Any]:
    """The HTTP API's ``structured_outputs`` object (what ``StructuredOutputsParams.from_dict`` reads)."""
    kind = msg.WhichOneof("constraint")
    if kind is None:
        raise ValueError("structured_outputs sets no constraint")
    value = list(msg.choice.values) if kind == "choice" else getattr(msg, kind)
    fields: dict[str, Any] = {kind: value}
    if msg.num_prefix_tokens:
        fields["num_prefix_tokens"] = msg.num_prefix_tokens
    return fields


def _logit_bias_to_pb(value: dict[int, float], msg: Any) -> None:
    for token, bias in value.items():
        msg[token] = bias


def _logit_bias_from_pb(msg: Any) -> dict[str, float]:
    """The HTTP API's ``logit_bias`` (keys are token ids as strings, as OpenAI's JSON has them)."""
    return {str(token): bias for token, bias in msg.items()}


# The message-typed fields (and maps), by name: (fill the message from the value, the value's wire form from the
# message).
_MESSAGE_FIELDS = {"structured_outputs": (_structured_to_pb, _structured_from_pb),
                   "logit_bias": (_logit_bias_to_pb, _logit_bias_from_pb)}


def _is_repeated(field: FieldDescriptor) -> bool:
    # Newer protobuf versions dropped ``label`` from descriptors in favour of ``is_repeated``.
    if hasattr(field, "is_repeated"):
        return bool(field.is_repeated)
    return field.label == FieldDescriptor.LABEL_REPEATED


def sampling_to_pb(params: SamplingParams) -> pb.SamplingParams:
    """Every field of ``params`` that the message declares (``None`` left unset)."""
    msg = pb.SamplingParams()
    for field in msg.DESCRIPTOR.fields:
        value = getattr(params, field.name)
        if field.name in _MESSAGE_FIELDS:
            if value is not None:
                _MESSAGE_FIELDS[field.name][0](value, getattr(msg, field.name))
        elif _is_repeated(field):
            if value is not None:
                getattr(msg, field.name).extend(value)
        elif value is not None:
            setattr(msg, field.name, value)
    return msg


def pb_set_fields(msg: Any) -> dict[str, Any]:
    """The fields of a protobuf message that the sender set (non-empty lists, present optionals), by name;
    message-typed fields (``structured_outputs``) as the HTTP API's objects. ``ValueError`` for a malformed one."""
    fields: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        if field.name == "logit_bias":  # a map: no presence, empty when unset
            if msg.logit_bias:
                fields[field.name] = _logit_bias_from_pb(msg.logit_bias)
        elif _is_repeated(field):
            values = getattr(msg, field.name)
            if values:
                fields[field.name] = list(values)
        elif msg.HasField(field.name):
            value = getattr(msg, field.name)
            fields[field.name] = _MESSAGE_FIELDS[field.name][1](value) if field.name in _MESSAGE_FIELDS else value
    return fields


def sampling_from_pb(msg: pb.SamplingParams) -> SamplingParams:
    """``SamplingParams`` from a message; unset fields take the defaults. ``ValueError`` for bad values."""
    return SamplingParams(**pb_set_fields(msg))


def sampling_from_model(model: Any, **overrides: Any) -> SamplingParams:
    """``SamplingParams`` from a request model (any object with attributes named as the fields); attributes that
    are missing or ``None`` take the defaults. ``overrides`` win (fields whose meaning differs per endpoint, such
    as ``max_tokens`` or ``logprobs``). ``ValueError`` for bad values."""
    fields = {name: value for name in PARAM_NAMES if (value := getattr(model, name, None)) is not None}
    fields.update(overrides)
    return SamplingParams(**fields)
