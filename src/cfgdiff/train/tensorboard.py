"""A training run's events as TensorBoard summaries (`cfgdiff train --tensorboard`), through
torch.utils.tensorboard when the `tensorboard` package is installed (`cfgdiff[tensorboard]`).

Owns the mapping from train's events (train.loop, `on_event`) to summaries, in RUN/tensorboard:
the loss, learning rate and images/s at each log interval (`train/loss`, `train/lr`,
`train/images_per_s`), every preview grid and the final guidance strip as images
(`samples`, `guidance_strip`), and each in-training evaluation's numbers (`eval/fid`,
`eval/class_accuracy`, ...). A resumed run purges what the earlier run wrote after the step it
resumes from, as loss.csv does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cfgdiff.errors import ConfigError


def require_tensorboard() -> None:
    """Raise a one-line ConfigError unless torch.utils.tensorboard can be imported."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError(
            "`tensorboard` needs the tensorboard package: pip install 'cfgdiff[tensorboard]'"
        ) from None


class TensorBoardEvents:
    """An `on_event` listener that writes summaries into `log_dir` (made on the run's "start"
    event). `log_every`: the run's log interval, the steps whose loss is logged. Call close()
    when the run ends."""

    def __init__(self, log_dir: Path, log_every: int, flush_secs: int = 10):
        require_tensorboard()
        self.log_dir, self.log_every, self.flush_secs = Path(log_dir), log_every, flush_secs
        self.writer = None
        self.total: int | None = None
        self.step = 0

    def __call__(self, name: str, info: dict[str, Any]) -> None:
        handler = getattr(self, f"_on_{name}", None)
        if handler is not None:
            handler(info)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _on_start(self, info) -> None:
        from torch.utils.tensorboard import SummaryWriter

        step = self.step = info["step"]
        self.total = info["total"]
        self.writer = SummaryWriter(
            str(self.log_dir), purge_step=step + 1 if step else None, flush_secs=self.flush_secs
        )

    def _on_schedule(self, info) -> None:
        self.total = info["total"]

    def _on_step(self, info) -> None:
        step = self.step = info["step"]
        if self.writer is None or info["loss"] is None:
            return
        if step % self.log_every == 0 or step == self.total:
            self.writer.add_scalar("train/loss", info["loss"], step)
            self.writer.add_scalar("train/lr", info["lr"], step)
            self.writer.add_scalar("train/images_per_s", info["images_per_s"], step)

    def _on_eval(self, info) -> None:
        if self.writer is None:
            return
        step = info["step"]
        for key, value in info.items():
            if key != "step" and isinstance(value, int | float):
                self.writer.add_scalar(f"eval/{key}", value, step)

    def _image(self, tag: str, path: str, step: int) -> None:
        import numpy as np
        from PIL import Image

        if self.writer is None:
            return
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"))
        self.writer.add_image(tag, arr, step, dataformats="HWC")

    def _on_sample(self, info) -> None:
        self._image("samples", info["path"], info["step"])

    def _on_strip(self, info) -> None:
        self._image("guidance_strip", info["path"], self.step)

    def _on_checkpoint(self, info) -> None:
        if self.writer is not None:
            self.writer.flush()
