"""Prompts to token ids without stalling an event loop.

Tokenizing a large prompt takes a while (seconds for a few MiB of text) and would block every other request on
the server's event loop meanwhile. Prompts at least :data:`OFFLOAD_MIN_CHARS` long are tokenized in a worker
thread (Hugging Face's fast tokenizers release the GIL while they work); short ones inline, where a thread hop
would cost more than the work.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, TypeVar

T = TypeVar("T")

# Characters (or token ids) from which tokenization moves off the event loop.
OFFLOAD_MIN_CHARS = 16 * 1024


async def off_loop(fn: Callable[..., T], *args: Any, size: int) -> T:
    """``fn(*args)``, in a worker thread when ``size`` (the input's length) is at least ``OFFLOAD_MIN_CHARS``."""
    if size >= OFFLOAD_MIN_CHARS:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


async def tokenize_async(tokenize: Callable[[Any], list[int]], prompt: Any) -> list[int]:
    """``tokenize(prompt)`` (text or token ids), off the event loop for a large prompt."""
    size = len(prompt) if isinstance(prompt, (str, list)) else 0
    return await off_loop(tokenize, prompt, size=size)
