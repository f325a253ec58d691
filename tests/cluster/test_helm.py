"""helm v4 (from PyPI) installs the trieflow chart into the real apiserver."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trieflow.testenv.commands import Run

pytestmark = pytest.mark.cluster

CHART = Path(__file__).parents[2] / "charts" / "trieflow"


def test_helm_is_v4(helm: Run) -> None:
    assert helm("version", "--short").stdout.startswith("v4.")


def test_chart_lints_and_installs_the_crd(helm: Run, kubectl: Run) -> None:
    helm("lint", str(CHART))
    helm("install", "trieflow", str(CHART), "--namespace", "default", "--wait")
    try:
        releases = json.loads(helm("list", "--namespace", "default", "-o", "json").stdout)
        assert [(r["name"], r["status"]) for r in releases] == [("trieflow", "deployed")]
        kubectl("wait", "--for=condition=Established", "crd/rljobs.trieflow.dev")
    finally:
        helm("uninstall", "trieflow", "--namespace", "default")
