"""``free_port`` (pdserve/cli/local_servers.py), which every local start (``pdserve up``, benchmarks, tests) takes
its servers' ports from: below the kernel's ephemeral range, so an outgoing connection cannot take a port between
its choice and the server's bind; never the same port twice in a process; bindable when returned."""

from __future__ import annotations

import socket

from pdserve.cli import local_servers
from pdserve.cli.local_servers import free_port


def test_ports_are_free_distinct_and_below_the_ephemeral_range():
    low, _ = local_servers._ephemeral_ports()
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    if low - local_servers._FIRST_PORT >= 1000:
        assert all(local_servers._FIRST_PORT <= p < low for p in ports), (low, sorted(ports)[-5:])
    for port in ports[:20]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_port_in_use_is_skipped(monkeypatch):
    low, _ = local_servers._ephemeral_ports()
    if low - local_servers._FIRST_PORT < 1000:
        return  # no room below this machine's range: free_port asks the kernel instead
    busy_port, free = local_servers._FIRST_PORT + 500, local_servers._FIRST_PORT + 501
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", busy_port))
        busy.listen()
        draws = iter([busy_port, free])
        monkeypatch.setattr(local_servers.random, "randint", lambda a, b: next(draws))
        assert free_port() == free
