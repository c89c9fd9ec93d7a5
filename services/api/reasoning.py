"""Reasoning parsers: split a chat answer's thinking from its reply (``--reasoning-parser``, off by default).

``think`` (DeepSeek-R1, Qwen3, QwQ and the like): the reasoning is a ``<think>...</think>`` block at the start of
the answer; it goes to ``message.reasoning_content`` (``delta.reasoning_content`` when streamed), the text after
it to ``content`` (whitespace right after ``</think>`` dropped). A template that opens the block itself (its
generation prompt ends inside an unclosed ``<think>``, as DeepSeek-R1's does) starts the answer in reasoning. An
answer cut before ``</think>`` is all reasoning; an answer that does not start with the block is all content.
Tool calls are parsed from the content only.
"""

from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

REASONING_PARSERS = frozenset({"think"})

_START, _REASONING, _CONTENT = "start", "reasoning", "content"


def opens_reasoning(prompt_text: str | None) -> bool:
    """Whether the rendered prompt leaves a ``<think>`` block open (the answer then starts in it)."""
    if not prompt_text:
        return False
    return prompt_text.rfind(THINK_OPEN) > prompt_text.rfind(THINK_CLOSE)


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest suffix of ``text`` that is a proper prefix of ``tag`` (it may grow into it)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningSplitter:
    """One choice's text, delta by delta, as (reasoning, content) pieces that may be sent now.

    Text that may still turn into a tag (``<thi`` at the start, ``</th`` inside the block) is held back until it
    decides or :meth:`finish` comes.
    """

    def __init__(self, in_reasoning: bool = False) -> None:
        self._state = _REASONING if in_reasoning else _START
        self._buf = ""
        self._strip = False  # right after </think>: leading whitespace of the content is dropped
        self.has_reasoning = in_reasoning  # the answer has a reasoning block (possibly empty)

    def feed(self, delta: str) -> tuple[str, str]:
        self._buf += delta
        reasoning, content = [], []
        while self._buf:
            if self._state == _START:
                head = self._buf.lstrip()
                if not head or (len(head) < len(THINK_OPEN) and THINK_OPEN.startswith(head)):
                    break  # undecided: nothing yet, or maybe the opening tag
                if head.startswith(THINK_OPEN):
                    self._buf, self._state, self.has_reasoning = head[len(THINK_OPEN):], _REASONING, True
                else:
                    self._state = _CONTENT
            elif self._state == _REASONING:
                end = self._buf.find(THINK_CLOSE)
                if end < 0:
                    keep = _partial_suffix(self._buf, THINK_CLOSE)
                    reasoning.append(self._buf[:len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep:]
                    break
                reasoning.append(self._buf[:end])
                self._buf, self._state, self._strip = self._buf[end + len(THINK_CLOSE):], _CONTENT, True
            else:
                if self._strip:
                    self._buf = self._buf.lstrip()
                    if not self._buf:
                        break
                    self._strip = False
                content.append(self._buf)
                self._buf = ""
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """What is still held: reasoning cut short stays reasoning; an undecided start is content."""
        rest, self._buf = self._buf, ""
        if self._state == _REASONING:
            return rest, ""
        return "", "" if self._strip else rest


def split_reasoning(text: str, in_reasoning: bool = False) -> tuple[str | None, str]:
    """(reasoning or None, content) of a whole answer."""
    splitter = ReasoningSplitter(in_reasoning)
    r1, c1 = splitter.feed(text)
    r2, c2 = splitter.finish()
    return (r1 + r2 if splitter.has_reasoning else None), c1 + c2
