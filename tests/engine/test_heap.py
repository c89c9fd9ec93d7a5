"""freeze_startup_heap: objects alive at the call leave the collector's view; later ones are still collected."""

from __future__ import annotations

import gc

from pdserve.engine.heap import freeze_startup_heap


def test_freezes_what_lives_now_and_collects_what_comes_later():
    class Node:
        def __init__(self) -> None:
            self.me = self  # a cycle: only the cyclic collector frees it

    gc.unfreeze()
    kept = [Node() for _ in range(100)]
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() >= len(kept)
        before = gc.get_freeze_count()
        for _ in range(100):
            Node()  # garbage created after start-up
        assert gc.collect() >= 100  # still found and freed
        assert gc.get_freeze_count() == before
    finally:
        gc.unfreeze()
