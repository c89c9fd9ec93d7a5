"""Tool calling for chat completions: ``tools`` and ``tool_choice`` as OpenAI defines them.

* ``none`` (the default without tools): the model answers in text; nothing is parsed.
* a named function (``{"type": "function", "function": {"name": ...}}``): the output is constrained to that
  function's ``parameters`` JSON Schema and returned as one tool call (OpenAI's ``finish_reason`` ``stop``).
* ``required``: the output is constrained to a JSON array of ``{"name", "arguments"}`` calls of the given tools
  (at least one), returned as tool calls (``finish_reason`` ``tool_calls``).
* ``auto`` (the default with tools): unconstrained; the model's own tool-call syntax is parsed from the text
  (:class:`ToolCallParser`): Hermes / Qwen ``<tool_call>{json}</tool_call>`` blocks, or a Llama 3 style answer that
  is a single JSON object ``{"name": ..., "parameters": {...}}`` (optionally after ``<|python_tag|>``). Calls of
  unknown tools stay text.

``parallel_tool_calls: false`` allows at most one call: ``required`` is constrained to a one-call array, and an
``auto`` answer keeps its first call only.

The chat template receives ``tools`` so the model sees them the way it was trained to.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from pdserve.services.api.errors import bad_request

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
MAX_TOOLS = 128


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def as_dict(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "type": "function",
                               "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            out["index"] = index
        return out


@dataclass(frozen=True)
class ToolPlan:
    """What a request's ``tools`` / ``tool_choice`` mean: the mode, the constraint it adds, the tool names."""

    mode: str  # "none" | "auto" | "required" | "named"
    names: frozenset[str]
    named: str | None = None
    constraint: dict[str, Any] | None = None  # a structured_outputs object for named / required
    template_tools: list[dict[str, Any]] | None = None  # what the chat template receives
    parallel: bool = True  # False: at most one call per answer

    def limit(self, calls: list["ToolCall"]) -> list["ToolCall"]:
        """The calls an answer may return (one without parallel calls)."""
        return calls if self.parallel else calls[:1]


