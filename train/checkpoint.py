"""Checkpoints that are never half-written and load with torch.load(weights_only=True)."""
import errno
import os
from pathlib import Path
from typing import Optional

import torch

LAST = "last.pt"


class CheckpointError(RuntimeError):
    pass


def save_atomic(state: dict, path: Path) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it: a crash or a full disk
    leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise CheckpointError(f"no space left on the disk of {path.parent} while writing a checkpoint; "
                                  f"the previous {path.name} is intact. Free space, then rerun with --resume") from e
        raise CheckpointError(f"could not write {path} ({e}); the previous {path.name} is intact") from e


def load(path: Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} could not be read ({e}); it is not an mgssl checkpoint or is damaged") from e


def all_finite(tensors) -> bool:
    """True if every floating tensor is free of NaN and inf (one sync for all of them)."""
    flags = [torch.isfinite(t).all() for t in tensors if torch.is_floating_point(t)]
    return bool(torch.stack(flags).all()) if flags else True


def last_checkpoint(run_dir: Path) -> Optional[Path]:
    path = Path(run_dir) / "checkpoints" / LAST
    return path if path.is_file() else None
