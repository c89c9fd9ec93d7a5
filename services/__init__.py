"""pdserve.services."""
