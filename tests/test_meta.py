"""The meta-gradient estimators: agreement, no side effects, shared dropout masks, precision."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mgssl.model import build_model
from mgssl.train.meta import meta_targets, pseudo_label_grad


def smooth_net(classes=5, dropout=0.0):
    """BatchNorm, dropout and only smooth functions, so finite differences converge as O(ε²)."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.Tanh(), nn.Dropout2d(dropout),
        nn.AvgPool2d(2), nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Softplus(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))


def batches(dtype=torch.float64, seed=0, n_l=10, n_u=7, classes=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n_l, 1, 8, 8, generator=g, dtype=dtype), torch.randint(0, classes, (n_l,), generator=g),
            torch.randn(n_u, 1, 8, 8, generator=g, dtype=dtype))


def grad_with(model, method, batch, seed=1, **kw):
    torch.manual_seed(seed)  # every estimator starts from the same random state (dropout masks)
    return pseudo_label_grad(model, *batch, lr=0.1, method=method, **kw)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("training", [True, False], ids=["train-mode", "eval-mode"])
def test_exact_and_jvp_agree_to_rounding_and_fd_to_second_order(training):
    torch.manual_seed(0)
    model = smooth_net().double().train(training)
    batch = batches()
    exact = grad_with(model, "exact", batch)
    jvp = grad_with(model, "jvp", batch)
    assert exact.shape == (7, 5)
    assert exact.norm() > 1e-6  # a non-trivial meta-gradient
    assert rel_err(jvp, exact) < 1e-10
    errors = [rel_err(grad_with(model, "fd", batch, eps=eps), exact) for eps in (0.04, 0.02, 0.01)]
    assert errors[-1] < 1e-3
    # O(ε²): halving ε divides the error by about four.
    for coarse, fine in zip(errors, errors[1:]):
        assert 3.0 < coarse / fine < 5.0, errors


@pytest.mark.parametrize("name", ["digits_cnn", "convlarge"])
def test_estimators_agree_on_the_papers_building_blocks(name):
    """Leaky ReLU, max-pool, channel dropout and BatchNorm in train mode, in float64: exact and jvp
    agree to rounding (same dropout masks), fd to within its finite-difference error."""
    torch.manual_seed(0)
    model = build_model(name, 5, 1 if name == "digits_cnn" else 3).double().train()
    size, ch = (8, 1) if name == "digits_cnn" else (32, 3)
    g = torch.Generator().manual_seed(3)
    batch = (torch.randn(6, ch, size, size, generator=g, dtype=torch.float64), torch.randint(0, 5, (6,), generator=g),
             torch.randn(4, ch, size, size, generator=g, dtype=torch.float64))
    exact = grad_with(model, "exact", batch)
    assert rel_err(grad_with(model, "jvp", batch), exact) < 1e-9
    assert rel_err(grad_with(model, "fd", batch), exact) < 0.05


@pytest.mark.parametrize("method", ["exact", "jvp", "fd"])
@pytest.mark.parametrize("training", [True, False], ids=["train-mode", "eval-mode"])
def test_the_call_leaves_the_model_bit_for_bit_unchanged(method, training):
    torch.manual_seed(0)
    model = build_model("digits_cnn", 5, 1).double().train(training)
    model(torch.randn(4, 1, 8, 8, dtype=torch.float64))  # non-trivial running statistics
    before = copy.deepcopy(model.state_dict())
    grads_before = [p.grad for p in model.parameters()]
    grad_with(model, method, batches())
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert model.training == training
    assert [p.grad for p in model.parameters()] == grads_before  # no .grad written either


def test_fd_passes_see_the_same_dropout_masks():
    torch.manual_seed(0)
    model = smooth_net(dropout=0.5).double().train()
    dropout = model[3]
    masks = []
    hook = dropout.register_forward_hook(lambda m, inp, out: masks.append((out == 0).clone()))
    try:
        grad_with(model, "fd", batches())
    finally:
        hook.remove()
    # the labeled pass for g, then the +, - and centre passes over the unlabeled batch
    assert len(masks) == 4
    plus, minus, center = masks[1], masks[2], masks[3]
    assert plus.any() and (~plus).any()  # dropout really dropped something
    assert torch.equal(plus, minus) and torch.equal(plus, center)


def test_fd_with_dropout_matches_jvp_because_masks_are_shared():
    """With a different mask per pass, (p+ - p-)/2ε would be dominated by mask noise / ε."""
    torch.manual_seed(0)
    model = smooth_net(dropout=0.5).double().train()
    batch = batches()
    assert rel_err(grad_with(model, "fd", batch), grad_with(model, "jvp", batch)) < 1e-3


