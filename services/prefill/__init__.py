"""pdserve.services.prefill."""