def _functions(tools: list[Any]) -> dict[str, dict[str, Any]]:
    if len(tools) > MAX_TOOLS:
        raise bad_request(f"at most {MAX_TOOLS} tools are allowed", param="tools")
    out: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise bad_request(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", param="tools")
        name = fn.get("name")
        if not isinstance(name, str) or not name or len(name) > 64:
            raise bad_request(f"tools[{i}].function.name must be a string of 1 to 64 characters", param="tools")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise bad_request(f"tools[{i}].function.parameters must be a JSON Schema object", param="tools")
        if name in out:
            raise bad_request(f"tools: the function name {name!r} appears twice", param="tools")
        out[name] = params
    return out


def plan_tools(tools: list[Any] | None, tool_choice: Any, parallel: bool = True) -> ToolPlan:
    """Check ``tools`` and ``tool_choice`` (400 naming the field) and decide the mode. ``parallel``: OpenAI's
    ``parallel_tool_calls`` (False: at most one call)."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", param="tool_choice")
        return ToolPlan("none", frozenset())
    functions = _functions(tools)
    names = frozenset(functions)
    template_tools = [t for t in tools]
    if tool_choice is None or tool_choice == "auto":
        return ToolPlan("auto", names, template_tools=template_tools, parallel=parallel)
    if tool_choice == "none":
        return ToolPlan("none", names, template_tools=template_tools)
    if tool_choice == "required":
        call = {"anyOf": [{"type": "object", "properties": {"name": {"const": n}, "arguments": functions[n]},
                           "required": ["name", "arguments"], "additionalProperties": False} for n in sorted(names)]}
        schema = {"type": "array", "items": call, "minItems": 1, **({} if parallel else {"maxItems": 1})}
        return ToolPlan("required", names, constraint={"json": schema}, template_tools=template_tools,
                        parallel=parallel)
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not (isinstance(tool_choice, dict) and tool_choice.get("type") == "function" and isinstance(fn, dict)
            and isinstance(fn.get("name"), str)):
        raise bad_request("tool_choice must be 'none', 'auto', 'required' or "
                          "{'type': 'function', 'function': {'name': ...}}", param="tool_choice")
    if fn["name"] not in functions:
        raise bad_request(f"tool_choice names {fn['name']!r}, which is not among the tools", param="tool_choice")
    return ToolPlan("named", names, named=fn["name"], constraint={"json": functions[fn["name"]]},
                    template_tools=template_tools)


def calls_of_constrained(plan: ToolPlan, text: str) -> list[ToolCall]:
    """The tool calls of a finished named / required answer (its text obeys the constraint, unless cut short by
    ``max_tokens``: then no call, and the text stays content)."""
    try:
        value = json.loads(text)
    except ValueError:
        return []
    if plan.mode == "named":
        return [ToolCall(plan.named, json.dumps(value, ensure_ascii=False))]
    return [ToolCall(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in value]


def _llama_call(text: str, names: frozenset[str]) -> ToolCall | None:
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):].strip()
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("parameters", obj.get("arguments", {}))
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _hermes_call(body: str, names: frozenset[str]) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names or not isinstance(obj.get("arguments", {}), dict):
        return None
    return ToolCall(obj["name"], json.dumps(obj.get("arguments", {}), ensure_ascii=False))


class ToolCallParser:
    """Splits ``auto`` output into content and tool calls, incrementally (for streaming) or at once.

    :meth:`feed` takes the text so far delta by delta and returns what may be sent now: content that can no longer
    turn into a tool call, and the calls completed. Text that may still be one (after ``<tool_call>`` until its
    ``</tool_call>``, a possible prefix of that tag, or an answer that starts like a Llama 3 JSON call) is held back
    until :meth:`finish`.
    """

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names
        self._buf = ""  # received, not yet sent as content or parsed as a call
        self._started = False  # any non-space text seen (a Llama 3 call must be the whole answer)
        self._json_answer = False  # the answer started with "{" or the python tag: held to the end

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        self._buf += delta
        if not self._started:
            head = self._buf.lstrip()
            if not head or (len(head) < len(PYTHON_TAG) and PYTHON_TAG.startswith(head)):
                return "", []  # nothing yet, or maybe the python tag: undecided
            self._started = True
            self._json_answer = head.startswith("{") or head.startswith(PYTHON_TAG)
        if self._json_answer:
            return "", []
        return self._drain(final=False)

    def finish(self) -> tuple[str, list[ToolCall]]:
        """Everything left: content and the calls found. An unclosed or unparsable block stays content."""
        if self._json_answer:
            text, self._buf = self._buf, ""
            call = _llama_call(text, self.names)
            if call is None and HERMES_OPEN in text:
                self._json_answer = False
                self._buf = text
                return self._drain(final=True)
            return ("", [call]) if call is not None else (text, [])
        return self._drain(final=True)

    def _drain(self, final: bool) -> tuple[str, list[ToolCall]]:
        content, calls = [], []
        while True:
            start = self._buf.find(HERMES_OPEN)
            if start < 0:
                keep = 0 if final else _partial_suffix(self._buf, HERMES_OPEN)
                content.append(self._buf[:len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep:]
                break
            end = self._buf.find(HERMES_CLOSE, start)
            if end < 0:
                content.append(self._buf[:start])
                self._buf = self._buf[start:]
                if final:
                    content.append(self._buf)
                    self._buf = ""
                break
            call = _hermes_call(self._buf[start + len(HERMES_OPEN):end], self.names)
            content.append(self._buf[:start])
            if call is None:
                content.append(self._buf[start:end + len(HERMES_CLOSE)])
            else:
                calls.append(call)
            self._buf = self._buf[end + len(HERMES_CLOSE):]
        text = "".join(content)
        if calls:  # whitespace between blocks is no content
            text = text.strip()
        return text, calls


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest suffix of ``text`` that is a proper prefix of ``tag`` (it may grow into it)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def parse_tool_calls(text: str, names: frozenset[str]) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a whole ``auto`` answer."""
    parser = ToolCallParser(names)
    first, calls = parser.feed(text)
    rest, more = parser.finish()
    return first + rest, calls + more


def finish_reason(plan: ToolPlan, reason: str | None, calls: list[ToolCall]) -> str | None:
    """OpenAI's: ``tool_calls`` when the model chose to call (``auto``, ``required``); a forced named call ends as
    ``stop``; a cut answer keeps ``length``."""
    if reason == "stop" and calls and plan.mode in ("auto", "required"):
        return "tool_calls"
    return reason


def message_of(plan: ToolPlan, text: str) -> tuple[dict[str, Any], list[ToolCall]]:
    """The assistant message of a finished, non-streamed choice."""
    if plan.mode in ("named", "required"):
        calls = calls_of_constrained(plan, text)
        content: str | None = None if calls else text
    elif plan.mode == "auto":
        content, calls = parse_tool_calls(text, plan.names)
        content, calls = content or None, plan.limit(calls)
    else:
        return {"role": "assistant", "content": text}, []
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [c.as_dict() for c in calls]
    return message, calls


class ChoiceStream:
    """One streamed choice's text deltas as chat ``delta`` objects for its plan (content and ``tool_calls``)."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.calls: list[ToolCall] = []
        self._parser = ToolCallParser(plan.names) if plan.mode == "auto" else None
        self._held = ""  # required: the whole answer, parsed at the end
        self._named_id = f"call_{uuid.uuid4().hex[:24]}"

    def delta(self, text: str, final: bool) -> dict[str, Any]:
        mode = self.plan.mode
        if mode == "none":
            return {"content": text} if text else {}
        if mode == "named":
            if not text and not (final and not self.calls):
                return {}
            fn: dict[str, Any] = {"arguments": text}
            call: dict[str, Any] = {"index": 0, "function": fn}
            if not self.calls:  # the first delta names the call
                self.calls.append(ToolCall(self.plan.named, "", self._named_id))
                call.update(id=self._named_id, type="function")
                fn["name"] = self.plan.named
            return {"tool_calls": [call]}
        if mode == "required":
            self._held += text
            if not final:
                return {}
            self.calls = calls_of_constrained(self.plan, self._held)
            if not self.calls:
                return {"content": self._held} if self._held else {}
            return {"tool_calls": [c.as_dict(i) for i, c in enumerate(self.calls)]}
        assert self._parser is not None  # mode "auto"
        content, calls = self._parser.feed(text)
        if final:
            more, later = self._parser.finish()
            content, calls = content + more, calls + later
        out: dict[str, Any] = {}
        if content:
            out["content"] = content
        calls = calls[:max(0, len(self.plan.limit(self.calls + calls)) - len(self.calls))]
        if calls:
            first = len(self.calls)
            self.calls += calls
            out["tool_calls"] = [c.as_dict(first + i) for i, c in enumerate(calls)]
        return out
