"""The committed *_pb2 modules must be what proto/generate.sh produces today."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GENERATED = REPO / "proto" / "trieflow" / "v1"


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["sh", "proto/generate.sh", str(tmp_path)], cwd=REPO, env=env, check=True)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*"))
    committed = sorted(p.relative_to(REPO / "proto") for p in GENERATED.glob("*_pb2*"))
    assert fresh == committed, "generated files differ in name: run proto/generate.sh"
    stale = [
        str(p) for p in fresh if (tmp_path / p).read_bytes() != (REPO / "proto" / p).read_bytes()
    ]
    assert not stale, f"stale generated code, run proto/generate.sh: {stale}"
