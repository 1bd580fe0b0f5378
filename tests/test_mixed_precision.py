"""The meta part under autocast: which estimator runs, in which precision, how faithfully, and what
it does to the backend's global switches."""
import pytest
import torch
import torch.nn as nn

from train.meta import meta_targets


# ---------------------------------------------------------------------------------------------
# Backend switches inside fd's full-precision passes


class FlagRecorder(nn.Module):
    """A small network that notes the backend switches each time it runs without autograd (fd's
    perturbed passes are the only such calls in meta_targets)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        self.seen: list[dict] = []

    def forward(self, x):
        if not torch.is_grad_enabled():
            self.seen.append({
                "cudnn_benchmark": torch.backends.cudnn.benchmark,
                "cudnn_deterministic": torch.backends.cudnn.deterministic,
                "cudnn_enabled": torch.backends.cudnn.enabled,
                "cudnn_tf32": torch.backends.cudnn.allow_tf32,
                "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
                "autocast": torch.is_autocast_enabled("cpu"),
            })
        return self.body(x)


@pytest.fixture
def backend_switches():
    """Sets benchmark, deterministic and both TF32 switches on, and puts everything back after."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    yield
    (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
     torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) = saved


def test_fd_full_precision_turns_off_tf32_and_nothing_else(backend_switches):
    torch.manual_seed(0)
    net = FlagRecorder().eval()
    x_l, y_l, x_u = torch.randn(4, 1, 6, 6), torch.tensor([0, 1, 2, 0]), torch.randn(4, 1, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        meta_targets(net, x_l, y_l, x_u, estimator="fd", fd_full_precision=True)
    assert len(net.seen) == 3  # θ+εg, θ-εg and θ
    for flags in net.seen:
        assert flags == {"cudnn_benchmark": True, "cudnn_deterministic": True, "cudnn_enabled": True,
                         "cudnn_tf32": False, "matmul_tf32": False, "autocast": False}
    # ... and both TF32 switches are back on afterwards.
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
