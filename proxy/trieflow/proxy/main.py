"""``trieflow proxy``: command-line entry point (wire ``main`` into the CLI)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence

from trieflow.proxy.config import parse_args
from trieflow.proxy.server import serve


def main(argv: Sequence[str] | None = None) -> int:
    """Parses ``argv`` (without the program name), runs until SIGINT/SIGTERM, returns 0."""
    config = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, stop)

    try:
        import uvloop  # optional: about a third less CPU per request
    except ImportError:
        asyncio.run(run())
    else:
        uvloop.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
