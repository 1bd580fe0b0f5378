"""Conv-Large, the 13-layer CNN of the SSL literature (paper Table 6), with a width multiplier.

`width=1` is the paper's network (3.1M parameters); smaller widths scale every layer's channel count,
so that the same architecture trains on a laptop CPU (`configs/cifar10_cpu.yaml` uses 1/8)."""
import torch.nn as nn


def conv_bn_lrelu(c_in: int, c_out: int, kernel: int, padding: int) -> nn.Sequential:
    # The conv has no bias: the BatchNorm right after it would cancel one.
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, padding=padding, bias=False),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(0.1),
    )


class ConvLarge(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.5, width: float = 1.0):
        super().__init__()
        if width <= 0:
            raise ValueError(f"model.width={width}: the channel multiplier must be positive (1 is the paper's network)")
        c128, c256, c512 = (max(1, round(c * width)) for c in (128, 256, 512))
        self.features = nn.Sequential(
            conv_bn_lrelu(in_channels, c128, 3, 1),
            conv_bn_lrelu(c128, c128, 3, 1),
            conv_bn_lrelu(c128, c128, 3, 1),
            nn.MaxPool2d(2),  # 32x32 -> 16x16
            nn.Dropout2d(dropout),
            conv_bn_lrelu(c128, c256, 3, 1),
            conv_bn_lrelu(c256, c256, 3, 1),
            conv_bn_lrelu(c256, c256, 3, 1),
            nn.MaxPool2d(2),  # 16x16 -> 8x8
            nn.Dropout2d(dropout),
            conv_bn_lrelu(c256, c512, 3, 0),  # 8x8 -> 6x6
            conv_bn_lrelu(c512, c256, 1, 0),
            conv_bn_lrelu(c256, c128, 1, 0),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(c128, num_classes)
        self.feature_dim = c128

    def forward_features(self, x):
        return self.features(x)  # (B, feature_dim)

    def forward(self, x):
        return self.classifier(self.features(x))  # (B, num_classes)
