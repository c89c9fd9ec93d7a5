"""pdserve.services.proxy: the minimal prefill-then-decode proxy (the router is the full one)."""
