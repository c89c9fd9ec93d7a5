"""The structured-output fields of an OpenAI request, folded into the one :class:`StructuredOutputsParams`.

Accepted (at most one per request, so no two constraints silently compete):

* ``response_format``: ``{"type": "json_object"}``, or ``{"type": "json_schema", "json_schema": {"name", "schema",
  "strict"}}`` (the schema is enforced, strict or not); ``{"type": "text"}`` is no constraint;
* ``structured_outputs``: vLLM's object, ``{"json": schema}``, ``{"regex": ...}``, ``{"choice": [...]}``,
  ``{"grammar": EBNF}`` or ``{"json_object": true}``;
* vLLM's older names ``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar``.

The backend parses the spec here (cheap, no tokenizer), so a bad schema, regex or grammar is a 400 carrying the
backend's message, before the request reaches the engine; compiling it for the vocabulary happens in the engine.
"""

from __future__ import annotations

from typing import Any

from pdserve.engine.frontend.tokenizer import off_loop
from pdserve.engine.structured_output.backend import check_spec
from pdserve.engine.structured_output.params import StructuredOutputsParams
from pdserve.services.api.errors import bad_request

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def _sources(req: Any) -> list[tuple[str, dict[str, Any]]]:
    """Each field the request set that constrains the output: (its name, the structured_outputs dict it means)."""
    found: list[tuple[str, dict[str, Any]]] = []
    fmt = getattr(req, "response_format", None)
    if fmt is not None and fmt.type == "json_object":
        found.append(("response_format", {"json_object": True}))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise bad_request("response_format of type 'json_schema' needs json_schema.schema",
                              param="response_format")
        found.append(("response_format", {"json": fmt.json_schema.schema_}))
    if req.structured_outputs is not None:
        found.append(("structured_outputs", req.structured_outputs))
    for name, key in _GUIDED.items():
        value = getattr(req, name)
        if value is not None:
            found.append((name, {key: value}))
    return found


def structured_outputs_of(req: Any, extra: tuple[str, dict[str, Any]] | None = None) -> StructuredOutputsParams | None:
    """The request's constraint, checked by the backend; None when it sets none. ``extra``: one more source
    (tool calling's arguments schema). 400 naming the field for a bad or doubled one."""
    sources = _sources(req) + ([extra] if extra is not None else [])
    if not sources:
        return None
    if len(sources) > 1:
        names = ", ".join(name for name, _ in sources)
        raise bad_request(f"set at most one output constraint; got {names}", param=sources[1][0])
    name, value = sources[0]
    try:
        params = StructuredOutputsParams.from_dict(value)
        check_spec(params)
    except ValueError as exc:
        raise bad_request(str(exc), param=name) from None
    return params


async def structured_outputs_async(req: Any, extra: tuple[str, dict[str, Any]] | None = None
                                   ) -> StructuredOutputsParams | None:
    """:func:`structured_outputs_of`, off the event loop for a large spec (parsing it takes a while)."""
    size = len(str(req.structured_outputs or "")) + len(str(req.guided_json or "")) + len(str(req.guided_grammar or ""))
    fmt = getattr(req, "response_format", None)
    if fmt is not None and fmt.json_schema is not None:
        size += len(str(fmt.json_schema.schema_))
    return await off_loop(structured_outputs_of, req, extra, size=size)
