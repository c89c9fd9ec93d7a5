"""The grammar backend: xgrammar (what vLLM and SGLang use by default).

Two halves: :func:`check_spec` parses a spec without a tokenizer (cheap; the API server runs it so a bad schema,
regex or grammar is a 400 with the backend's message), and :class:`XgrammarBackend` compiles specs against the
model's vocabulary and makes matchers (the engine's structured-output manager runs it off the model loop).

JSON is generated compactly (``{"a": 1, "b": [2]}``, no free whitespace): a small model allowed arbitrary
whitespace can spend its whole token budget on newlines inside a valid document. Schemas are strict: an object
admits only its declared properties unless ``additionalProperties`` says otherwise (OpenAI's ``strict`` mode).
"""

from __future__ import annotations

import json
import re
from typing import Any

from pdserve.engine.structured_output.params import StructuredOutputsParams

# JSON Schema keywords the backend enforces (or that only annotate). Anything else is refused with a 400: xgrammar
# silently ignores keywords it does not know (``not``, ``if``/``then``, ``uniqueItems``...), and an ignored
# constraint would be an accepted-but-not-enforced promise.
_ENFORCED = {
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
    "enum", "const", "anyOf", "oneOf", "$ref", "$defs", "definitions", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "minLength", "maxLength", "pattern", "format", "minProperties", "maxProperties",
}
_ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
                "readOnly", "writeOnly"}
# Keywords whose value is a map of name -> subschema, or a list of subschemas, or one subschema.
_SCHEMA_MAPS = {"properties", "$defs", "definitions"}
_SCHEMA_LISTS = {"anyOf", "oneOf", "prefixItems"}
_SCHEMA_ONE = {"items", "additionalProperties"}

_LOG_PREFIX = re.compile(r"^\[[0-9:]+\] [^\s:]+:\d+: ")


def _backend_message(exc: Exception) -> str:
    """The backend's own message, without its log prefix (``[02:12:52] /project/cpp/x.cc:94: ``)."""
    return _LOG_PREFIX.sub("", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)


def check_json_schema_keywords(schema: Any, path: str = "$") -> None:
    """``ValueError`` naming the first keyword the backend would not enforce (see ``_ENFORCED``)."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise ValueError(f"the JSON Schema at {path} must be an object or a boolean")
    for key, value in schema.items():
        if key not in _ENFORCED and key not in _ANNOTATIONS:
            raise ValueError(f"unsupported JSON Schema keyword {key!r} at {path}")
        if key in _SCHEMA_MAPS:
            if not isinstance(value, dict):
                raise ValueError(f"{key!r} at {path} must be an object")
            for name, sub in value.items():
                check_json_schema_keywords(sub, f"{path}.{key}.{name}")
        elif key in _SCHEMA_LISTS:
            if not isinstance(value, list):
                raise ValueError(f"{key!r} at {path} must be an array")
            for i, sub in enumerate(value):
                check_json_schema_keywords(sub, f"{path}.{key}[{i}]")
        elif key in _SCHEMA_ONE:
            check_json_schema_keywords(value, f"{path}.{key}")


def _choice_grammar(choices: list[str]) -> str:
    # EBNF string literals take JSON's escapes.
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def build_grammar(params: StructuredOutputsParams) -> Any:
    """The backend's grammar for a spec (no tokenizer needed); ``ValueError`` with the backend's message."""
    try:
        import xgrammar as xgr
    except ImportError:
        raise ValueError("structured outputs need the grammar backend: pip install 'pdserve[structured]'") from None

    kind = params.kind
    try:
        if kind == "json":
            check_json_schema_keywords(json.loads(params.json))
            return xgr.Grammar.from_json_schema(params.json, any_whitespace=False, strict_mode=True)
        if kind == "json_object":
            return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        if kind == "regex":
            return xgr.Grammar.from_regex(params.regex)
        if kind == "choice":
            return xgr.Grammar.from_ebnf(_choice_grammar(params.choice))
        return xgr.Grammar.from_ebnf(params.grammar)
    except ValueError:
        raise
    except Exception as exc:  # the backend raises RuntimeError (and a few others) for bad specs
        raise ValueError(f"invalid structured_outputs.{kind}: {_backend_message(exc)}") from None


def check_spec(params: StructuredOutputsParams) -> None:
    """``ValueError`` if the backend cannot build this spec; run where a request enters a server."""
    build_grammar(params)


class XgrammarBackend:
    """Compiles specs for one model's vocabulary and makes matchers. Thread-safe for compiles.

    ``vocab_size`` is the model's (its logits' width), which may exceed the tokenizer's: padding ids are never
    allowed. ``bitmask_width`` int32 words hold one bit per id.
    """

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        # Our manager keeps the cache (keyed by spec, with hit counters); one thread per compile, since the
        # manager runs compiles in its own pool.
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.vocab_size = vocab_size
        self.bitmask_width = (vocab_size + 31) // 32

    def compile(self, params: StructuredOutputsParams) -> Any:
        """A compiled grammar (slow: tens of ms to seconds for a large schema); ``ValueError`` for a bad spec."""
        grammar = build_grammar(params)
        try:
            return self._compiler.compile_grammar(grammar)
        except Exception as exc:
            raise ValueError(f"invalid structured_outputs.{params.kind}: {_backend_message(exc)}") from None

    def matcher(self, compiled: Any, stop_token_id: int | None) -> Any:
        """A fresh matcher; the request's EOS id is the one stop token it accepts at the end."""
        stop = [stop_token_id] if stop_token_id is not None else None
        return self._xgr.GrammarMatcher(compiled, override_stop_tokens=stop)
