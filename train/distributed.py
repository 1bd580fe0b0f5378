"""Process-group set-up for torchrun (NCCL on GPUs, gloo on CPUs) and the few collectives used."""
import os
import time
import uuid
from datetime import timedelta
from dataclasses import dataclass

from typing import Optional

import torch
import torch.distributed as dist


class DeviceError(RuntimeError):
    pass


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise DeviceError("train.device=cuda but no CUDA device is visible; use --set train.device=cpu")
        if local_rank >= torch.cuda.device_count():
            raise DeviceError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                              "start at most that many processes per node (torchrun --nproc_per_node)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def env_int(name: str, default: int) -> int:
    """A whole number from the environment torchrun sets, or one line naming the variable."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise DeviceError(f"{name}={text!r} in the environment is not a whole number; unset it, or start the "
                          "processes with torchrun, which sets it") from None
    if value < 0:
        raise DeviceError(f"{name}={value} in the environment is negative; unset it, or start with torchrun")
    return value


def env_ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the environment, refused where they do not fit together:
    a stale RANK=1 in a lone process would train without writing anything."""
    world = max(env_int("WORLD_SIZE", 1), 1)
    rank, local_rank = env_int("RANK", 0), env_int("LOCAL_RANK", 0)
    if rank >= world:
        raise DeviceError(f"RANK={rank} does not fit WORLD_SIZE={world} (ranks run from 0 to {world - 1}); a single "
                          "process needs no RANK: unset RANK (and LOCAL_RANK), or start the processes with torchrun")
    return rank, world, local_rank


def setup(device_choice: str) -> Dist:
    """Reads torchrun's environment; a plain `python -m mgssl.train` is one process."""
    rank, world, local_rank = env_ranks()
    device = pick_device(device_choice, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = _store_of_this_attempt(rank, world)
        if store is None:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world)
    return Dist(rank, world, local_rank, device)


def _store_of_this_attempt(rank: int, world: int):
    """A fresh key space for the process group of each torchrun attempt, or None for the default.

    torchrun's agents keep one store for all attempts of a run (unless the launchers have
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1); a restarted worker would read there the addresses that
    the dead attempt's workers published and fail to connect. The restart count cannot name the
    attempt: it differs between nodes. The workers agree on a fresh name instead."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=PG_TIMEOUT)
    return dist.PrefixStore(f"mgssl/{agree_on_attempt(store, rank, world)}", store)


PG_TIMEOUT = timedelta(minutes=30)


def agree_on_attempt(store, rank: int, world: int, timeout: timedelta = PG_TIMEOUT,
                     retry: timedelta = timedelta(seconds=2)) -> str:
    """A name that every worker of this attempt returns and no worker of an earlier one used.

    Rank 0 draws the name and posts it; every other rank answers under that name with a token of its
    own and waits for rank 0 to confirm that token. A rank that read the name of a dead attempt
    (rank 0 had not posted yet) never gets its confirmation, so it reads the name again."""
    if rank == 0:
        name = uuid.uuid4().hex
        store.set("mgssl/attempt", name)
        joins = [f"mgssl/{name}/join/{r}" for r in range(1, world)]
        if joins:
            store.wait(joins, timeout)
        for key in joins:
            store.set(f"mgssl/{name}/go/{store.get(key).decode()}", "1")
        return name
    token, deadline = uuid.uuid4().hex, time.monotonic() + timeout.total_seconds()
    while True:
        store.wait(["mgssl/attempt"], timeout)
        name = store.get("mgssl/attempt").decode()
        store.set(f"mgssl/{name}/join/{rank}", token)
        try:
            store.wait([f"mgssl/{name}/go/{token}"], retry)
            return name
        except RuntimeError:  # DistStoreError on time-out: the name may be stale, read it again
            if time.monotonic() > deadline:
                raise


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class PendingMean:
    """An all-reduce mean in flight (`start_average_grads`); `wait()` returns the averaged tensors.

    On GPUs the wait makes the current stream wait for the collective, not the host."""

    def __init__(self, work, wire: torch.Tensor, dtype: torch.dtype, shapes: list[torch.Size], world_size: int):
        self.work, self.wire, self.dtype, self.shapes, self.world_size = work, wire, dtype, shapes, world_size

    def wait(self) -> list[torch.Tensor]:
        self.work.wait()
        flat = self.wire.to(self.dtype) if self.wire.dtype != self.dtype else self.wire
        flat /= self.world_size
        out, offset = [], 0
        for shape in self.shapes:
            numel = shape.numel()
            out.append(flat[offset:offset + numel].view(shape))
            offset += numel
        return out


def start_average_grads(grads: list[torch.Tensor], world_size: int,
                        dtype: Optional[torch.dtype] = None) -> PendingMean:
    """All-reduce mean of a list of tensors as one flat buffer (one collective, not one per tensor),
    started and not waited for: the caller computes what does not need the mean, then waits. With
    `dtype` (bf16) the buffer travels in that type, half the bytes of fp32, and comes back in the
    tensors' own type."""
    flat = torch.cat([g.reshape(-1) for g in grads])
    wire = flat if dtype is None else flat.to(dtype)
    work = dist.all_reduce(wire, async_op=True)
    return PendingMean(work, wire, flat.dtype, [g.shape for g in grads], world_size)


def average_grads(grads: list[torch.Tensor], world_size: int, dtype: Optional[torch.dtype] = None) -> list[torch.Tensor]:
    """`start_average_grads`, waited for."""
    return start_average_grads(grads, world_size, dtype).wait()


def sum_tensor(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        t = t.clone()
        dist.all_reduce(t)
    return t


def gather_objects(obj, d: Dist) -> list:
    if not d.enabled:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, d: Dist) -> bool:
    """True on every rank if it is true on any rank: lets all ranks stop together."""
    if not d.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_buffers(net: torch.nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s buffers (BatchNorm statistics) to every rank."""
    for buf in net.buffers():
        dist.broadcast(buf, src)
