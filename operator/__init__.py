"""pdserve.operator."""
