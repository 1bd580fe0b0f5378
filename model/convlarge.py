"""Conv-Large, the 13-layer CNN of the SSL literature (paper Table 6)."""
import torch.nn as nn


def conv_bn_lrelu(c_in: int, c_out: int, kernel: int, padding: int) -> nn.Sequential:
    # The conv has no bias: the BatchNorm right after it would cancel one.
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, padding=padding, bias=False),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(0.1),
    )


class ConvLarge(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_lrelu(in_channels, 128, 3, 1),
            conv_bn_lrelu(128, 128, 3, 1),
            conv_bn_lrelu(128, 128, 3, 1),
            nn.MaxPool2d(2),  # 32x32 -> 16x16
            nn.Dropout2d(dropout),
            conv_bn_lrelu(128, 256, 3, 1),
            conv_bn_lrelu(256, 256, 3, 1),
            conv_bn_lrelu(256, 256, 3, 1),
            nn.MaxPool2d(2),  # 16x16 -> 8x8
            nn.Dropout2d(dropout),
            conv_bn_lrelu(256, 512, 3, 0),  # 8x8 -> 6x6
            conv_bn_lrelu(512, 256, 1, 0),
            conv_bn_lrelu(256, 128, 1, 0),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(128, num_classes)
        self.feature_dim = 128

    def forward_features(self, x):
        return self.features(x)  # (B, 128)

    def forward(self, x):
        return self.classifier(self.features(x))  # (B, num_classes)
