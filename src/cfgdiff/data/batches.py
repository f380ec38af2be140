"""Batches for training: the whole uint8 dataset lives on the training device, batches are
drawn there by index. No DataLoader, no workers.

The order is a sequence of seeded permutations, one per epoch; the position (epoch, offset) is
plain data, so a resumed run draws exactly the batches the uninterrupted run would have. Random
horizontal flips (hflip) are drawn the same way: one seeded coin per image and epoch, applied on
the device with no host sync.

Several processes (a distributed run) share one order: `batch_size` is the global batch, the
step's batch is positions [k B, (k + 1) B) of the order as counted in images seen, and process
r of W takes the contiguous part [r B/W, (r + 1) B/W) of it (`part`). The order and the
position do not depend on W, so a run resumes on another number of processes where it stopped.
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
        hflip: bool = False,
        part: tuple[int, int] = (0, 1),
    ):
        """part: (r, W), this process's share of each global batch (r of W equal parts)."""
        self.images = images.to(device)  # uint8 (N, C, H, W)
        self.labels = labels.to(device)
        self.n = images.shape[0]
        self.batch_size = batch_size
        self.seed = seed
        self.hflip = hflip
        rank, size = part
        if not 0 <= rank < size or batch_size % size:
            raise ValueError(f"part {part} of a batch of {batch_size}")
        per = batch_size // size
        self._rows = None if size == 1 else slice(rank * per, (rank + 1) * per)
        self.epoch = 0
        self.offset = 0
        self._perm, self._flip = self._permutation(0)

    def _permutation(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The epoch's order, and whether the image at each position of it is mirrored."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n, generator=g).to(self.images.device)
        if not self.hflip:
            return perm, None
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 0x5EED_F11B)
        return perm, (torch.rand(self.n, generator=g) < 0.5).to(self.images.device)

    def state(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state(self, state: dict) -> None:
        """Go to position (epoch, offset): epoch >= 0 and 0 <= offset < n, else ValueError (a
        position outside the data would make next() draw nothing, forever)."""
        epoch, offset = int(state["epoch"]), int(state["offset"])
        if epoch < 0 or not 0 <= offset < self.n:
            raise ValueError(
                f"data position (epoch {epoch}, offset {offset}) outside {self.n} images"
            )
        self.epoch, self.offset = epoch, offset
        self._perm, self._flip = self._permutation(self.epoch)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x in [-1, 1] float32 (B, C, H, W), y int64 (B,)); batches may span epochs. With a
        part, this process's rows of the global batch."""
        idx, flips = [], []
        need = self.batch_size
        while need > 0:
            take = self._perm[self.offset : self.offset + need]
            idx.append(take)
            if self._flip is not None:
                flips.append(self._flip[self.offset : self.offset + need])
            need -= take.shape[0]
            self.offset += take.shape[0]
            if self.offset >= self.n:
                self.epoch += 1
                self.offset = 0
                self._perm, self._flip = self._permutation(self.epoch)
        i = torch.cat(idx) if len(idx) > 1 else idx[0]
        if self._rows is not None:
            i = i[self._rows]
            flips = [torch.cat(flips)[self._rows]] if flips else flips
        x = self.images[i].float().div_(127.5).sub_(1.0)
        if flips:
            f = torch.cat(flips).view(-1, 1, 1, 1)
            x = torch.where(f, x.flip(-1), x)
        return x, self.labels[i]
