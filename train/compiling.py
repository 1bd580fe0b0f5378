"""train.compile: which parts of the step go through torch.compile, and in which mode.

- off: eager.
- default: the network's train-mode forwards and the meta part's passes (labeled gradient, fd
  passes, jvp pass) compiled by inductor: fused kernels, the same launches per step.
- reduce-overhead: the same, each compiled graph also captured as a CUDA graph and replayed: one
  launch per graph instead of one per kernel, which matters for small networks at batch 128 (a
  meta+mixup step is six forwards and three backwards). Shapes must stay static, as they do in
  training (the last partial batch never reaches the step). On the CPU it is the same as default.
- max-autotune: reduce-overhead plus inductor's search over kernel configurations (long compiles).

Outputs of a CUDA graph live in memory its next replay overwrites: the step marks where each step
begins, and what it keeps past the step it copies."""
from typing import Callable, Union

import torch

COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def compile_mode(value: Union[bool, str]) -> str:
    """A train.compile value as a mode name (true and false, as older configs say, are default and off)."""
    if isinstance(value, bool):
        return "default" if value else "off"
    if value not in COMPILE_MODES:
        raise ValueError(f"train.compile={value!r}: choose one of {', '.join(COMPILE_MODES)}")
    return value


def compiled(fn: Callable, mode: Union[bool, str]) -> Callable:
    """`fn` (a function or a module) through torch.compile in `mode`, or `fn` itself when off.

    torch.compile caches its graphs on the function's code object: wrapping again each step reuses
    them and recompiles only when the guards (shapes, dtypes, modes) change."""
    mode = compile_mode(mode)
    if mode == "off":
        return fn
    return torch.compile(fn, mode=None if mode == "default" else mode)


def begin_step(mode: Union[bool, str], device: torch.device) -> None:
    """Tell the CUDA graphs that a new step begins: the previous step's graph outputs may be reused."""
    if device.type == "cuda" and compile_mode(mode) in CUDA_GRAPH_MODES:
        torch.compiler.cudagraph_mark_step_begin()
