"""Benchmarks of a running server: ``pdserve bench serve`` (:mod:`.serve`)."""
