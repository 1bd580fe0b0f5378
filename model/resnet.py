"""ResNet-18 for ImageNet, from torchvision (randomly initialised)."""
import torch.nn as nn
import torchvision


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        net = torchvision.models.resnet18(weights=None, num_classes=num_classes)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.classifier = net.fc
        net.fc = nn.Identity()
        self.body = net
        self.feature_dim = 512

    def forward_features(self, x):
        return self.body(x)  # (B, 512)

    def forward(self, x):
        return self.classifier(self.body(x))
