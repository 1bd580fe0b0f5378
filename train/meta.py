"""The meta-gradient of the labeled loss with respect to the pseudo labels (paper Eq. 5-11).

With the consistency loss L_u = mean_i ||p_i(θ) - ỹ_i||² evaluated at ỹ = p(θ), one SGD step on L_u
leaves θ unchanged, and differentiating the labeled loss through that step gives exactly

    ∇ỹ_i = (2α / B_u) · J_θ p(x_u,i; θ) · g,      g = ∇θ mean_k CE(f(x_l,k; θ), y_k),

a Jacobian-vector product. Three estimators of J·g:

- ``exact``: autograd through the unrolled SGD step (double backward); the slow reference.
- ``fd``: central finite difference of two forwards at θ ± εg with ε = eps/||g|| (paper Eq. 11).
- ``jvp``: forward-mode AD, which returns p(θ) and J·g from one pass.
- ``auto`` (the default): ``jvp`` under bf16/fp16 autocast, ``fd`` otherwise (`resolve_estimator`).

Under autocast the meta part runs in the low precision (fd's ±εg passes in fp32 unless told
otherwise); `full_precision=True` runs all of it, g included, in fp32 without TF32 instead, at the
fp32 rate, for a ∇ỹ too rough for bf16 (ResNet-18 at its initialisation; docs/PERF.md "Fidelity").

Every estimator leaves the model's parameters and buffers bit for bit as it found them: parameters
are never written (perturbed copies come from out-of-place foreach ops), and BatchNorm layers stop
tracking running statistics for the duration of the call (in train mode they still normalise with
batch statistics, exactly as before). The model is used in the mode it is in; in train mode the
passes over x_u replay one random state, so dropout masks and shake-shake gates agree between them.
"""
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, jvp
from torch.nn.modules.batchnorm import _BatchNorm

from mgssl.train.compiling import compiled as compile_with
from mgssl.train.estimators import ESTIMATORS, resolve_estimator
from mgssl.train.losses import fp32_or_wider


class PendingGrads(Protocol):
    """A reduction of g in flight (train.distributed.PendingMean): `wait()` gives the reduced g."""

    def wait(self) -> list[torch.Tensor]: ...


# Averages g across ranks: at once (a list) or started and waited for where g is first needed.
GradReducer = Callable[[list[torch.Tensor]], Union[list[torch.Tensor], PendingGrads]]


def _waited(grads: Union[list[torch.Tensor], PendingGrads]) -> list[torch.Tensor]:
    return grads if isinstance(grads, list) else grads.wait()


@dataclass
class MetaTargets:
    pseudo_labels: torch.Tensor  # ỹ = p(x_u; θ), (B_u, C), float32, no grad
    jg: torch.Tensor  # J_θ p(x_u; θ) · g, (B_u, C), float32, no grad
    grad_norm: torch.Tensor  # ||g||₂, scalar


# ---------------------------------------------------------------------------------------------
# Model state handling


@contextmanager
def _frozen_batchnorm_stats(model: nn.Module):
    """Train-mode BatchNorm without the in-place update of running statistics (and of
    num_batches_tracked): the normalisation itself is unchanged."""
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats and m.training]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


def _state(model: nn.Module):
    names, params = zip(*model.named_parameters())
    return list(names), list(params), dict(model.named_buffers())


def _call(model, names, params, buffers, x):
    return functional_call(model, ({**dict(zip(names, params)), **buffers},), (x,))


def _get_rng(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng(state, device: torch.device):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _rng_replayer(model: nn.Module, device: torch.device) -> Callable[[], None]:
    """A function that puts the RNG back where it is now, so that two passes see the same dropout
    masks and shake-shake gates. Without randomness (eval mode) it does nothing."""
    if not model.training:
        return lambda: None
    state = _get_rng(device)
    return lambda: _set_rng(state, device)


@contextmanager
def _full_precision(device: torch.device):
    """fp32 without TF32: the ±εg perturbation is below the resolution of bf16 and TF32 weights.

    Only the two TF32 switches change. torch.backends.cudnn.flags() would also put `benchmark` and
    `deterministic` back to its own defaults for the duration; and the legacy switches are used
    because they are what the rest of torch reads without complaint when a program sets TF32 by them
    (mixing them with the newer fp32_precision settings makes torch refuse to read either)."""
    cudnn_tf32, matmul_tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32


def _probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(fp32_or_wider(logits), dim=-1)


def _global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))


