"""Local test servers: how long a test waits for a condition (a server answering, a page showing a reply)
before it fails, and a free port for a server to listen on.

Waits are generous on purpose: tests run on busy 2-core machines, and a wait is never a measure of speed.
"""
import socket

PATIENCE = 600  # seconds


def free_port() -> int:
    """A port on 127.0.0.1 nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
