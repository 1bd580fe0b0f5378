"""The authors' public meta training script (with and without its mix-up flag), written out in float64,
against train_step: Table-4 rows 4 (the default: meta + mixup, eval-mode meta part, fd, the authors'
pseudo-label scale) and 2 (meta, no mixup) must be the same computations."""
import copy

import pytest
import torch
import torch.nn.functional as F

from mgssl.model import build_model
from mgssl.train.config import MethodConfig
from mgssl.train.step import StepParts, train_step


def written_out_meta_step(net, opt, batch, *, lr, weight, mixup, eps=0.01, gamma=1.0, num_classes=10):
    x_l, y_l, x_u = batch
    params = list(net.parameters())
    net.eval()  # the whole meta part sees running statistics and no dropout
    g = torch.autograd.grad(F.cross_entropy(net(x_l), y_l), params)
    with torch.no_grad():
        y_tilde = torch.softmax(net(x_u), dim=1)
        step = eps / torch.sqrt(sum((t * t).sum() for t in g))
        for p, t in zip(params, g):  # θ + εg
            p.add_(t * step)
        p_plus = torch.softmax(net(x_u), dim=1)
        for p, t in zip(params, g):  # θ - εg
            p.sub_(2 * t * step)
        p_minus = torch.softmax(net(x_u), dim=1)
        for p, t in zip(params, g):  # back to θ (up to rounding)
            p.add_(t * step)
        y_hat = torch.relu(y_tilde - lr * (p_plus - p_minus) / step)
        total = y_hat.sum(dim=1, keepdim=True)
        y_hat = y_hat / torch.where(total == 0, torch.ones_like(total), total)
    net.train()
    if mixup:
        lam = torch.distributions.Beta(torch.tensor(gamma), torch.tensor(gamma)).sample((x_l.shape[0],)).double()
        x_in = lam.view(-1, 1, 1, 1) * x_l + (1 - lam.view(-1, 1, 1, 1)) * x_u
        y_in = lam.view(-1, 1) * F.one_hot(y_l, num_classes).double() + (1 - lam.view(-1, 1)) * y_hat
        loss_labeled = F.kl_div(F.log_softmax(net(x_in), dim=1), y_in, reduction="batchmean")
    else:  # row 2: the plain cross-entropy of the labeled batch, in train mode
        loss_labeled = F.cross_entropy(net(x_l), y_l)
    loss_unlabeled = (torch.softmax(net(x_u), dim=1) - y_hat).pow(2).sum(dim=1).mean()
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad()
    (loss_labeled + weight * loss_unlabeled).backward()
    opt.step()


@pytest.mark.parametrize("mixup", [True, False], ids=["row4-default", "row2-no-mixup"])
def test_the_meta_rows_are_the_authors_meta_script_in_float64(mixup):
    torch.manual_seed(0)
    ours = build_model("digits_cnn", 10, 1).double().train()  # with dropout: masks must be drawn alike
    theirs = copy.deepcopy(ours)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(1)
    for step, (lr, weight) in enumerate([(0.0, 0.0), (0.05, 0.5), (0.1, 1.0), (0.1, 1.0)]):
        batch = (torch.randn(16, 1, 8, 8, generator=gen, dtype=torch.float64),
                 torch.randint(0, 10, (16,), generator=gen), torch.randn(16, 1, 8, 8, generator=gen, dtype=torch.float64))
        for group in opt_ours.param_groups:  # the engine sets the scheduled rate before each step
            group["lr"] = lr
        torch.manual_seed(100 + step)
        stats = train_step(StepParts.of(ours, opt_ours, 10), batch, method=MethodConfig(mixup=mixup), lr=lr,
                           consistency_weight=weight)
        torch.manual_seed(100 + step)
        written_out_meta_step(theirs, opt_theirs, batch, lr=lr, weight=weight, mixup=mixup)
    assert stats["pseudo_label_shift"] > 1e-3  # the meta term did move the labels
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.allclose(a, b, rtol=0, atol=1e-10), name  # running statistics included
