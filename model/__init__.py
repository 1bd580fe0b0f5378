"""Networks by name. `model` never imports `train` or `pipelines`."""
from dataclasses import dataclass

import torch
import torch.nn as nn

from model.convlarge import ConvLarge
from model.digits import DigitsCNN
from model.resnet import ResNet18
from model.shakeshake import ShakeShake26

MODELS = {
    "convlarge": ConvLarge,
    "shakeshake26": ShakeShake26,
    "resnet18": ResNet18,
    "digits_cnn": DigitsCNN,
}


@dataclass
class ModelConfig:
    name: str = "digits_cnn"  # one of MODELS
    channels_last: bool = True  # NHWC activations: the fast layout for convs on tensor cores

    def build(self, num_classes: int, in_channels: int) -> nn.Module:
        return build_model(self.name, num_classes, in_channels, channels_last=self.channels_last)


def build_model(name: str, num_classes: int, in_channels: int = 3, *, channels_last: bool = False) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    net = MODELS[name](num_classes=num_classes, in_channels=in_channels)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net
