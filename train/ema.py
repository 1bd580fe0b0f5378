"""An exponential moving average of the network's weights (`train.ema`), kept beside the raw weights.

torch's AveragedModel with its EMA update does the averaging. BatchNorm running statistics are
averaged like the weights (use_buffers=True), so the average network is evaluated with statistics
that belong to averaged weights, as the EMA of timm and of Mean Teacher does."""
import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class WeightsEMA:
    def __init__(self, net: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"train.ema={decay}: give the decay of the average, between 0 and 1 (e.g. 0.999)")
        self.decay = decay
        self.averaged = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.averaged.eval()

    @property
    def module(self) -> nn.Module:
        """The averaged network, a copy of the trained one's architecture."""
        return self.averaged.module

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        """One EMA step towards `net`'s current weights and buffers (the first call copies them)."""
        self.averaged.update_parameters(net)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "averaged": self.averaged.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if float(state["decay"]) != self.decay:
            raise ValueError(f"the checkpoint's weight average has decay {state['decay']}, not train.ema={self.decay}; "
                             "resume with the original train.ema")
        self.averaged.load_state_dict(state["averaged"])

    def weights(self) -> dict:
        """The averaged network's own state dict (loads into a network built like the trained one)."""
        return self.module.state_dict()

    @staticmethod
    def weights_in(state: dict) -> dict:
        """The averaged network's state dict from a saved state_dict() of this class."""
        prefix = "module."  # AveragedModel's: module.<name> and n_averaged
        return {k[len(prefix):]: v for k, v in state["averaged"].items() if k.startswith(prefix)}
