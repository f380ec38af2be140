"""Everything a training run carries from step to step, and its round trip through a checkpoint.

Owns: `TrainState` (network, EMA, optimizer, the training generator, the data position, the
step, the loss summed since the last log row, and the precision and data it trains with), its
creation, its loading from a checkpoint and its state_dict, side by side, so that what is saved
and what is restored can be read against each other. A resumed run draws exactly the batches,
timesteps, noise and label dropouts the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cfgdiff import checkpoint as ckpt_io
from cfgdiff import dist
from cfgdiff.config import RunConfig
from cfgdiff.data import DatasetName, canonical_name, is_folder
from cfgdiff.data.batches import DeviceBatches
from cfgdiff.data.mapped import RowReader, data_chunks
from cfgdiff.diffusion import training_loss
from cfgdiff.ema import EMA
from cfgdiff.errors import CheckpointError
from cfgdiff.runtime import autocast
from cfgdiff.schedule import Schedule, make_schedule
from cfgdiff.text.embedding import TextConditions
from cfgdiff.unet import UNet

Event = Callable[[str, dict[str, Any]], None]


def data_identity(data) -> dict:
    """The training images and labels as a checkpoint records them (count and SHA-256), so that
    a resume can tell when a folder changed in between: training then goes on with the data as
    it is now, which cannot repeat the uninterrupted run exactly (the "data_changed" event)."""
    h = hashlib.sha256()
    files = data.mapped_files() if hasattr(data, "mapped_files") else None
    if files is not None:  # read from the cache files: the map's pages stay where they are
        for path in files:
            for block in data_chunks(path):
                h.update(block)
    else:
        h.update(np.ascontiguousarray(data.images.numpy()))
        h.update(np.ascontiguousarray(data.labels.numpy()))
    return {"n": len(data), "sha256": h.hexdigest()}


def make_optimizer(net: torch.nn.Module, t: Any, device: torch.device) -> torch.optim.AdamW:
    """AdamW with its fused kernel on CUDA and on the CPU: one pass over all the parameters
    instead of a loop of small ops per tensor (docs/results.md, "Training throughput")."""
    return torch.optim.AdamW(
        net.parameters(),
        lr=t.lr,
        betas=t.adam_betas,
        weight_decay=t.weight_decay,
        fused=device.type in ("cuda", "cpu"),
    )


def lr_at(step: int, t: Any, steps: int | None = None) -> float:
    """Linear warmup over warmup_steps, then constant or cosine decay to lr_min_ratio * lr at
    the run's last step (`steps`, default t.steps)."""
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return t.lr
    span = max(1, (t.steps if steps is None else steps) - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    floor = t.lr * t.lr_min_ratio
    return floor + (t.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def check_resume_compatible(saved: RunConfig, cfg: RunConfig) -> None:
    # the data first: a folder that gained a class is better told so than "num_classes=3 vs 4"
    if canonical_name(saved.dataset) != canonical_name(cfg.dataset):
        raise CheckpointError(
            f"`resume=True`: checkpoint was trained on {saved.dataset!r}, "
            f"this run asks for {cfg.dataset!r}"
        )
    if saved.class_names and cfg.class_names and saved.class_names != cfg.class_names:
        raise CheckpointError(
            f"`resume=True`: checkpoint's classes are {list(saved.class_names)}, this data's "
            f"are {list(cfg.class_names)}"
        )
    for section in ("model", "diffusion"):
        a, b = getattr(saved, section), getattr(cfg, section)
        for f in dataclasses.fields(a):
            va, vb = getattr(a, f.name), getattr(b, f.name)
            if va != vb:
                raise CheckpointError(
                    f"`resume=True`: checkpoint has {section}.{f.name}={va}, this run asks for {vb}"
                )


def _check_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Each parameter's AdamW moments have the parameter's shape and its step count is a
    scalar, so that the first optimizer step after a resume cannot fail (torch's own loading
    checks only the number of parameters)."""
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            for key, v in st.items():
                if key == "step":
                    ok = isinstance(v, torch.Tensor) and v.numel() == 1 and v.is_floating_point()
                else:
                    ok = isinstance(v, torch.Tensor) and v.shape == p.shape
                if not ok:
                    raise ValueError(f"optimizer state {key!r} does not fit its parameter")


@dataclass
class TrainState:
    cfg: RunConfig
    device: torch.device
    precision: str  # "fp32" | "bf16": autocast of the forward pass
    net: UNet
    ema: EMA
    ema_net: UNet  # the EMA weights as a network, for previews and evaluations
    opt: torch.optim.AdamW
    gen: torch.Generator  # timesteps, noise and label dropout of the training loss
    batches: DeviceBatches
    schedule: Schedule
    data_id: dict
    step: int = 0
    loss_sum: torch.Tensor | None = None  # on the device: no host sync per step
    loss_n: int = 0
    # the processes this state is one of (one, unless torchrun started several): each trains
    # on its part of the global batch; the loss sum is averaged over them before it is read
    world: dist.World = dataclasses.field(default_factory=dist.World)
    # a text model's caption table; its batches' "labels" are then the images' caption groups
    text: TextConditions | None = None

    @classmethod
    def create(
        cls, cfg: RunConfig, data, device: torch.device, precision: str,
        world: dist.World | None = None,
    ) -> TrainState:  # fmt: skip
        """A new run's state. The global RNG is seeded, then drawn from only by the networks'
        initialisation (and dropout, where the model has it) and saved in every checkpoint."""
        t = cfg.train
        world = world or dist.World()
        torch.manual_seed(t.seed)
        net = UNet(cfg.model).to(device)
        ema = EMA(net, t.ema_decay)
        opt = make_optimizer(net, t, device)
        gen = torch.Generator(device=device).manual_seed(t.seed)
        text, labels = None, data.labels
        if cfg.model.condition == "text":  # captions encoded once, here, not in the step
            folder = DatasetName.parse(data.name).folder if is_folder(data.name) else None
            own = (data.captions, data.name) if data.captions is not None else None
            text, labels = TextConditions.for_dataset(
                data.images, data.labels, data.class_names, cfg.model, folder,
                cfg.diffusion.filler_words, own,
            )  # fmt: skip
        files = data.mapped_files() if hasattr(data, "mapped_files") else None
        batches = DeviceBatches(
            data.images, labels, t.batch_size, t.seed, device, hflip=bool(t.hflip),
            part=(world.rank, world.size), rows=RowReader(files[0]) if files else None,
        )  # fmt: skip
        # before a resume restores the global RNG: its initialisation draws from it
        ema_net = UNet(cfg.model).to(device).eval()
        schedule = make_schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps)
        return cls(
            cfg, device, precision, net, ema, ema_net, opt, gen, batches, schedule,
            data_identity(data), loss_sum=torch.zeros((), device=device), world=world, text=text,
        )  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """What state.pt holds (loaded back by load, below)."""
        return {
            "step": self.step,
            "optimizer": self.opt.state_dict(),
            "ema_updates": self.ema.num_updates,
            "generator": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if self.device.type == "cuda" else None,
            "data": self.batches.state(),
            "data_identity": self.data_id,
            "loss_acc": float(self.loss_sum),
            "loss_acc_n": self.loss_n,
            # what precision="auto" resolved to, so a resume trains as the run did
            "precision": {"device": self.device.type, "precision": self.precision},
        }

    def load(self, ckpt: Path, emit: Event) -> None:
        """Continue from checkpoint `ckpt`: verified against its MANIFEST first, its config
        checked against this run's, then weights, EMA, optimizer, generators, data position,
        step and loss sum restored from the typed training record (records.parse_state)."""
        ckpt_io.verify(ckpt)
        check_resume_compatible(ckpt_io.read_config(ckpt), self.cfg)
        ckpt_io.load_weights(ckpt, "model", self.net)
        ema_net = UNet(self.cfg.model)
        ckpt_io.load_weights(ckpt, "ema", ema_net)
        state = ckpt_io.load_state(ckpt)
        path = ckpt / "state.pt"
        was = state.data_identity  # absent in checkpoints of earlier versions
        changed = was is not None and was != self.data_id
        epoch, offset = state.epoch, state.offset
        if offset >= self.batches.n:
            if not changed:  # the same images: a position past their end is not one it saved
                raise CheckpointError(
                    f"{path}: data.offset must be in [0, {self.batches.n}) for "
                    f"{self.batches.n} training images, got {offset}"
                )
            epoch, offset = epoch + 1, 0  # a folder that shrank: its next epoch
        # the hyperparameters are the config's: only the per-parameter moments come from the file
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.opt.param_groups]
        try:
            self.opt.load_state_dict(state.optimizer)
            for g, fresh in zip(self.opt.param_groups, groups, strict=True):
                g.update(fresh)
            _check_optimizer_state(self.opt)
            self.ema.load_state_dict(
                {k: v.to(self.device) for k, v in ema_net.state_dict().items()},
                state.ema_updates,
            )
            self.gen.set_state(state.generator)
            torch.set_rng_state(state.torch_rng)
            if self.device.type == "cuda" and state.cuda_rng is not None:
                torch.cuda.set_rng_state(state.cuda_rng)
        except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as e:
            first = str(e).strip().splitlines()[:1] or [type(e).__name__]
            raise CheckpointError(f"{path}: incompatible training state ({first[0]})") from None
        self.batches.load_state({"epoch": epoch, "offset": offset})
        if changed:
            emit("data_changed", {"was": was["n"], "now": self.data_id["n"]})
        self.step = state.step
        self.loss_sum += state.loss_acc
        self.loss_n = state.loss_acc_n

    def save(self, ckpt_root: Path) -> Path:
        """Write a checkpoint (rank 0's job; the caller averaged the loss sum first)."""
        return ckpt_io.save_checkpoint(
            ckpt_root,
            self.step,
            self.cfg,
            self.net.state_dict(),
            self.ema.state_dict(),
            self.state_dict(),
            self.cfg.train.keep,
        )

    def loss(self, forward: Callable, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training loss of one batch through `forward` (the network, or its compiled form),
        gradients zeroed and computed. A text model's y (caption groups) becomes embeddings."""
        w = self.world
        rows = (w.rank * x.shape[0], w.size * x.shape[0]) if w.enabled else None
        y = self.condition(y, part=rows)
        with autocast(self.device, self.precision):
            loss = training_loss(
                forward, x, y, self.schedule, self.cfg.diffusion, self.cfg.model.num_classes,
                self.gen, rows=rows,
            )  # fmt: skip
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        return loss

    def average_loss(self) -> None:
        """The loss sum <- its mean over the processes (a collective: every rank calls it at the
        same step). Averaging again later is harmless: mean(S + l_r) = S + mean(l_r)."""
        dist.mean_(self.loss_sum, self.world)

    def condition(
        self, y: torch.Tensor, gen: torch.Generator | None = None, part: tuple | None = None
    ) -> torch.Tensor:
        """The network's condition for a batch's labels: the labels themselves, or for a text
        model a caption embedding per image drawn from its group (with the training generator;
        `part`: this process's rows of the global batch, TextConditions.training_condition)."""
        if self.text is None:
            return y
        return self.text.training_condition(y, self.gen if gen is None else gen, part)

    def finish_step(self, loss: torch.Tensor) -> None:
        """After an optimizer step: the EMA follows the weights, the step counts, and its loss
        joins the sum on the device (read once per log interval, take_loss)."""
        self.ema.update(self.net)
        self.step += 1
        self.loss_sum += loss.detach()
        self.loss_n += 1

    def fix_steps(self, total: int) -> None:
        """The run's step count, fixed once a time budget has measured the speed: the config
        the checkpoints record says it, so a resume goes on to the same end."""
        train = dataclasses.replace(self.cfg.train, steps=total)
        self.cfg = dataclasses.replace(self.cfg, train=train)

    def take_loss(self) -> float:
        """The mean loss since the last call (one host sync; over all processes), and the sum
        reset."""
        self.average_loss()
        mean = float(self.loss_sum) / self.loss_n
        self.loss_sum.zero_()
        self.loss_n = 0
        return mean

    def ema_model(self) -> UNet:
        """The EMA weights as a network in eval mode (for previews and evaluations)."""
        self.ema.copy_to(self.ema_net)
        return self.ema_net
