"""Batches for training: the whole uint8 dataset lives on the training device, batches are
drawn there by index. No DataLoader, no workers.

The order is a sequence of seeded permutations, one per epoch; the position (epoch, offset) is
plain data, so a resumed run draws exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import torch


class DeviceBatches:
    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        seed: int,
        device: torch.device | str,
    ):
        self.images = images.to(device)  # uint8 (N, C, H, W)
        self.labels = labels.to(device)
        self.n = images.shape[0]
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.offset = 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g).to(self.images.device)

    def state(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._perm = self._permutation(self.epoch)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x in [-1, 1] float32 (B, C, H, W), y int64 (B,)); batches may span epochs."""
        idx = []
        need = self.batch_size
        while need > 0:
            take = self._perm[self.offset : self.offset + need]
            idx.append(take)
            need -= take.shape[0]
            self.offset += take.shape[0]
            if self.offset >= self.n:
                self.epoch += 1
                self.offset = 0
                self._perm = self._permutation(self.epoch)
        i = torch.cat(idx) if len(idx) > 1 else idx[0]
        x = self.images[i].float().div_(127.5).sub_(1.0)
        return x, self.labels[i]
