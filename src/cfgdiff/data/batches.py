"""Batches for training, drawn by index from the uint8 dataset. No DataLoader, no workers.

Where the images are read from (`placement`, chosen by `choose_placement` and said when training
starts):
- "device": the whole dataset is copied to the training device once and batches are drawn there
  (a CUDA device where it fits with room to spare: DEVICE_DATA_FRACTION of its free memory).
- "mapped": the images stay where they are, in their cache file (every process of a machine
  reads the same pages of the page cache, never a copy of its own). Each batch's rows are read
  by index from the file (mapped.RowReader, when the caller gives one: the process then holds
  the batch and nothing more of the file), else gathered from the memory map. For a CUDA
  device they are gathered on a background thread one batch ahead, into pinned memory, and
  copied without blocking; on a CPU they are gathered in the step: a thread would share the
  step's cores, and costs more than the gather from cached pages (docs/datasets.md, "Memory").

The order is a sequence of seeded permutations, one per epoch; the position (epoch, offset) is
plain data, so a resumed run draws exactly the batches the uninterrupted run would have. Random
horizontal flips (hflip) are drawn the same way: one seeded coin per image and epoch, applied on
the device with no host sync. The two placements draw the same batches, to the bit.

Several processes (a distributed run) share one order: `batch_size` is the global batch, the
step's batch is positions [k B, (k + 1) B) of the order as counted in images seen, and process
r of W takes the contiguous part [r B/W, (r + 1) B/W) of it (`part`). The order and the
position do not depend on W, so a run resumes on another number of processes where it stopped.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from cfgdiff.data.mapped import RowReader

# A CUDA device keeps the dataset when it takes at most this share of the device's free memory.
DEVICE_DATA_FRACTION = 0.25
PLACEMENTS = ("device", "mapped")


def choose_placement(images: torch.Tensor, device: torch.device | str) -> tuple[str, str]:
    """("device" or "mapped", the words that say why) for uint8 `images` trained on `device`."""
    device = torch.device(device)
    mib = images.numel() * images.element_size() / 2**20
    if device.type == "cpu":
        return "mapped", f"data: {mib:,.0f} MiB read where it lies (from its cache file by row)"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if mib * 2**20 <= DEVICE_DATA_FRACTION * free:
            return "device", f"data: {mib:,.0f} MiB kept on {device.type}"
        return "mapped", (
            f"data: {mib:,.0f} MiB, over {DEVICE_DATA_FRACTION:.0%} of {device.type}'s free "
            f"{free / 2**20:,.0f} MiB: batches read from its cache file on a thread"
        )
    return "device", f"data: {mib:,.0f} MiB kept on {device.type}"


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
        placement: str | None = None,
        ahead: bool | None = None,
        rows: RowReader | None = None,
    ):
        """part: (r, W), this process's share of each global batch (r of W equal parts).
        placement: "device" or "mapped" (default: choose_placement's). ahead: gather a mapped
        batch on a thread, one batch ahead (default: for a CUDA device). rows: a reader of the
        file `images` is mapped from, which mapped batches are read with (else they are
        gathered from `images`)."""
        self.device = torch.device(device)
        if placement is None:
            self.placement, self.words = choose_placement(images, self.device)
        else:
            self.placement, self.words = placement, f"data: {placement} (as asked)"
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement {placement!r}")
        mapped = self.placement == "mapped"
        # the order lives where the rows are gathered: the device, or the CPU for a map
        self._order_device = torch.device("cpu") if mapped else self.device
        self.images = images if mapped else images.to(self.device)  # uint8 (N, C, H, W)
        if rows is not None and (rows.n, *rows.row) != tuple(images.shape):
            raise ValueError(f"rows of {rows.path} ({rows.n}, {rows.row}) for {images.shape}")
        self._rows_from = rows if mapped else None
        self.labels = labels.to(self._order_device)
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
        self._perms: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        # the mapped placement's next batch, gathered on a thread: ((epoch, offset), Future)
        self._ahead: tuple[tuple[int, int], Future] | None = None
        if ahead is None:
            ahead = mapped and self.device.type == "cuda"
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cfgdiff-batches") if ahead else None

    def _permutation(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The epoch's order, and whether the image at each position of it is mirrored."""
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g).to(self._order_device)
            flip = None
            if self.hflip:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 0x5EED_F11B)
                flip = (torch.rand(self.n, generator=g) < 0.5).to(self._order_device)
            for old in [e for e in self._perms if e < epoch - 1]:
                del self._perms[old]
            self._perms[epoch] = perm, flip
        return self._perms[epoch]

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
        self._ahead = None

    def _indices(self, epoch: int, offset: int):
        """The rows of the batch at position (epoch, offset) of the order (this process's part),
        their mirror coins (None without hflip), and the position after it."""
        idx, flips = [], []
        need = self.batch_size
        while need > 0:
            perm, flip = self._permutation(epoch)
            take = perm[offset : offset + need]
            idx.append(take)
            if flip is not None:
                flips.append(flip[offset : offset + need])
            need -= take.shape[0]
            offset += take.shape[0]
            if offset >= self.n:
                epoch, offset = epoch + 1, 0
        i = torch.cat(idx) if len(idx) > 1 else idx[0]
        f = (torch.cat(flips) if len(flips) > 1 else flips[0]) if flips else None
        if self._rows is not None:
            i = i[self._rows]
            f = f[self._rows] if f is not None else None
        return i, f, (epoch, offset)

    def _gather(self, i: torch.Tensor) -> torch.Tensor:
        """uint8 rows `i` of the data, on the CPU (pinned for a CUDA device): read from the
        cache file where there is a reader, else gathered from the map."""
        if self._rows_from is not None:
            rows = torch.from_numpy(self._rows_from.take(i.numpy()))
        else:
            rows = torch.from_numpy(np.take(self.images.numpy(), i.numpy(), axis=0))
        return rows.pin_memory() if self.device.type == "cuda" else rows

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x in [-1, 1] float32 (B, C, H, W), y int64 (B,)); batches may span epochs. With a
        part, this process's rows of the global batch."""
        here = (self.epoch, self.offset)
        i, f, after = self._indices(*here)
        if self._pool is None:  # in the step: on the device, or read where the data lies
            x = (self.images[i] if self.placement == "device" else self._gather(i)).to(self.device)
        else:
            ahead = self._ahead
            rows = ahead[1].result() if ahead is not None and ahead[0] == here else self._gather(i)
            x = rows.to(self.device, non_blocking=True)
            i_next = self._indices(*after)[0]
            self._ahead = after, self._pool.submit(self._gather, i_next)
        self.epoch, self.offset = after
        x = x.float().div_(127.5).sub_(1.0)
        if f is not None:
            x = torch.where(f.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)
        return x, self.labels[i].to(self.device)
