"""The training step: Theorem 1 in miniature, the Table-4 switches, pseudo-label arithmetic."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mgssl.model import build_model
from mgssl.train.config import MethodConfig
from mgssl.train.losses import consistency_mse, mixup_pairs
from mgssl.train.meta import pseudo_label_grad
from mgssl.train.pseudo_labels import pseudo_label_step, pseudo_labels, update_pseudo_labels
from mgssl.train.step import StepParts, mixup_ratios, train_step


def small_net(classes=4):
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, classes)).double()


def labeled_loss(model, x_l, y_l):
    with torch.no_grad():
        return F.cross_entropy(model(x_l), y_l).item()


def algorithm1_step(model, x_l, y_l, x_u, *, alpha, beta, method, sign=1.0):
    """θ ← θ - α ∇θ mean||p(x_u) - ŷ||² with ŷ = ỹ - β∇ỹ (paper Algorithm 1, literal scale)."""
    with torch.no_grad():
        y_tilde = torch.softmax(model(x_u), dim=1)
    y_hat = y_tilde - sign * beta * pseudo_label_grad(model, x_l, y_l, x_u, lr=alpha, method=method)
    loss = consistency_mse(model(x_u), y_hat)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            p -= alpha * g


@pytest.mark.parametrize("method", ["exact", "jvp", "fd"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_theorem1_one_step_does_not_increase_the_labeled_loss(method, seed):
    """All labeled data in the batch, small α and β: G(θ_{t+1}) ≤ G(θ_t), whatever the unlabeled batch."""
    torch.manual_seed(seed)
    model = small_net()
    x_l, y_l = torch.randn(16, 1, 8, 8, dtype=torch.float64), torch.randint(0, 4, (16,))
    x_u = torch.randn(12, 1, 8, 8, dtype=torch.float64)
    before = labeled_loss(model, x_l, y_l)
    algorithm1_step(model, x_l, y_l, x_u, alpha=0.5, beta=50.0, method=method)
    after = labeled_loss(model, x_l, y_l)
    assert after < before


def test_theorem1_control_the_reversed_meta_step_increases_the_labeled_loss():
    """The same step with the pseudo labels moved the wrong way must hurt: the test above can fail."""
    torch.manual_seed(0)
    model = small_net()
    x_l, y_l = torch.randn(16, 1, 8, 8, dtype=torch.float64), torch.randint(0, 4, (16,))
    x_u = torch.randn(12, 1, 8, 8, dtype=torch.float64)
    before = labeled_loss(model, x_l, y_l)
    algorithm1_step(model, x_l, y_l, x_u, alpha=0.5, beta=50.0, method="jvp", sign=-1.0)
    assert labeled_loss(model, x_l, y_l) > before


def test_pseudo_labels_are_projected_back_onto_the_simplex():
    pseudo = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    delta = torch.tensor([[0.8, -0.1, 0.0], [0.6, 0.6, 0.1], [0.1, -0.1, 0.0]])
    out = update_pseudo_labels(pseudo, delta)
    assert (out >= 0).all()
    assert torch.allclose(out[0], torch.tensor([0.0, 0.3, 0.1]) / 0.4)
    assert torch.equal(out[1], torch.zeros(3))  # pushed entirely below zero: left as zeros, not NaN
    assert torch.allclose(out[2], torch.tensor([0.1, 0.4, 0.5]))


def test_meta_scales_authors_and_literal():
    jg = torch.tensor([[1.0, -1.0]])
    authors = pseudo_label_step(jg, 0.1, MethodConfig(meta_scale="authors"), global_unlabeled_batch=128)
    literal = pseudo_label_step(jg, 0.1, MethodConfig(meta_scale="literal"), global_unlabeled_batch=128)
    assert torch.allclose(authors, 0.2 * jg)  # lr · 2·J·g
    assert torch.allclose(literal, (0.1 * 2 * 0.1 / 128) * jg)  # β · (2α/B_u)·J·g
    assert torch.allclose(authors / literal, torch.full_like(jg, 128 / 0.1))


def test_mixup_pairs_interpolates_images_and_labels_per_pair():
    x_l, x_u = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    y_l, y_u = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    x, y = mixup_pairs(x_l, y_l, x_u, y_u, torch.tensor([1.0, 0.25]))
    assert torch.equal(x[0], torch.zeros(1, 2, 2)) and torch.allclose(x[1], torch.full((1, 2, 2), 0.75))
    assert torch.allclose(y, torch.tensor([[1.0, 0.0], [0.375, 0.625]]))


def digits_batch(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g), torch.randn(n, 1, 8, 8, generator=g)


ROWS = {
    "labeled-only": dict(unlabeled=False, meta=False, mixup=False),
    "consistency": dict(meta=False, mixup=False),
    "meta": dict(meta=True, mixup=False),
    "mixup": dict(meta=False, mixup=True),
    "meta+mixup": dict(meta=True, mixup=True),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_every_table4_row_trains_one_step(row):
    torch.manual_seed(0)
    net = build_model("digits_cnn", 10, 1)
    before = copy.deepcopy(net.state_dict())
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    method = MethodConfig(**ROWS[row])
    net.train()
    stats = train_step(StepParts.of(net, opt, 10), digits_batch(), method=method, lr=0.1, consistency_weight=1.0)
    assert net.training
    assert all(torch.isfinite(v) for v in stats.values())
    assert ("pseudo_label_shift" in stats) == method.meta
    assert ("loss_consistency" in stats) == method.unlabeled
    changed = [k for k, v in net.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.endswith("weight") for k in changed)


def test_meta_off_means_the_pseudo_labels_are_the_eval_predictions():
    torch.manual_seed(0)
    net = build_model("digits_cnn", 10, 1).train()
    x_l, y_l, x_u = digits_batch()
    y_hat, stats = pseudo_labels(net, x_l, y_l, x_u, method=MethodConfig(meta=False), lr=0.1,
                                 autocast=torch.autocast("cpu", enabled=False), reduce_grad=None, world_size=1)
    net.eval()
    with torch.no_grad():
        expected = torch.softmax(net(x_u), dim=1)
    assert torch.allclose(y_hat, expected) and stats == {}


def test_meta_on_moves_the_pseudo_labels_by_the_meta_gradient():
    torch.manual_seed(0)
    net = build_model("digits_cnn", 10, 1).train()
    x_l, y_l, x_u = digits_batch()
    off, _ = pseudo_labels(net, x_l, y_l, x_u, method=MethodConfig(meta=False), lr=0.1,
                           autocast=torch.autocast("cpu", enabled=False), reduce_grad=None, world_size=1)
    on, stats = pseudo_labels(net, x_l, y_l, x_u, method=MethodConfig(meta=True, estimator="jvp"), lr=0.1,
                              autocast=torch.autocast("cpu", enabled=False), reduce_grad=None, world_size=1)
    shift = (on - off).abs().sum(1).mean()
    assert shift > 1e-4
    assert torch.allclose(stats["pseudo_label_shift"], shift, rtol=1e-5)
    assert torch.allclose(on.sum(1), torch.ones(8))


def test_mixup_ratios_are_the_beta_draws_of_torch_distributions():
    for gamma in (1.0, 0.1):
        torch.manual_seed(5)
        expected = torch.distributions.Beta(torch.tensor(gamma), torch.tensor(gamma)).sample((32,))
        after_expected = torch.rand(3)
        torch.manual_seed(5)
        assert torch.equal(mixup_ratios(gamma, 32, torch.device("cpu")), expected)
        assert torch.equal(torch.rand(3), after_expected)  # the random stream moves on alike


def authors_mixup_baseline_step(net, opt, batch, lr, num_classes=10):
    """The authors' mixup-only baseline written out: eval-mode predictions as the unlabeled targets,
    per-pair λ ~ Beta(1, 1), one train-mode forward of the mixed batch, KL loss, no consistency term."""
    x_l, y_l, x_u = batch
    net.eval()
    with torch.no_grad():
        y_u = torch.softmax(net(x_u), dim=1)
    net.train()
    lam = torch.distributions.Beta(torch.tensor(1.0), torch.tensor(1.0)).sample((x_l.shape[0],)).double()
    lx = lam.view(-1, 1, 1, 1)
    x = lx * x_l + (1 - lx) * x_u
    y = lam.view(-1, 1) * F.one_hot(y_l, num_classes).to(y_u.dtype) + (1 - lam.view(-1, 1)) * y_u
    loss = F.kl_div(F.log_softmax(net(x), dim=1), y, reduction="batchmean")
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_zero_consistency_weight_without_meta_is_the_authors_mixup_baseline():
    # With weight 0 the unlabeled batch gets no train-mode forward, so its batch statistics do not
    # reach BatchNorm's running averages: the step is the authors' mixup-only baseline, float for float.
    torch.manual_seed(0)
    ours = build_model("digits_cnn", 10, 1).double().train()
    theirs = copy.deepcopy(ours)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9)
    method = MethodConfig(meta=False, mixup=True, consistency_weight=0.0)
    for step in range(3):
        batch = tuple(t.double() if t.is_floating_point() else t for t in digits_batch(seed=step))
        torch.manual_seed(100 + step)
        stats = train_step(StepParts.of(ours, opt_ours, 10), batch, method=method, lr=0.1, consistency_weight=0.0)
        torch.manual_seed(100 + step)
        authors_mixup_baseline_step(theirs, opt_theirs, batch, lr=0.1)
        assert "loss_consistency" not in stats
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.allclose(a, b, rtol=0, atol=1e-12), name  # running statistics included


def test_the_first_step_of_a_ramp_still_forwards_the_unlabeled_batch():
    # At step 0 the ramped weight is 0, but the authors' meta script still runs the train-mode forward
    # of the unlabeled batch (its BatchNorm statistics move): only a configured weight of 0 skips it.
    torch.manual_seed(0)
    net = build_model("digits_cnn", 10, 1).train()
    with_unlabeled, labeled_only = copy.deepcopy(net), copy.deepcopy(net)
    batch = digits_batch()
    stats = train_step(StepParts.of(with_unlabeled, torch.optim.SGD(with_unlabeled.parameters(), lr=0.0), 10), batch,
                       method=MethodConfig(meta=False, mixup=False), lr=0.0, consistency_weight=0.0)
    train_step(StepParts.of(labeled_only, torch.optim.SGD(labeled_only.parameters(), lr=0.0), 10), batch,
               method=MethodConfig(meta=False, mixup=False, consistency_weight=0.0), lr=0.0, consistency_weight=0.0)
    assert "loss_consistency" in stats
    mean = "features.0.1.running_mean"
    assert not torch.allclose(with_unlabeled.state_dict()[mean], labeled_only.state_dict()[mean])


def test_a_float64_step_computes_its_losses_in_float64():
    torch.manual_seed(0)
    net = build_model("digits_cnn", 10, 1).double().train()
    x_l, y_l, x_u = (t.double() if t.is_floating_point() else t for t in digits_batch())
    for row in ROWS.values():
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        stats = train_step(StepParts.of(net, opt, 10), (x_l, y_l, x_u), method=MethodConfig(**row), lr=0.1,
                           consistency_weight=1.0)
        assert stats["loss"].dtype == torch.float64, row
    # The labeled-only loss against the same cross-entropy computed by hand in float64, before a step.
    net_ref = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    torch.manual_seed(7)  # the same dropout masks in both forwards
    stats = train_step(StepParts.of(net, opt, 10), (x_l, y_l, x_u), method=MethodConfig(**ROWS["labeled-only"]),
                       lr=0.0, consistency_weight=1.0)
    torch.manual_seed(7)
    logits = net_ref(x_l)
    by_hand = -(logits.log_softmax(1).gather(1, y_l[:, None])).mean()
    assert abs(stats["loss"].item() - by_hand.item()) < 1e-14


def test_the_fp32_meta_window_covers_its_first_steps_only():
    from mgssl.train.config import MethodConfig
    from mgssl.train.pseudo_labels import method_at

    method = MethodConfig(fp32_meta_steps=3)
    assert [method_at(method, s).meta_precision for s in range(5)] == ["fp32"] * 3 + ["run"] * 2
    assert method_at(method, 7) is method
    assert method_at(MethodConfig(), 0).meta_precision == "run"


def test_under_fp16_the_step_hands_the_scalers_current_scale_to_the_meta_part(monkeypatch):
    import mgssl.train.pseudo_labels as pl
    from mgssl.train.host_syncs import count_host_syncs

    seen, syncs = [], []
    real = pl.meta_targets

    def spy(*args, **kwargs):
        seen.append(kwargs["grad_scale"])
        with count_host_syncs() as counts:
            out = real(*args, **kwargs)
        syncs.append(sum(counts.values()))
        return out

    monkeypatch.setattr(pl, "meta_targets", spy)
    torch.manual_seed(0)
    net = build_model("digits_cnn", 10, 1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    batch = (torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,)), torch.randn(4, 1, 8, 8))
    train_step(StepParts.of(net, optimizer, 10, precision="fp16", scaler=scaler), batch, method=MethodConfig(), lr=0.1,
               consistency_weight=1.0)
    assert seen[0].device == batch[0].device and float(seen[0]) == 1024.0
    assert syncs == [0]  # scaled and unscaled on the device: the meta part reads nothing back
