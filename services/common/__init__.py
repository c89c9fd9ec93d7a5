"""pdserve.services.common."""
