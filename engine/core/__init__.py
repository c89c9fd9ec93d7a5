"""pdserve.engine.core."""
