"""Local ports for the tests' own servers and clusters."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A localhost port nothing listens on now (the OS picks it; once closed, nothing listens there)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
