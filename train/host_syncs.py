"""Counting the places where the host would wait for the device, on any device.

On a GPU, `torch.cuda.set_sync_debug_mode` reports synchronising CUDA calls, but only on a GPU. This
counter sees the operations that force one wherever they run, so a CPU test can hold the training
step to zero:

- value reads: `aten._local_scalar_dense` / `aten.item` (`.item()`, `bool(t)`, `float(t)`, `if t:`);
- copies to the host: `.cpu()`, `.tolist()`, `.numpy()`, and device-to-CPU `aten._to_copy`/`copy_`;
- tensors made from Python values (`torch.tensor(...)`, `torch.as_tensor(...)`): on a GPU a
  host-to-device copy from pageable memory, which blocks the host.
"""
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default}
_COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}
_HOST_METHODS = {torch.Tensor.cpu: "cpu", torch.Tensor.tolist: "tolist", torch.Tensor.numpy: "numpy",
                 torch.Tensor.item: "item", torch.Tensor.__bool__: "bool", torch.Tensor.__float__: "float",
                 torch.Tensor.__int__: "int"}
_FROM_PYTHON = {torch.tensor: "torch.tensor", torch.as_tensor: "torch.as_tensor"}


def _on_device(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type not in ("cpu", "meta")


class _DispatchCounts(TorchDispatchMode):
    def __init__(self, counts: Counter):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _READS:
            self.counts[f"aten.{func.__name__.split('.')[0]}"] += 1
        elif func in _COPIES:
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            dst = out if isinstance(out, torch.Tensor) else args[0]
            if _on_device(src) and dst.device.type == "cpu":
                self.counts["device-to-host copy"] += 1
        return out


class _FunctionCounts(TorchFunctionMode):
    def __init__(self, counts: Counter):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _HOST_METHODS:
            self.counts[f"Tensor.{_HOST_METHODS[func]}"] += 1
        elif func in _FROM_PYTHON and not isinstance(args[0] if args else None, torch.Tensor):
            self.counts[_FROM_PYTHON[func]] += 1
        return func(*args, **kwargs)


class count_host_syncs:
    """Counts, by kind, every operation inside the block that makes (or on a GPU would make) the
    host wait for the device; `with count_host_syncs() as syncs:` then read `syncs` (a Counter).
    A `.item()` counts under both `Tensor.item` and `aten._local_scalar_dense`."""

    def __init__(self):
        self.counts: Counter = Counter()
        self._modes = (_FunctionCounts(self.counts), _DispatchCounts(self.counts))

    def __enter__(self) -> Counter:
        for mode in self._modes:
            mode.__enter__()
        return self.counts

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
