"""One training step: the four rows of the paper's Table 4 as switches (meta × mixup), plus the
labeled-only baseline. Algorithm 2 is meta + mixup.

The step returns device tensors and never reads them back: the caller decides when to sync."""
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from mgssl.train.compiling import begin_step
from mgssl.train.config import MethodConfig
from mgssl.train.losses import consistency_mse, fp32_or_wider, mixup_pairs, one_hot, soft_target_kl
from mgssl.train.meta import GradReducer
from mgssl.train.pseudo_labels import pseudo_labels


class SeparateForwards(nn.Module):
    """Calls the network once per input and returns all outputs: each batch keeps its own BatchNorm
    statistics (as the authors' code), while DistributedDataParallel sees one forward per backward."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, *inputs):
        return tuple(self.net(x) for x in inputs)


def autocast_for(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def mixup_ratios(gamma: float, batch: int, device: torch.device) -> torch.Tensor:
    """λ ~ Beta(γ, γ) per pair, (B,) float32, drawn on the device without reading anything back.

    The same draws as torch.distributions.Beta(γ, γ).sample((B,)), which samples a two-class
    Dirichlet and keeps its first coordinate; its argument checks read tensors back to the host."""
    concentration = torch.full((batch, 2), gamma, device=device)
    return torch._sample_dirichlet(concentration)[:, 0]


@dataclass(frozen=True)
class StepParts:
    """What every step of a run works with, fixed for the run (engine.build_training builds it once).

    forwards: SeparateForwards around the network (wrapped in DDP under torchrun), in train mode.
    meta_net: the plain network, for the meta part (no gradient synchronisation needed there).
    fd_batched: run fd's eval-mode passes as one vmapped call (see train.meta.batched_probs); off by
    default because on the CPU the grouped convolutions it makes are slower (docs/PERF.md).
    compile_meta: torch.compile the meta part's passes in this train.compile mode (pass it with
    `forwards` compiled in the same mode: under CUDA graphs the step marks its beginning for both)."""
    forwards: nn.Module
    meta_net: nn.Module
    optimizer: torch.optim.Optimizer
    num_classes: int
    precision: str = "fp32"
    scaler: Optional[torch.amp.GradScaler] = None
    reduce_grad: Optional[GradReducer] = None
    world_size: int = 1
    before_backward: Optional[Callable[[torch.Tensor], None]] = None
    fd_batched: bool = False
    compile_meta: Union[bool, str] = False

    @classmethod
    def of(cls, net: nn.Module, optimizer: torch.optim.Optimizer, num_classes: int, **options) -> "StepParts":
        """The parts of a single process training `net` uncompiled."""
        return cls(SeparateForwards(net), net, optimizer, num_classes, **options)


def train_step(parts: StepParts, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], *, method: MethodConfig,
               lr: float, consistency_weight: float) -> dict[str, torch.Tensor]:
    """One step of SGD on labeled batch (x_l, y_l) and unlabeled batch x_u, at this step's method (a
    schedule may switch the meta part's precision), learning rate and consistency weight.
    Returns detached scalar tensors for logging."""
    x_l, y_l, x_u = batch
    device = x_l.device
    autocast = autocast_for(device, parts.precision)
    stats: dict[str, torch.Tensor] = {}
    begin_step(parts.compile_meta, device)

    if method.unlabeled:
        y_hat, stats = pseudo_labels(parts.meta_net, x_l, y_l, x_u, method=method, lr=lr, autocast=autocast,
                                     reduce_grad=parts.reduce_grad, world_size=parts.world_size,
                                     fd_batched=parts.fd_batched, compile_meta=parts.compile_meta,
                                     scaler=parts.scaler)

    with autocast:
        # with weight 0 (the authors' mixup-only baseline) x_u's forward would still move BatchNorm's statistics
        with_consistency = method.unlabeled and method.consistency_weight != 0
        if not method.unlabeled or not method.mixup:
            logits_l, *logits_u = parts.forwards(x_l, x_u) if with_consistency else parts.forwards(x_l)
            loss_cls = F.cross_entropy(fp32_or_wider(logits_l), y_l)
        else:
            lam = mixup_ratios(method.mixup_gamma, x_l.shape[0], device)  # (B,)
            onehot = one_hot(y_l, parts.num_classes, y_hat.dtype)
            x_in, y_in = mixup_pairs(x_l, onehot, x_u, y_hat, lam)
            logits_in, *logits_u = parts.forwards(x_in, x_u) if with_consistency else parts.forwards(x_in)
            loss_cls = soft_target_kl(logits_in, y_in)
        loss = loss_cls
        if with_consistency:
            loss_cons = consistency_mse(logits_u[0], y_hat)
            stats["loss_consistency"] = loss_cons.detach()
            loss = loss_cls + consistency_weight * loss_cons

    if parts.before_backward is not None:
        parts.before_backward(loss)
    optimizer, scaler = parts.optimizer, parts.scaler
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    stats["loss"] = loss.detach()
    stats["loss_classification"] = loss_cls.detach()
    return stats
