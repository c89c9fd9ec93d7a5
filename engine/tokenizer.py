"""Tokenizer loading and chat templating (Hugging Face tokenizers)."""

from __future__ import annotations

from typing import Any


def load_tokenizer(path: str | None) -> Any:
    """Load the tokenizer saved beside the model; ``None`` for dummy models without one."""
    if path is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def apply_chat_template(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """Render a conversation with the tokenizer's own chat template; clear errors for bad messages."""
    if tokenizer is None:
        raise ValueError("this model has no tokenizer, so chat is unavailable (pass token ids instead)")
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError("each message must be an object with string 'role' and 'content'")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
