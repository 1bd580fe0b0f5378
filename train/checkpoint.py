"""Checkpoints that are never half-written and load with torch.load(weights_only=True)."""
import errno
import hashlib
import io
import os
from pathlib import Path
from typing import Optional

import torch

LAST = "last.pt"


class CheckpointError(RuntimeError):
    pass


def save_atomic(state: dict, path: Path) -> None:
    """Serialise in memory, write a temporary file beside `path`, fsync, then rename over it: a crash,
    a kill or a full disk at any moment leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        _write_file(tmp, buffer.getbuffer())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(f"no space left on the disk of {path.parent} while writing a checkpoint of "
                                  f"{buffer.getbuffer().nbytes / 2**20:.0f} MiB; the previous {path.name} is intact. "
                                  "Free space, then rerun the same command with --resume") from e
        raise CheckpointError(f"could not write {path} ({e}); the previous {path.name} is intact") from e


def _write_file(path: Path, data) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a power cut after it must not bring back the old name)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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


def tensors_of(*states):
    """Every tensor inside nested dicts and lists (a model and an optimiser state, say)."""
    for state in states:
        if isinstance(state, torch.Tensor):
            yield state
        elif isinstance(state, dict):
            yield from tensors_of(*state.values())
        elif isinstance(state, (list, tuple)):
            yield from tensors_of(*state)


def fingerprint(state_dict: dict) -> str:
    """SHA-256 of the names, dtypes, shapes and bytes of a state dict: equal iff bit-identical."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state_dict.items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def last_checkpoint(run_dir: Path) -> Optional[Path]:
    path = Path(run_dir) / "checkpoints" / LAST
    return path if path.is_file() else None
