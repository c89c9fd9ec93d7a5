"""The one mapping of :class:`SamplingParams` to and from the wire: the HTTP API's request models and protobuf.

Fields are matched by name, so a new sampling parameter is one field in ``SamplingParams`` plus its declaration
in each schema that carries it (the pydantic request model, the ``.proto`` message) -- no list of names to keep
in step. Everything past the first conversion (fan-out, retries, resumes) copies with ``dataclasses.replace``,
which runs the same checks again.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from pdserve.engine.sampling_params import SamplingParams
from pdserve.proto.pdserve.v1 import generate_pb2 as pb

PARAM_NAMES = tuple(f.name for f in dataclasses.fields(SamplingParams))


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
        if _is_repeated(field):
            getattr(msg, field.name).extend(value)
        elif value is not None:
            setattr(msg, field.name, value)
    return msg


def pb_set_fields(msg: Any) -> dict[str, Any]:
    """The fields of a protobuf message that the sender set (non-empty lists, present optionals), by name."""
    fields: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        if _is_repeated(field):
            values = getattr(msg, field.name)
            if values:
                fields[field.name] = list(values)
        elif msg.HasField(field.name):
            fields[field.name] = getattr(msg, field.name)
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
