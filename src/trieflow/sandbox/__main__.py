"""``python -m trieflow.sandbox``: run agent episodes against the recording proxy.

Exit status: 0 after ``--max-episodes`` episodes or a stop signal, 1 when the proxy or the
model never answered within the startup timeout, 2 on invalid options or tasks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Sequence

from trieflow.sandbox.config import ConfigError, parse_args
from trieflow.sandbox.rewards import NoTestError
from trieflow.sandbox.runner import EpisodeRunner, StartupError
from trieflow.sandbox.tasks import TaskError, load_tasks


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config, level = parse_args(argv)
    except ConfigError as exc:
        print(f"trieflow sandbox: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("httpx", "httpx2", "openai"):  # one line per model call otherwise
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        runner = EpisodeRunner(config, load_tasks(config.tasks_path))
    except (TaskError, NoTestError) as exc:
        print(f"trieflow sandbox: {exc}", file=sys.stderr)
        return 2
    try:
        summary = asyncio.run(runner.run())
    except StartupError as exc:
        print(f"trieflow sandbox: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary.as_dict()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
