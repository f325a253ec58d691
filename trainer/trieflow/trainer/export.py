"""Export the trained policy as a Hugging Face checkpoint that vLLM and transformers load.

Every rank takes part (the full state dict is gathered tensor by tensor, onto rank 0's CPU);
rank 0 writes ``config.json``, ``generation_config.json``, the weights as safetensors
(``model.safetensors``, or numbered shards plus ``model.safetensors.index.json`` past
``max_shard_bytes``) and the tokenizer files, into a hidden sibling of ``dest``. Only a
complete export takes ``dest``'s place: an atomic directory exchange where the kernel
offers it (Linux ``renameat2``), otherwise two renames. A reader of ``dest`` therefore
sees the previous export or the new one, never a mix, and the previous export stays
valid until the new one is complete.

Tied weights are written as Hugging Face writes them: the tied copy (``lm_head.weight``
of small Qwen2 models) is left out and the config's ``tie_word_embeddings`` restores it.

:func:`hf_tensors` is the one definition of what a weight version holds (names, tied
copies left out, dtype cast): the export writes it, and the NCCL weight sync streams it to
vLLM, so both paths publish exactly the same tensors under the same names.
"""

from __future__ import annotations

import copy
import ctypes
import errno
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.fsdp import FSDPModule

from trieflow.trainer.weight_transfer import TensorMeta, dtype_name, full_tensors

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 << 30
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
)
TOKENIZER_GLOBS = ("chat_template*",)
TOKENIZER_DIRS = ("additional_chat_templates",)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def hf_class(model: torch.nn.Module) -> type:
    """The model's own class (FSDP2 swaps in a subclass named ``FSDP<Name>``)."""
    for cls in type(model).__mro__:
        if not issubclass(cls, FSDPModule):
            return cls
    raise TypeError(f"no model class behind {type(model).__name__}")


def tied_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys that Hugging Face derives from another key (tied weights)."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if tied is None:  # older transformers: declared keys, tied only if the config says so
        declared = getattr(model, "_tied_weights_keys", None) or ()
        config = getattr(model, "config", None)
        tied = declared if getattr(config, "tie_word_embeddings", False) else ()
    return set(tied)


