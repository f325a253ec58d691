#!/usr/bin/env bash
# Set up what is missing, then run the linters and every test suite that needs no GPU:
# unit tests, the real Kubernetes control plane, real vLLM (CPU), real helm.
# Extra arguments go to pytest (e.g. `hack/test.sh -m "not cluster and not vllm"`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/hack/setup.sh"
cd "$ROOT"
export PATH="$ROOT/.venv/bin:$PATH"

ruff check .
ruff format --check .
mypy

set +e
python -m pytest -m "not gpu" "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "hack/test.sh: pytest collected no tests for this selection; that is a failure here" >&2
  exit 1
fi
exit "$rc"
