"""Checkpoint files: atomic writes and safe loading (densessl.eval.backbone builds backbones from them).

A checkpoint holds everything needed to continue exactly: model (online, target, heads),
optimiser, grad scaler, online probe, step, RNG state and the resolved config. The data order
and the augmentation parameters are functions of (seed, epoch, index, step), so the step
alone positions the data stream. Files are read with torch.load(weights_only=True): a
foreign file can never run code.
"""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

import torch

from densessl.common.errors import CheckpointError

FORMAT = "densessl-checkpoint-v1"
SAFETENSORS_FORMAT = "densessl-backbone-v1"  # the metadata `format` of densessl's safetensors backbone export

# the temporary a save writes before its rename: .<name>.tmp<pid>
TMP_MARK = ".tmp"


def save_atomic(obj, path: str | Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`.

    A kill at any moment leaves `path` as it was (at worst a partial temporary, which
    `remove_partial_writes` clears); a failed write removes its temporary and, when the device is
    full or unwritable, raises a CheckpointError that names `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        cause = _os_error(e) if isinstance(e, Exception) else None
        if cause is None:
            raise
        kept = f"; {path} was left as it was" if path.exists() else ""
        if cause.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(f"cannot write checkpoint {path}: the device is full ({cause.strerror}){kept}; "
                                  f"free space and rerun the same command to resume") from e
        raise CheckpointError(f"cannot write checkpoint {path}: {cause.strerror or cause}{kept}") from e
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind `e`, if any: a full disk inside torch.save surfaces as torch's
    RuntimeError ("unexpected pos ...") raised while handling the OSError of the write."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno is not None:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def remove_partial_writes(folder: str | Path) -> list[Path]:
    """Delete the temporaries of saves that never finished (a process killed mid-write)."""
    folder = Path(folder)
    stale = sorted(folder.glob(f".*{TMP_MARK}*")) if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e)[:300]}") from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a densessl checkpoint (missing format={FORMAT!r}); "
                              "official checkpoints of other codebases are read by the importers")
    return obj


def backbone_state(method_state: dict) -> dict:
    """The online backbone's weights, with torchvision key names."""
    prefix = "backbone."
    return {k[len(prefix):]: v for k, v in method_state.items() if k.startswith(prefix)}