# ---------------------------------------------------------------------------------------------
# The labeled gradient g


def _labeled_loss(model, names, params, buffers, x_l, y_l):
    return F.cross_entropy(fp32_or_wider(_call(model, names, params, buffers, x_l)), y_l)


def labeled_grad(model, names, params, buffers, x_l, y_l, reduce_grad: Optional[GradReducer] = None,
                 compiled: bool = False, grad_scale: Optional[torch.Tensor] = None):
    """g = ∇θ mean CE on the labeled batch; `reduce_grad` averages it across ranks (what it returns
    is returned: a reduction started, not waited for, lets the caller compute what needs no g first).

    grad_scale: the loss scale of the run (GradScaler's, a device tensor), applied under fp16 autocast
    only: the labeled loss is scaled for its backward and g unscaled after, as the training loss is, so
    that the small gradients of the layers far from the loss do not flush to zero in fp16. Where the
    scaled backward overflows, g is taken as zero: that step's pseudo labels get no meta shift, as the
    scaler skips the step whose gradients overflow (and labeled_grad_norm logs 0).

    Under autocast g is taken in the run's precision. Its error there does not come from BatchNorm
    (autocast keeps it in fp32) nor from the loss (reduced in fp32): it comes from the ReLU and
    max-pool switches, which the bf16 rounding of weights and activations flips wherever a unit sits
    near its kink. Where ∇ỹ is dominated by the body of the network (ResNet-18 at its initialisation)
    that error is of the same size as rounding the weights alone, so only fp32 weights (an fp32 pass,
    `full_precision`) remove it; trained, the same network meets the bound in bf16 (docs/PERF.md,
    "Fidelity")."""
    scaled = grad_scale is not None and _autocast_dtype(x_l.device) == torch.float16
    with torch.enable_grad():
        loss = compile_with(_labeled_loss, compiled)(model, names, params, buffers, x_l, y_l)
        grads = torch.autograd.grad(loss * grad_scale if scaled else loss, params, allow_unused=True)
    grads = [torch.zeros_like(p) if gr is None else gr.detach() for p, gr in zip(params, grads)]
    if scaled:
        grads = _unscaled(grads, grad_scale)
    return reduce_grad(grads) if reduce_grad is not None else grads


def _unscaled(grads: list[torch.Tensor], scale: torch.Tensor) -> list[torch.Tensor]:
    """g / scale, or zeros where any entry overflowed; on the device, without reading anything back."""
    grads = torch._foreach_div(grads, scale)
    finite = torch.isfinite(_global_norm(grads))
    return [torch.where(finite, g, torch.zeros_like(g)) for g in grads]


# ---------------------------------------------------------------------------------------------
# The three estimators of J·g


def perturbed_parameters(params: list[torch.Tensor], g: list[torch.Tensor], step_size: torch.Tensor):
    """θ + εg and θ − εg for every tensor at once: three multi-tensor (foreach) kernels, whatever the
    number of parameters, and out of place, so the model's own parameters are never written."""
    step = torch._foreach_mul(g, step_size)
    return torch._foreach_add(params, step), torch._foreach_sub(params, step)


def batched_probs(model, names, param_sets, buffers, x):
    """p(x; θ_k) for several parameter sets in one vmapped call, shape (K, B, C).

    Convolutions then run once over K weight sets (as grouped convolutions) instead of K times.
    Only for passes without randomness (eval mode): vmap would draw dropout masks differently from
    the sequential passes."""
    stacked = [torch.stack(tensors) for tensors in zip(*param_sets)]

    def probs_at(flat_params):
        return _probs(_call(model, names, flat_params, buffers, x))

    return torch.vmap(probs_at, randomness="error")(stacked)


