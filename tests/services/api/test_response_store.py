"""The Responses API's bounded store: least recently used first out, size 0 keeps nothing."""

from __future__ import annotations

import pytest

from pdserve.services.api.response_store import ResponseStore


def turn(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_lru_eviction_and_copies():
    store = ResponseStore(2)
    store.put("a", turn("a"))
    store.put("b", turn("b"))
    assert store.get("a") == turn("a")  # "a" is now the most recently used
    store.put("c", turn("c"))
    assert store.get("b") is None and store.get("a") == turn("a") and store.get("c") == turn("c")
    assert len(store) == 2
    got = store.get("a")
    got.append({"role": "assistant", "content": "x"})
    assert store.get("a") == turn("a")  # callers get copies


def test_size_zero_and_negative():
    store = ResponseStore(0)
    store.put("a", turn("a"))
    assert store.get("a") is None and len(store) == 0
    with pytest.raises(ValueError):
        ResponseStore(-1)
