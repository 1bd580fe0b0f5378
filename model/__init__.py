"""Networks by name. `model` never imports `train` or `pipelines`."""
import inspect
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from mgssl.model.convlarge import ConvLarge
from mgssl.model.digits import DigitsCNN
from mgssl.model.resnet import ResNet18
from mgssl.model.shakeshake import ShakeShake26

MODELS = {
    "convlarge": ConvLarge,
    "shakeshake26": ShakeShake26,
    "resnet18": ResNet18,
    "digits_cnn": DigitsCNN,
}


@dataclass
class ModelConfig:
    name: str = "digits_cnn"  # convlarge | shakeshake26 | resnet18 | digits_cnn
    channels_last: bool = True  # NHWC activations: the fast layout for convs on tensor cores
    width: Optional[float] = None  # channel multiplier (convlarge); null: the published network
    dropout: Optional[float] = None  # dropout probability (convlarge, digits_cnn); null: the network's own

    def build(self, num_classes: int, in_channels: int) -> nn.Module:
        return build_model(self.name, num_classes, in_channels, channels_last=self.channels_last,
                           width=self.width, dropout=self.dropout)


def build_model(name: str, num_classes: int, in_channels: int = 3, *, channels_last: bool = False,
                width: Optional[float] = None, dropout: Optional[float] = None) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    options = {k: v for k, v in (("width", width), ("dropout", dropout)) if v is not None}
    accepted = inspect.signature(MODELS[name]).parameters
    for key in options:
        if key not in accepted:
            takers = sorted(n for n, cls in MODELS.items() if key in inspect.signature(cls).parameters)
            raise ValueError(f"model.{key} is not an option of {name} (only of {', '.join(takers)}); "
                             f"remove it or set it to null")
    if options.get("dropout") is not None and not 0 <= options["dropout"] < 1:
        raise ValueError(f"model.dropout={options['dropout']}: give a probability in [0, 1)")
    net = MODELS[name](num_classes=num_classes, in_channels=in_channels, **options)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net
