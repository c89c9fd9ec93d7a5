"""What the end-to-end tests read from a server process they started: its log and its ``pdserve:*`` metrics."""

from __future__ import annotations

import httpx


def log_tail(log_path: str, chars: int = 4000) -> str:
    """The last ``chars`` characters of a server's log file (shown when a test fails)."""
    with open(log_path, errors="replace") as f:
        return f.read()[-chars:]


def scrape_metrics(base_url: str) -> dict[str, float]:
    """The server's ``pdserve:*`` samples as {"name{labels}": value}."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line.startswith("pdserve:"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out