def _probs_at(model, names, params, buffers, x):
    return _probs(_call(model, names, params, buffers, x))


def _fd_passes(model, names, params, buffers, g, x, eps, midpoint, batched, replay, center=None):
    gnorm = _global_norm(g)
    # ε: the parameters move by `eps` in L2 norm (a zero g, an fp16 overflow's, moves them by nothing)
    step_size = eps / gnorm.clamp_min(torch.finfo(gnorm.dtype).tiny)
    plus, minus = perturbed_parameters(params, g, step_size)
    if batched and not model.training:
        sets = [plus, minus] if midpoint else [plus, minus, params]
        probs = batched_probs(model, names, sets, buffers, x)
        p_plus, p_minus = probs[0], probs[1]
        center = 0.5 * (p_plus + p_minus) if midpoint else probs[2]
    else:
        p_plus = _probs(_call(model, names, plus, buffers, x))
        replay()
        p_minus = _probs(_call(model, names, minus, buffers, x))
        if midpoint:
            center = 0.5 * (p_plus + p_minus)  # p(θ) + O(ε²): saves the forward at θ
        elif center is None:
            replay()
            center = _probs(_call(model, names, params, buffers, x))
    jg = (p_plus - p_minus) / (2 * step_size)
    return center, jg, gnorm


def _fd(model, names, params, buffers, g, x_u, eps, full_precision, midpoint, batched, compiled):
    precision = _full_precision(x_u.device) if full_precision else nullcontext()
    x = fp32_or_wider(x_u) if full_precision else x_u
    replay = _rng_replayer(model, x_u.device)
    with torch.no_grad(), precision:
        center = None
        if not midpoint and not (batched and not model.training):
            # p(θ) needs no g: it runs while g's all-reduce is in flight (the same masks as the ±εg passes)
            center = compile_with(_probs_at, compiled)(model, names, params, buffers, x)
            replay()
        return compile_with(_fd_passes, compiled)(model, names, params, buffers, _waited(g), x, eps, midpoint,
                                                     batched, replay, center)


def fd_passes(model: nn.Module, g: list[torch.Tensor], x_u: torch.Tensor, *, eps: float = 0.01,
              midpoint: bool = False, batched: bool = False):
    """fd's passes alone for a given g, in fp32 as training runs them: (ỹ, J·g, ||g||). For timing
    the separate calls against the batched one (tools.bench_fd)."""
    names, params, buffers = _state(model)
    with _frozen_batchnorm_stats(model):
        return _fd(model, names, params, buffers, g, x_u, eps, True, midpoint, batched, False)


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


@contextmanager
def _tangents_in_primal_dtype(model: nn.Module, dtype: torch.dtype):
    """Makes every BatchNorm output's tangent `dtype`, as its primal is.

    BatchNorm's forward-mode rule computes the tangent from the statistics the kernel saved, and
    CUDA's kernel saves them in fp32 even for bf16 inputs and weights, and both devices' kernels do
    for fp32 weights: in train mode the tangent then comes out fp32, and the next bf16 convolution
    refuses the pair ("Input type (float) and weight type (BFloat16) should be the same").
    `to(dtype, copy=True)` is a copy of the primal (already `dtype`) whose rule casts the tangent."""
    def cast(module, inputs, output):
        return output.to(dtype, copy=True)

    handles = [m.register_forward_hook(cast) for m in model.modules() if isinstance(m, _BatchNorm)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _batchnorm_tensor_names(model: nn.Module) -> set[str]:
    return {f"{prefix}.{name}" if prefix else name
            for prefix, m in model.named_modules() if isinstance(m, _BatchNorm)
            for name, _ in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]}


