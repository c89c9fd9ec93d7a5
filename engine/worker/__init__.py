"""pdserve.engine.worker."""
