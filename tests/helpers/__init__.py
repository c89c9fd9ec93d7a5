"""Shared test fixtures (tiny random models)."""
