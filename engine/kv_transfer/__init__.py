"""pdserve.engine.kv_transfer."""
