"""A small CNN for scikit-learn's 8x8 digits: the same ingredients as Conv-Large (conv, BatchNorm,
leaky ReLU, channel dropout) at a size that trains in seconds on a laptop CPU."""
import torch.nn as nn

from mgssl.model.convlarge import conv_bn_lrelu


class DigitsCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, dropout: float = 0.25):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_lrelu(in_channels, 32, 3, 1),
            conv_bn_lrelu(32, 32, 3, 1),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Dropout2d(dropout),
            conv_bn_lrelu(32, 64, 3, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(64, num_classes)
        self.feature_dim = 64

    def forward_features(self, x):
        return self.features(x)  # (B, 64)

    def forward(self, x):
        return self.classifier(self.features(x))
