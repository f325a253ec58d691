"""Checkpoints of a (sharded) model and its optimizer, one directory per step.

Layout under ``root`` (a volume every rank sees, e.g. ``TRIEFLOW_CHECKPOINT_DIR``)::

    step-000010/            a complete checkpoint: torch.distributed.checkpoint files
        .metadata             (DCP: written once every rank's shards are written)
        __0_0.distcp ...      (each rank writes its own shards, in parallel)
        trieflow.json         step, world size, the caller's ``extra`` (rank 0, last)
    .step-000020.partial/   a save in progress, or one that died: never read

A save writes into the hidden ``.partial`` directory; after every rank has finished,
rank 0 renames it to ``step-NNNNNN`` (atomic on one filesystem), so a directory with
that name is always complete and a crash at any moment leaves the previous checkpoint as
the latest. Deletion (retention) renames first, too. Checkpoints are resharding-safe
(DCP): a job restarted with a different number of ranks loads them.

Works with and without a process group (one process); with one, every rank calls every
method (they synchronise).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

MANIFEST = "trieflow.json"
DCP_METADATA = ".metadata"
_COMPLETE = re.compile(r"step-(\d{6,})")
_HIDDEN_PREFIX = "."


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _no_dist() -> bool:
    """DCP without a process group: one process reads and writes everything."""
    return not dist.is_initialized()


@contextlib.contextmanager
def _single_process_quietly() -> Iterator[None]:
    """DCP warns on every single-process save and load; that is our intent, say nothing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Rename out of the way first, so a half-removed directory never looks complete."""
    if not path.exists():
        return
    doomed = path.with_name(f"{_HIDDEN_PREFIX}{path.name.lstrip('.')}.deleting-{time.time_ns()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


class CheckpointManager:
    """Save, find and load step checkpoints under ``root``; keep the newest ``keep``."""

    def __init__(self, root: Path, keep: int) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.root = Path(root)
        self.keep = keep

    def path(self, step: int) -> Path:
        return self.root / f"step-{step:06d}"

    def _staging(self, step: int) -> Path:
        return self.root / f"{_HIDDEN_PREFIX}step-{step:06d}.partial"

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            match = _COMPLETE.fullmatch(entry.name)
            if match and (entry / MANIFEST).is_file() and (entry / DCP_METADATA).is_file():
                found.append(int(match.group(1)))
        return sorted(found)

    def latest(self) -> int | None:
        """The newest complete checkpoint's step; incomplete saves are ignored."""
        steps = self.steps()
        return steps[-1] if steps else None

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        extra: dict[str, Any] | None = None,
    ) -> Path:
        """Every rank writes its shards; rank 0 commits and applies retention.

        ``extra`` must be JSON-serialisable (rank 0's copy is kept): counters, weight
        version, data-plane positions. Returns the committed directory.
        """
        if step < 0:
            raise ValueError("step must be non-negative")
        manifest = json.dumps(
            {
                "step": step,
                "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "saved_at": time.time(),
                "extra": extra or {},
            },
            indent=2,
        )  # serialised on every rank first: a bad ``extra`` fails everywhere, no hang
        staging, final = self._staging(step), self.path(step)
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            self._clean_stale()
            staging.mkdir()
        _barrier()
        with _single_process_quietly():
            dcp_save(self._state(model, optimizer), checkpoint_id=staging, no_dist=_no_dist())
        _barrier()
        if _rank() == 0:
            manifest_path = staging / MANIFEST
            with manifest_path.open("w") as out:
                out.write(manifest)
                out.flush()
                os.fsync(out.fileno())
            _fsync_dir(staging)
            _remove(final)  # a save of the same step again (e.g. after a resume)
            os.replace(staging, final)
            _fsync_dir(self.root)
            for old in self.steps()[: -self.keep]:
                _remove(self.path(old))
        _barrier()
        return final

    def load(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        step: int | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """Load checkpoint ``step`` (default: the latest) in place; returns (step, extra).

        Rank 0 picks the step and tells the others, so every rank loads the same one.
        """
        chosen = self.latest() if step is None else step
        if _distributed():
            box = [chosen]
            dist.broadcast_object_list(box, src=0)
            chosen = box[0]
        if chosen is None:
            raise FileNotFoundError(f"no complete checkpoint under {self.root}")
        path = self.path(chosen)
        if not (path / MANIFEST).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint")
        state = self._state(model, optimizer)
        with _single_process_quietly():
            dcp_load(state, checkpoint_id=path, no_dist=_no_dist())
        if optimizer is None:
            set_model_state_dict(model, state["model"])
        else:
            set_state_dict(
                model,
                optimizer,
                model_state_dict=state["model"],
                optim_state_dict=state["optimizer"],
            )
        manifest = json.loads((path / MANIFEST).read_text())
        return int(manifest["step"]), dict(manifest["extra"])

    @staticmethod
    def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        if optimizer is None:
            return {"model": get_model_state_dict(model)}
        model_state, optimizer_state = get_state_dict(model, optimizer)
        return {"model": model_state, "optimizer": optimizer_state}

    def _clean_stale(self) -> None:
        """Remove what crashed saves and deletions left (rank 0, before a save)."""
        for entry in self.root.iterdir():
            if entry.name.startswith(_HIDDEN_PREFIX + "step-") and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
