"""A free TCP port for a rendezvous: two jobs (or test runs) on one machine must never join each other's."""
from __future__ import annotations

import socket


def free_port() -> int:
    """A port nobody listens on now (the kernel picks it; a race with another process is possible but rare)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
