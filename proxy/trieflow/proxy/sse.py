"""Splitting a server-sent-events byte stream into event payloads (pure, incremental).

vLLM frames each chunk as ``data: <json>\\n\\n``. Network reads cut anywhere, and a first
chunk carrying prompt token ids can be far larger than a line-reader's limit, so the
splitter buffers until a blank line and yields the joined ``data`` fields of each event.
"""

from __future__ import annotations

DONE = b"[DONE]"


class SseSplitter:
    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Returns the payloads of the events completed by ``data`` (without ``data: ``)."""
        self._buffer += data
        if b"\r" in self._buffer:  # CRLF framing; rare, so normalise lazily
            self._buffer[:] = self._buffer.replace(b"\r\n", b"\n")
        events: list[bytes] = []
        while True:
            end = self._buffer.find(b"\n\n")
            if end < 0:
                return events
            raw = bytes(self._buffer[:end])
            del self._buffer[: end + 2]
            payload = parse_event(raw)
            if payload is not None:
                events.append(payload)

    @property
    def pending(self) -> bytes:
        """Bytes of an unfinished event (non-empty only if the stream was cut short)."""
        return bytes(self._buffer)


def parse_event(raw: bytes) -> bytes | None:
    """The ``data`` payload of one event; None for comments or events without data."""
    if raw.startswith(b"data: ") and b"\n" not in raw:  # the common case, one data line
        return raw[6:]
    lines = [line for line in raw.split(b"\n") if line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(line[6:] if line.startswith(b"data: ") else line[5:] for line in lines)


def format_event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"
