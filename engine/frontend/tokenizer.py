"""Tokenizer loading, chat templating (Hugging Face tokenizers), and tokenizing without stalling an event loop.

Tokenizing a large prompt takes a while (seconds for a few MiB of text) and would block every other request on
a server's event loop meanwhile. Prompts at least :data:`OFFLOAD_MIN_CHARS` long are tokenized in a worker
thread (Hugging Face's fast tokenizers release the GIL while they work); short ones inline, where a thread hop
would cost more than the work.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, TypeVar

T = TypeVar("T")

# Characters (or token ids) from which tokenization moves off the event loop.
OFFLOAD_MIN_CHARS = 16 * 1024


def load_tokenizer(path: str | None) -> Any:
    """Load the tokenizer saved beside the model; ``None`` for dummy models without one."""
    if path is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


# apply_chat_template's own parameters (and the variables it sets for the template): a template keyword may not
# replace them.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs", "processor_kwargs"})


def apply_chat_template(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                        tools: list[dict[str, Any]] | None = None, template_kwargs: dict[str, Any] | None = None,
                        chat_template: str | None = None) -> str:
    """Render a conversation with the tokenizer's own chat template (or ``chat_template``, a Jinja text that
    replaces it); clear errors for bad messages. ``tools``: the OpenAI tool definitions, handed to the template
    (templates that know tools render them). ``template_kwargs``: more template variables (e.g. Qwen3's
    ``enable_thinking``); a name of :data:`RESERVED_TEMPLATE_KWARGS` is a ``ValueError``."""
    if tokenizer is None:
        raise ValueError("this model has no tokenizer, so chat is unavailable (pass token ids instead)")
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError("each message must be an object with string 'role' and 'content'")
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template")
    extra = dict(template_kwargs or {})
    clash = sorted(RESERVED_TEMPLATE_KWARGS.intersection(extra))
    if clash:
        raise ValueError(f"chat template keywords may not set {', '.join(clash)}")
    if tools:
        extra["tools"] = tools
    if chat_template is not None:
        extra["chat_template"] = chat_template
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **extra)


async def off_loop(fn: Callable[..., T], *args: Any, size: int) -> T:
    """``fn(*args)``, in a worker thread when ``size`` (the input's length) is at least ``OFFLOAD_MIN_CHARS``."""
    if size >= OFFLOAD_MIN_CHARS:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


async def tokenize_async(tokenize: Callable[[Any], list[int]], prompt: Any) -> list[int]:
    """``tokenize(prompt)`` (text or token ids), off the event loop for a large prompt."""
    size = len(prompt) if isinstance(prompt, (str, list)) else 0
    return await off_loop(tokenize, prompt, size=size)
