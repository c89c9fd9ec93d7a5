"""Incremental detokenization and stop-string matching for one sequence.

Decoding one token at a time is wrong for byte-level BPE (a character can span tokens) and for tokenizers that
add a space before a word depending on the previous token, so the text of the new tokens is taken as the
difference between decoding a short window with and without them. A replacement character at the end means the
UTF-8 sequence is incomplete; the text then waits for the next token.
"""

from __future__ import annotations

from typing import Any, Callable

# How many earlier tokens to decode alongside new ones so word boundaries come out right.
_CONTEXT_TOKENS = 6

# Where Hugging Face's own decode methods live: a tokenizer whose decode path is exactly theirs over a Rust
# `tokenizers` backend can be decoded by that backend directly.
_HF_DECODE_MODULE = "transformers.tokenization_utils_base"
_HF_FAST_MODULES = ("transformers.tokenization_utils_tokenizers", "transformers.tokenization_utils_fast")


def _defining_module(cls: type, name: str) -> str | None:
    return next((c.__module__ for c in cls.__mro__ if name in c.__dict__), None)


def decoder_for(tokenizer: Any) -> Callable[[list[int], bool], str]:
    """``decode(ids, skip_special_tokens) -> str``, the same text as ``tokenizer.decode``.

    Why: every streamed token costs two decodes of a short window (see the module docstring) in the API server
    and again in the router, and Hugging Face's ``decode`` spends ~2.5 µs of Python per call around a ~1.5 µs
    Rust call (converting the ids, dispatching, optional clean-up). When the tokenizer is a stock fast tokenizer
    whose clean-up of tokenization spaces is off, that wrapper adds nothing to the text, so the Rust backend is
    called directly; any other tokenizer (a subclass with its own decode, clean-up on, a slow tokenizer) keeps
    its own ``decode``.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    cls = type(tokenizer)
    if (backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True)
            and _defining_module(cls, "decode") == _HF_DECODE_MODULE
            and _defining_module(cls, "_decode") in _HF_FAST_MODULES):
        return lambda ids, skip: backend.decode(ids, skip_special_tokens=skip)
    return lambda ids, skip: tokenizer.decode(ids, skip_special_tokens=skip)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text, and finds stop strings in it."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], stop: list[str] | None = None,
                 include_stop_str_in_output: bool = False, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self._decode_ids = decoder_for(tokenizer) if tokenizer is not None else None
        self.stop = list(stop or [])
        self.include_stop = include_stop_str_in_output
        self.skip_special = skip_special_tokens
        self.token_ids: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self.token_ids)
        self.text = ""
        self._emitted = 0  # characters of `text` already handed out as deltas

    def _decode(self, ids: list[int]) -> str:
        return self._decode_ids(ids, self.skip_special)

    def append(self, new_token_ids: list[int]) -> str | None:
        """Add tokens; returns the stop string if one now appears in the text (the text is cut there)."""
        if self.tokenizer is None:
            return None
        for tok in new_token_ids:
            self.token_ids.append(tok)
            prefix = self._decode(self.token_ids[self._prefix_offset:self._read_offset])
            full = self._decode(self.token_ids[self._prefix_offset:])
            if full.endswith("\ufffd") or len(full) <= len(prefix):
                continue  # incomplete character (or nothing visible yet): wait for more tokens
            self.text += full[len(prefix):]
            self._prefix_offset = max(self._read_offset - 1, len(self.token_ids) - _CONTEXT_TOKENS)
            self._read_offset = len(self.token_ids)
            stop = self._find_stop(len(full) - len(prefix))
            if stop is not None:
                return stop
        return None

    def append_all(self, token_ids: list[int]) -> None:
        """Detokenize a whole output at once (no stop strings, nothing streamed): one decode call instead of two
        per token, with the same prompt context as :meth:`append` so the text comes out identical."""
        if self.tokenizer is None or not token_ids:
            return
        context = self.token_ids[:self._read_offset]
        prefix = self._decode(context)
        self.token_ids = context + list(token_ids)
        self.text = self._decode(self.token_ids)[len(prefix):]
        self._read_offset = len(self.token_ids)

    def _find_stop(self, new_chars: int) -> str | None:
        if not self.stop:
            return None
        # Only the tail can hold a new match: the new characters plus the longest stop string's length.
        window_start = max(0, len(self.text) - new_chars - max(len(s) for s in self.stop) + 1)
        best: tuple[int, str] | None = None
        for s in self.stop:
            idx = self.text.find(s, window_start)
            if idx >= 0 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is None:
            return None
        idx, s = best
        self.text = self.text[:idx + len(s)] if self.include_stop else self.text[:idx]
        return s

    def take_delta(self) -> str:
        """Text produced since the last call. Holds back a tail that might be the start of a stop string."""
        hold = max((len(s) - 1 for s in self.stop), default=0)
        end = max(self._emitted, len(self.text) - hold)
        delta = self.text[self._emitted:end]
        self._emitted = end
        return delta

    def flush(self) -> str:
        """All remaining text (call when the sequence is finished)."""
        delta = self.text[self._emitted:]
        self._emitted = len(self.text)
        return delta