def test_fd_midpoint_pseudo_labels_are_second_order_close_to_the_forward():
    torch.manual_seed(0)
    model = smooth_net().double().eval()
    batch = batches()
    center = meta_targets(model, *batch, estimator="fd", fd_midpoint=False)
    midpoint = meta_targets(model, *batch, estimator="fd", fd_midpoint=True)
    assert torch.equal(center.jg, midpoint.jg)
    gap = (center.pseudo_labels - midpoint.pseudo_labels).abs().max().item()
    assert 0 < gap < 1e-4
    assert torch.allclose(midpoint.pseudo_labels.sum(1), torch.ones(7, dtype=torch.float64))
    finer = meta_targets(model, *batch, estimator="fd", fd_midpoint=True, eps=0.005)
    finer_gap = (center.pseudo_labels - finer.pseudo_labels).abs().max().item()
    assert 3.0 < gap / finer_gap < 5.0  # O(ε²)


def cosine(a, b):
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def test_fd_stays_accurate_under_bf16_autocast():
    """The ±εg perturbation is below bf16 resolution. fd therefore runs its passes in
    fp32 under autocast; measured here against a float64 reference."""
    torch.manual_seed(0)
    model = build_model("digits_cnn", 10, 1).eval()
    g = torch.Generator().manual_seed(5)
    x_l, y_l, x_u = torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g), torch.randn(32, 1, 8, 8, generator=g)
    reference = pseudo_label_grad(copy.deepcopy(model).double(), x_l.double(), y_l, x_u.double(), lr=0.1, method="jvp")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fd_fp32 = pseudo_label_grad(model, x_l, y_l, x_u, lr=0.1, method="fd")
        fd_bf16 = pseudo_label_grad(model, x_l, y_l, x_u, lr=0.1, method="fd", fd_full_precision=False)
        jvp_bf16 = pseudo_label_grad(model, x_l, y_l, x_u, lr=0.1, method="jvp")
    assert cosine(fd_fp32, reference) > 0.9999
    assert cosine(jvp_bf16, reference) > 0.9999
    # The control: the same fd in bf16 is visibly worse, which is why full precision is the default.
    assert cosine(fd_bf16, reference) < cosine(fd_fp32, reference)


def test_pseudo_label_grad_scales_with_the_inner_learning_rate_and_batch():
    torch.manual_seed(0)
    model = smooth_net().double().eval()
    x_l, y_l, x_u = batches()
    a = pseudo_label_grad(model, x_l, y_l, x_u, lr=0.1, method="jvp")
    b = pseudo_label_grad(model, x_l, y_l, x_u, lr=0.2, method="jvp")
    assert torch.allclose(b, 2 * a, rtol=1e-12, atol=0)
    # Eq. 5 carries 1/B_u: duplicating the unlabeled batch halves each row.
    c = pseudo_label_grad(model, x_l, y_l, torch.cat([x_u, x_u]), lr=0.1, method="jvp")
    assert torch.allclose(c[:7], a / 2, rtol=1e-10, atol=1e-15)


def test_unknown_estimator_is_a_clear_error():
    with pytest.raises(ValueError, match="choose one of"):
        pseudo_label_grad(smooth_net(), *batches(torch.float32), lr=0.1, method="second-order")


class _Deferred:
    """A reduction of g held back until waited for, recording how many forwards ran before that."""

    def __init__(self, grads, calls):
        self.grads, self.calls, self.forwards_before_wait = grads, calls, None

    def wait(self):
        self.forwards_before_wait = len(self.calls)
        return self.grads


@pytest.mark.parametrize("estimator,midpoint,forwards_first", [("fd", False, 1), ("fd", True, 0), ("jvp", False, 0)])
def test_what_needs_no_g_runs_before_the_reduction_of_g_is_waited_for(estimator, midpoint, forwards_first):
    """fd's forward at θ runs while g's all-reduce is in flight, and the result is that of the blocking
    reduction; the ±εg passes (and jvp's one pass) wait for g."""
    torch.manual_seed(0)
    model = smooth_net(dropout=0.3).double().train()
    batch = batches()
    calls, pending = [], []
    model.register_forward_hook(lambda *args: calls.append(1))

    def deferred(grads):
        pending.append(_Deferred(grads, calls))
        return pending[-1]

    torch.manual_seed(5)
    blocking = meta_targets(model, *batch, estimator=estimator, fd_midpoint=midpoint, reduce_grad=lambda g: g)
    after_blocking = torch.get_rng_state()
    calls.clear()
    torch.manual_seed(5)
    overlapped = meta_targets(model, *batch, estimator=estimator, fd_midpoint=midpoint, reduce_grad=deferred)
    assert torch.equal(after_blocking, torch.get_rng_state())  # the passes leave the random state alike
    assert pending[0].forwards_before_wait == 1 + forwards_first  # the labeled forward of g, then p(θ)
    for a, b in zip((blocking.pseudo_labels, blocking.jg, blocking.grad_norm),
                    (overlapped.pseudo_labels, overlapped.jg, overlapped.grad_norm)):
        assert torch.equal(a, b)
