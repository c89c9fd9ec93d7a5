"""pdserve.services.decode."""
