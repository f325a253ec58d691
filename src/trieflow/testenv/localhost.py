"""Helpers for real components started on this machine by tests, benchmarks and testenv."""

from __future__ import annotations

import socket
from pathlib import Path


def free_port() -> int:
    """A loopback port free right now (the caller binds it soon after)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path, lines: int = 30) -> str:
    """The end of a component's log, for error messages that explain a failed start."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"