def _hf_state(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(HF name, tensor as held)``: the state dict (DTensor shards under FSDP2) minus the
    tied copies Hugging Face derives from another key."""
    tied = tied_keys(model)
    for name, value in model.state_dict().items():
        if isinstance(value, torch.Tensor) and name not in tied:
            yield name, value


def _written_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """``dtype`` casts floating-point tensors only (integer buffers keep theirs)."""
    return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype


def hf_tensors(
    model: torch.nn.Module, *, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(HF checkpoint name, full tensor)`` of every weight, in state-dict order, on the
    device the model is on. Collective under FSDP (each DTensor is all-gathered when
    reached): every rank must iterate all of it, in step, even if only rank 0 uses it.
    The state dict holds detached tensors, so nothing is recorded for autograd (and no
    grad-mode context is held open across the yields, where it would leak to the caller)."""
    for name, tensor in full_tensors(_hf_state(model)):
        yield name, tensor.detach().to(_written_dtype(tensor, dtype)).contiguous()


def hf_tensor_metas(
    model: torch.nn.Module, *, dtype: torch.dtype | None = None
) -> list[TensorMeta]:
    """What :func:`hf_tensors` will yield (names, dtypes, full shapes), read from the
    local shards without gathering anything (not a collective)."""
    return [
        TensorMeta(name, dtype_name(_written_dtype(t, dtype)), tuple(int(d) for d in t.shape))
        for name, t in _hf_state(model)
    ]


def _shards(
    tensors: dict[str, torch.Tensor], max_shard_bytes: int
) -> list[dict[str, torch.Tensor]]:
    """Consecutive (name-ordered) groups of at most ``max_shard_bytes`` (one tensor may exceed)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        tensor = tensors[name]
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def _write_weights(
    tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int
) -> list[Path]:
    shards = _shards(tensors, max_shard_bytes)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(folder / WEIGHTS_NAME), metadata=metadata)
        return [folder / WEIGHTS_NAME]
    files, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata=metadata)
        files.append(folder / name)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
    return [*files, folder / WEIGHTS_INDEX_NAME]


def _write_config(model: torch.nn.Module, folder: Path, dtype: torch.dtype) -> None:
    config: Any = copy.deepcopy(model.config)
    config.architectures = [hf_class(model).__name__]
    config.dtype = dtype
    config.use_cache = True  # the trainer turns the KV cache off; inference wants it
    config.save_pretrained(folder)
    generation: Any = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", lambda: False)
    if generation is not None and can_generate():
        generation.save_pretrained(folder)


def _copy_tokenizer(source: Path, folder: Path) -> None:
    if not source.is_dir():
        raise FileNotFoundError(f"tokenizer folder {source} does not exist")
    names = {p.name for p in source.iterdir() if p.is_file() and p.name in TOKENIZER_FILES}
    for pattern in TOKENIZER_GLOBS:
        names.update(p.name for p in source.glob(pattern) if p.is_file())
    if not names:
        raise FileNotFoundError(f"no tokenizer files in {source}")
    for name in sorted(names):
        shutil.copy2(source / name, folder / name)
    for name in TOKENIZER_DIRS:
        if (source / name).is_dir():
            shutil.copytree(source / name, folder / name)


def _fsync_tree(folder: Path) -> None:
    for path in [*folder.rglob("*"), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    code = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if code == 0:
        return True
    err = ctypes.get_errno()
    if err in {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}:
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace_dir(staging: Path, dest: Path) -> None:
    """Put the complete ``staging`` at ``dest``; the old ``dest`` is removed afterwards."""
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise FileExistsError(f"{dest} exists and is not a directory")
    if not dest.exists():
        os.replace(staging, dest)
        return
    if _exchange(staging, dest):
        shutil.rmtree(staging)  # now the previous export
        return
    previous = dest.with_name(f".{dest.name}.previous-{time.time_ns()}")
    os.replace(dest, previous)
    os.replace(staging, dest)
    shutil.rmtree(previous, ignore_errors=True)


def export_hf(
    model: torch.nn.Module,
    dest: Path,
    *,
    tokenizer_dir: Path | None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write ``model`` (sharded or not) as a Hugging Face folder at ``dest``; collective.

    ``dtype`` casts floating-point weights (default: as trained); the config records the
    dtype written. ``tokenizer_dir`` (usually the base model's folder) supplies the
    tokenizer files. Every rank returns once ``dest`` holds the complete export.
    """
    dest = Path(dest)
    main = _rank() == 0
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in hf_tensors(model, dtype=dtype):  # every rank: the gathers
        if main:
            tensors[name] = tensor.cpu()
    if main:
        try:
            _write_export(model, tensors, dest, tokenizer_dir, dtype, max_shard_bytes)
        except BaseException as exc:
            _share_outcome(f"{type(exc).__name__}: {exc}")
            raise
    failure = _share_outcome(None)
    if failure is not None:
        raise RuntimeError(f"rank 0 failed to export {dest}: {failure}")
    return dest


def _share_outcome(failure: str | None) -> str | None:
    """Rank 0 tells every rank whether the export is complete (one broadcast)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return failure
    box = [failure]
    dist.broadcast_object_list(box, src=0)
    return box[0] if _rank() != 0 else None


def _write_export(  # noqa: PLR0917 (private; export_hf names the arguments)
    model: torch.nn.Module,
    tensors: dict[str, torch.Tensor],
    dest: Path,
    tokenizer_dir: Path | None,
    dtype: torch.dtype | None,
    max_shard_bytes: int,
) -> None:
    """Rank 0 writes ``tensors`` (from :func:`hf_tensors`, on the CPU) as the export."""
    floating = [t.dtype for t in tensors.values() if t.is_floating_point()]
    written = dtype or (floating[0] if floating else torch.float32)
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in dest.parent.glob(f".{dest.name}.*"):  # left by crashed exports
        shutil.rmtree(stale, ignore_errors=True)
    staging = dest.with_name(f".{dest.name}.staging-{time.time_ns()}")
    staging.mkdir()
    try:
        _write_weights(tensors, staging, max_shard_bytes)
        _write_config(model, staging, written)
        if tokenizer_dir is not None:
            _copy_tokenizer(Path(tokenizer_dir), staging)
        _fsync_tree(staging)
        _replace_dir(staging, dest)
        _fsync_dir(dest.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
