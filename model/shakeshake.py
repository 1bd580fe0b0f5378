"""ResNet-26 with shake-shake regularisation, 2x96d (Gastaldi 2017), in the 32x32 form the SSL
literature uses: a 16-channel stem, three stages of four two-branch blocks (96/192/384 channels),
shifted-subsample shortcuts where the resolution halves."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class _ShakeMix(torch.autograd.Function):
    """out = b + alpha * (a - b) forward; gradients split with an independent beta backward.

    The forward-mode rule uses alpha (the true derivative of the forward), so `jvp` and the finite
    difference see the same function; reverse mode uses beta, as shake-shake prescribes."""

    @staticmethod
    def forward(a, b, alpha, beta):
        return torch.lerp(b, a, alpha)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, _, alpha, beta = inputs
        ctx.save_for_backward(beta)
        ctx.alpha = alpha

    @staticmethod
    def backward(ctx, grad):
        (beta,) = ctx.saved_tensors
        return grad * beta, grad * (1 - beta), None, None

    @staticmethod
    def jvp(ctx, ta, tb, _alpha_t, _beta_t):
        return torch.lerp(tb, ta, ctx.alpha)


def shake(a: torch.Tensor, b: torch.Tensor, training: bool) -> torch.Tensor:
    if not training:
        return 0.5 * (a + b)
    gate_shape = (a.shape[0],) + (1,) * (a.dim() - 1)  # one gate per image
    alpha = torch.rand(gate_shape, device=a.device, dtype=a.dtype)
    beta = torch.rand(gate_shape, device=a.device, dtype=a.dtype)
    return _ShakeMix.apply(a, b, alpha, beta)


def _branch(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ReLU(),
        nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
        nn.BatchNorm2d(c_out),
    )


class ShiftedSubsample(nn.Module):
    """Stride-2 shortcut: two pixel grids offset by one, each seen by half of a grouped 1x1 conv."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(2 * c_in, c_out, 1, groups=2)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x):
        x = torch.cat([x[:, :, 0::2, 0::2], x[:, :, 1::2, 1::2]], dim=1)  # (B, 2C, H/2, W/2)
        return self.bn(self.conv(F.relu(x)))


class ShakeBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.branch_a = _branch(c_in, c_out, stride)
        self.branch_b = _branch(c_in, c_out, stride)
        if stride == 2:
            self.shortcut = ShiftedSubsample(c_in, c_out)
        elif c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        return self.shortcut(x) + shake(self.branch_a(x), self.branch_b(x), self.training)


class ShakeShake26(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, channels: int = 96, blocks: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        layers, c_in = [], 16
        for stage, c_out in enumerate((channels, 2 * channels, 4 * channels)):
            for i in range(blocks):
                stride = 2 if (stage > 0 and i == 0) else 1
                layers.append(ShakeBlock(c_in, c_out, stride))
                c_in = c_out
        self.blocks = nn.Sequential(*layers)
        self.classifier = nn.Linear(c_in, num_classes)
        self.feature_dim = c_in
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x):
        x = self.blocks(self.stem(x))  # (B, 384, 8, 8)
        return x.mean(dim=(2, 3))  # (B, 384)

    def forward(self, x):
        return self.classifier(self.forward_features(x))
