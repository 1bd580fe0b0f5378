"""The pseudo labels of one step, in one place: ỹ = p(x_u; θ) and J·g from the meta-gradient
estimators (train/meta.py), the step ỹ − ŷ at the run's scale, and its projection back onto the simplex."""
import dataclasses
from typing import Optional, Union

import torch
import torch.nn as nn

from mgssl.train.config import MethodConfig
from mgssl.train.losses import fp32_or_wider
from mgssl.train.meta import GradReducer, meta_targets


def update_pseudo_labels(pseudo: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """ŷ = ỹ - delta, projected back onto the simplex the cheap way: relu, then renormalise.

    A row that the step pushes entirely to zero stays zero (it then carries no label signal)
    rather than dividing by zero."""
    shifted = torch.relu(pseudo - delta)  # (B, C)
    total = shifted.sum(dim=1, keepdim=True)
    return shifted / torch.where(total > 0, total, torch.ones_like(total))


def pseudo_label_step(jg: torch.Tensor, lr: float, method: MethodConfig, global_unlabeled_batch: int) -> torch.Tensor:
    """The change ỹ - ŷ before projection, from J·g.

    authors: lr · (p(θ+εg) - p(θ-εg)) / ε = lr · 2·J·g, with no α/B_u factor;
    literal: β · ∇ỹ with ∇ỹ = (2α/B_u)·J·g of Eq. 5 and β = α = lr."""
    if method.meta_scale == "authors":
        scale = 2.0 * lr
    else:
        scale = lr * 2.0 * lr / global_unlabeled_batch
    return (scale * method.meta_multiplier) * jg


def method_at(method: MethodConfig, step: int) -> MethodConfig:
    """The method of step `step`: within method.fp32_meta_steps, the meta part in fp32."""
    if step < method.fp32_meta_steps and method.meta_precision != "fp32":
        return dataclasses.replace(method, meta_precision="fp32")
    return method


def pseudo_labels(meta_net: nn.Module, x_l, y_l, x_u, *, method: MethodConfig, lr: float, autocast,
                  reduce_grad: Optional[GradReducer], world_size: int, fd_batched: bool = False,
                  compile_meta: Union[bool, str] = False,
                  scaler: Optional[torch.amp.GradScaler] = None) -> tuple[torch.Tensor, dict]:
    """ŷ for the unlabeled batch: the network's prediction ỹ, moved by the meta-gradient when
    method.meta (with meta off, ŷ = ỹ and everything else is unchanged). `scaler` (fp16): g's
    labeled loss is scaled by its current scale, read as a device tensor (no host sync)."""
    was_training = meta_net.training
    meta_net.train(method.meta_mode == "train")
    try:
        with autocast:
            if method.meta:
                grad_scale = scaler.scale(torch.ones((), device=x_l.device)) if scaler is not None else None
                out = meta_targets(meta_net, x_l, y_l, x_u, estimator=method.estimator, eps=method.eps,
                                   reduce_grad=reduce_grad, fd_full_precision=method.fd_full_precision,
                                   fd_midpoint=method.fd_midpoint, fd_batched=fd_batched,
                                   compiled=compile_meta, full_precision=method.meta_precision == "fp32",
                                   grad_scale=grad_scale)
                y_tilde = out.pseudo_labels
                y_hat = update_pseudo_labels(y_tilde, pseudo_label_step(out.jg, lr, method, x_u.shape[0] * world_size))
                stats = {"pseudo_label_shift": (y_hat - y_tilde).abs().sum(dim=1).mean(),
                         # A copy: under CUDA graphs the next replay overwrites the graph's outputs.
                         "labeled_grad_norm": out.grad_norm.float().clone()}
            else:
                with torch.no_grad():
                    y_hat = torch.softmax(fp32_or_wider(meta_net(x_u)), dim=1)
                stats = {}
    finally:
        meta_net.train(was_training)
    return y_hat.detach(), stats