def _jvp_primals(model, names, params, buffers, device, compiled):
    """θ and the buffers as the jvp pass reads them, with what the pass needs to cast its tangents
    alike: (primals, buffers, low, cast_params, theta_norm). Needs no g, so it runs while g's
    all-reduce is in flight."""
    primals = [p.detach() for p in params]
    low = _autocast_dtype(device)
    if low is None:
        return primals, buffers, None, (), None
    # cast by hand as autocast would: autocast sees a dual tensor's primal only (docs/PERF.md "The jvp pass")
    keep_fp32 = _batchnorm_tensor_names(model)
    cast_params = tuple(n not in keep_fp32 for n in names)
    cast_buffers = tuple(n not in keep_fp32 for n in buffers)
    primals, buffers, theta_norm = compile_with(_low_precision_copies, compiled)(primals, buffers, low, cast_params,
                                                                                 cast_buffers)
    return primals, buffers, low, cast_params, theta_norm


def _cast_where(tensors: list[torch.Tensor], low: torch.dtype, cast: tuple) -> list[torch.Tensor]:
    return [t.to(low) if c and t.is_floating_point() else t for t, c in zip(tensors, cast)]


def _low_precision_copies(primals, buffers, low, cast_params, cast_buffers):
    theta_norm = _global_norm(primals) if low == torch.float16 else None  # ||θ||, for fp16's tangent scale
    return (_cast_where(primals, low, cast_params),
            dict(zip(buffers, _cast_where(list(buffers.values()), low, cast_buffers))), theta_norm)


def _jvp(model, names, primals, buffers, g, x_u, low, cast_params, theta_norm):
    tangents, gnorm = g, _global_norm(g)
    tangent_dtype, unscale = nullcontext(), None
    if low is not None:
        if low == torch.float16:
            # J·g is linear in g: a tangent of θ's length stays inside fp16's range (docs/PERF.md "The jvp pass")
            unscale = gnorm.clamp_min(torch.finfo(gnorm.dtype).tiny) / theta_norm
            tangents = torch._foreach_div(tangents, unscale)
        tangents = _cast_where(tangents, low, cast_params)
        tangent_dtype = _tangents_in_primal_dtype(model, low)

    def probs_of(flat_params):
        return _probs(_call(model, names, flat_params, buffers, x_u))

    with torch.no_grad(), tangent_dtype:
        center, jg = jvp(probs_of, (primals,), (tangents,))
    return center, (jg if unscale is None else jg * unscale), gnorm


def _exact(model, names, params, buffers, x_l, y_l, x_u, reduce_grad):
    """Autograd through the unrolled step θ̂ = θ - α∇θ L_u(θ, ỹ), then ∂G(θ̂)/∂ỹ (α factored out).

    The random state is replayed so that the labeled forward sees the masks of the other estimators'
    labeled pass and the unlabeled forward those of their unlabeled passes."""
    if reduce_grad is not None:
        raise ValueError("method 'exact' is a single-process reference; use 'fd' or 'jvp' with torchrun")
    leaves = [p.detach().requires_grad_() for p in params]
    replay_labeled = _rng_replayer(model, x_u.device)
    with torch.enable_grad():
        loss_at_theta = F.cross_entropy(fp32_or_wider(_call(model, names, leaves, buffers, x_l)), y_l)
        g = torch.autograd.grad(loss_at_theta, leaves, allow_unused=True)
        g = [torch.zeros_like(p) if gr is None else gr for p, gr in zip(leaves, g)]
        p_u = _probs(_call(model, names, leaves, buffers, x_u))
        after_unlabeled = _get_rng(x_u.device)
        pseudo = p_u.detach().clone().requires_grad_()
        cons = (p_u - pseudo).pow(2).sum(dim=1).mean()
        grads_u = torch.autograd.grad(cons, leaves, create_graph=True, allow_unused=True)
        # θ̂ = θ - 1·∇θ L_u: the learning rate α is applied by the caller, as for fd and jvp.
        theta_hat = [p if gu is None else p - gu for p, gu in zip(leaves, grads_u)]
        replay_labeled()
        loss_hat = F.cross_entropy(fp32_or_wider(_call(model, names, theta_hat, buffers, x_l)), y_l)
        (grad_pseudo,) = torch.autograd.grad(loss_hat, pseudo)
    if model.training:
        _set_rng(after_unlabeled, x_u.device)
    batch = x_u.shape[0]
    # grad_pseudo = (2/B_u)·J·g; return J·g so all estimators share one meaning.
    return p_u.detach(), grad_pseudo.detach() * (batch / 2), _global_norm([x.detach() for x in g])


