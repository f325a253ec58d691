#!/usr/bin/env bash
# Set up what is missing, then run the main job: a local RL run of the example RLJob.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/hack/setup.sh"
exec "$ROOT/.venv/bin/trieflow" run "${1:-$ROOT/examples/local-tiny.yaml}"
