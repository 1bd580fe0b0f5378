"""The backend switches of torch that change how (not what) a run computes, set in one place for the
trainer and the benchmark, from train.cudnn_benchmark, train.deterministic and train.tf32.

- cudnn_benchmark: cuDNN times its convolution algorithms on the first call of each shape and keeps
  the fastest. Off under `deterministic`, where the choice itself could differ between processes.
- deterministic: torch.use_deterministic_algorithms (an op without a deterministic kernel is an
  error, not a silent difference), cuDNN's deterministic algorithms, and CUBLAS_WORKSPACE_CONFIG,
  which cuBLAS needs for reproducible matmuls and reads when the process first uses it. With it, a
  resumed GPU run ends with the weights of an uninterrupted one, bit for bit.
- tf32: fp32 matmuls and convolutions on TensorFloat-32 tensor cores (about 7x the fp32 rate on an
  H100, 10 mantissa bits instead of 23). Only fp32 math is affected: under bf16/fp16 autocast most
  ops already run in the low precision.

The legacy `allow_tf32` switches are used, as everywhere in this project: torch refuses to mix
them with the newer `fp32_precision` settings."""
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterator

import torch

# The workspace setting torch's reproducibility notes give for deterministic cuBLAS.
CUBLAS_DETERMINISTIC = ":4096:8"


@dataclass(frozen=True)
class BackendFlags:
    cudnn_benchmark: bool = True
    deterministic: bool = False
    tf32: bool = True

    @classmethod
    def of(cls, train) -> "BackendFlags":
        """The flags a TrainConfig asks for."""
        return cls(train.cudnn_benchmark, train.deterministic, train.tf32)


def current_flags() -> dict:
    """The switches as torch holds them now (what a run records in runs.jsonl)."""
    return {"cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}


def apply(flags: BackendFlags) -> dict:
    """Set the switches for the rest of the process; returns `current_flags()` afterwards."""
    if flags.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
    torch.use_deterministic_algorithms(flags.deterministic)
    torch.backends.cudnn.deterministic = flags.deterministic
    torch.backends.cudnn.benchmark = flags.cudnn_benchmark and not flags.deterministic
    torch.backends.cudnn.allow_tf32 = flags.tf32
    torch.backends.cuda.matmul.allow_tf32 = flags.tf32
    return {**current_flags(), "requested": asdict(flags)}


@contextmanager
def backend_flags(flags: BackendFlags) -> Iterator[dict]:
    """`apply(flags)` for the duration of the block, then everything as it was (so that runs made
    one after another in one process, as the tests do, do not inherit each other's switches)."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    try:
        yield apply(flags)
    finally:
        benchmark, deterministic, algorithms, warn_only, cudnn_tf32, matmul_tf32, workspace = saved
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = benchmark, deterministic
        torch.use_deterministic_algorithms(algorithms, warn_only=warn_only)
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn_tf32, matmul_tf32
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = workspace