# ---------------------------------------------------------------------------------------------
# Public API


def meta_targets(
    model: nn.Module,
    x_l: torch.Tensor,
    y_l: torch.Tensor,
    x_u: torch.Tensor,
    *,
    estimator: str = "auto",
    eps: float = 0.01,
    reduce_grad: Optional[GradReducer] = None,
    fd_full_precision: bool = True,
    fd_midpoint: bool = False,
    fd_batched: bool = False,
    compiled: Union[bool, str] = False,
    full_precision: bool = False,
    grad_scale: Optional[torch.Tensor] = None,
) -> MetaTargets:
    """ỹ = p(x_u; θ) and J_θ p(x_u; θ)·g, the two things one meta step needs.

    `model` must be the plain module (not a DistributedDataParallel wrapper): the passes here need
    no gradient synchronisation; `reduce_grad` all-reduces g instead.

    fd_batched: fd's eval-mode passes as one vmapped call (`batched_probs`); train mode ignores it.
    compiled: run the labeled forward, the fd passes or the jvp pass through torch.compile (a
    train.compile mode, or True for the default one).
    full_precision: the whole meta part (g and the passes over x_u) in fp32 without TF32, even under
    autocast; `auto` still resolves as the run's precision says (jvp under autocast).
    grad_scale: the run's loss scale under fp16 (see `labeled_grad`)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}")
    estimator = resolve_estimator(estimator, _autocast_dtype(x_u.device) is not None)
    if full_precision:
        with _full_precision(x_u.device):
            return meta_targets(model, fp32_or_wider(x_l), y_l, fp32_or_wider(x_u), estimator=estimator, eps=eps,
                                reduce_grad=reduce_grad, fd_full_precision=fd_full_precision,
                                fd_midpoint=fd_midpoint, fd_batched=fd_batched, compiled=compiled,
                                grad_scale=grad_scale)
    names, params, buffers = _state(model)
    with _frozen_batchnorm_stats(model):
        if estimator == "exact":
            center, jg, gnorm = _exact(model, names, params, buffers, x_l, y_l, x_u, reduce_grad)
        else:
            # g's all-reduce (where the reducer only starts it) runs while each estimator makes what needs no g
            g = labeled_grad(model, names, params, buffers, x_l, y_l, reduce_grad, compiled=compiled,
                             grad_scale=grad_scale)
            if estimator == "fd":
                center, jg, gnorm = _fd(model, names, params, buffers, g, x_u, eps, fd_full_precision, fd_midpoint,
                                         fd_batched, compiled)
            else:
                at = _jvp_primals(model, names, params, buffers, x_u.device, compiled)
                primals, low_buffers, low, cast_params, theta_norm = at
                center, jg, gnorm = compile_with(_jvp, compiled)(model, names, primals, low_buffers, _waited(g), x_u,
                                                                 low, cast_params, theta_norm)
    return MetaTargets(center, jg, gnorm)


def pseudo_label_grad(
    model: nn.Module,
    x_l: torch.Tensor,
    y_l: torch.Tensor,
    x_u: torch.Tensor,
    *,
    lr: float,
    method: str = "auto",
    eps: float = 0.01,
    **kwargs,
) -> torch.Tensor:
    """∇ỹ of the paper's Eq. 5: the gradient of the labeled loss after one SGD step of size `lr` on
    the consistency loss, with respect to the pseudo labels ỹ = p(x_u). Shape (B_u, num_classes)."""
    out = meta_targets(model, x_l, y_l, x_u, estimator=method, eps=eps, **kwargs)
    return (2.0 * lr / x_u.shape[0]) * out.jg
