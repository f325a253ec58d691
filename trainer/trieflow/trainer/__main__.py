"""``python -m trieflow.trainer --config rljob.yaml`` (the operator runs it under torchrun).

Prints one JSON line per training step on rank 0. Exit status 0 once ``totalSteps`` are
done, so the pod ends Succeeded; 2 for a configuration error (it would fail again).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_CONFIG_ERROR = 2


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trieflow.trainer", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="resolved RLJob (rljob.yaml)")
    parser.add_argument("--runtime", type=Path, help="endpoints file (default: TRIEFLOW_RUNTIME)")
    parser.add_argument("--model-dir", type=Path, help="policy model directory")
    parser.add_argument("--checkpoint-dir", type=Path, help="default: TRIEFLOW_CHECKPOINT_DIR")
    parser.add_argument("--weights-dir", type=Path, help="exports for the rollout engines")
    parser.add_argument("--metrics-port", type=int, help="Prometheus port (0: any free)")
    parser.add_argument("--kubeconfig", type=Path, help="report progress to this cluster")
    parser.add_argument("--group-timeout", type=float, default=600.0)
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from dataclasses import replace

    from trieflow.trainer.loop import Trainer
    from trieflow.trainer.settings import load_settings

    try:
        settings = load_settings(
            args.config,
            runtime=args.runtime,
            model_dir=args.model_dir,
            checkpoint_dir=args.checkpoint_dir,
            weights_dir=args.weights_dir,
            metrics_port=args.metrics_port,
            kubeconfig=args.kubeconfig,
        )
    except (OSError, ValueError) as err:
        print(f"trainer configuration error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    Trainer(replace(settings, group_timeout=args.group_timeout)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
