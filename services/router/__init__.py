"""pdserve.services.router."""
