"""Exponential moving average of the network weights (samples and checkpoints use it)."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """shadow <- d * shadow + (1 - d) * param, with d = min(decay, (1 + n) / (10 + n)) so that the
    average is not dominated by the random initialisation early in short runs."""

    def __init__(self, net: nn.Module, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: v.detach().clone().float() for k, v in net.state_dict().items()}

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        """One step of the average. The fp32 tensors (all the weights) go through one
        torch._foreach_lerp_ call: on a GPU a per-tensor loop would launch a kernel for each of
        the UNet's 100-250 tensors every step."""
        d = self.current_decay() if self.decay > 0 else 0.0
        self.num_updates += 1
        shadow, live = [], []
        for k, v in net.state_dict().items():
            s = self.shadow[k]
            if v.dtype == torch.float32:
                shadow.append(s)
                live.append(v)
            elif v.dtype.is_floating_point:
                s.lerp_(v.float(), 1 - d)
            else:
                s.copy_(v)
        if shadow:
            torch._foreach_lerp_(shadow, live, 1 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, shadow: dict[str, torch.Tensor], num_updates: int) -> None:
        for k in self.shadow:
            self.shadow[k].copy_(shadow[k])
        self.num_updates = num_updates

    def copy_to(self, net: nn.Module) -> None:
        net.load_state_dict(self.shadow)
