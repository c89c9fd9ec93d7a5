"""The bounded in-memory store behind the Responses API's ``previous_response_id``.

Each stored response keeps the conversation that led to it plus its reply (without its ``instructions``: as in
OpenAI's API, a follow-up's instructions replace them). The store is an LRU of ``capacity`` entries (the server's
``--responses-store-size``): the least recently used response is forgotten first, and a follow-up to a
forgotten or unknown id is a 404. It lives in the serving process and is lost on restart; behind a router, the
router keeps it (the router serves the Responses API itself, on its pods' chat path).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any


class ResponseStore:
    """An LRU map from response id to its conversation (a list of ``{"role", "content"}`` turns)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"the response store size must be >= 0, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, response_id: str, conversation: list[dict[str, Any]]) -> None:
        """Remember a response (no-op with capacity 0), evicting the least recently used beyond capacity."""
        if self.capacity == 0:
            return
        self._items[response_id] = conversation
        self._items.move_to_end(response_id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> list[dict[str, Any]] | None:
        """The conversation of a stored response (a copy; marks it recently used), or None."""
        conv = self._items.get(response_id)
        if conv is None:
            return None
        self._items.move_to_end(response_id)
        return list(conv)
