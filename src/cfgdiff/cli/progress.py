"""How a training run looks on a terminal: its events (train's `on_event`) as a progress bar
or log lines on stderr, and Ctrl-C / SIGTERM as a request to stop after the step."""

from __future__ import annotations

import signal
import sys
from typing import Any

from cfgdiff.cli.options import flag_words


def log(msg: str) -> None:
    """A line on stderr; the library's notes name parameters, said here as flags."""
    print(f"cfgdiff: {flag_words(msg)}", file=sys.stderr)


class StopFlag:
    """First SIGINT/SIGTERM: finish the step, checkpoint, exit 0. Second SIGINT: stop at once."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log(
            "stop requested: finishing this step and writing a checkpoint "
            "(Ctrl-C again to quit now)"
        )

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def __call__(self) -> bool:
        return self.requested


class TrainProgress:
    """train's events on stderr: a tqdm bar on a terminal (notes written above it), else a line
    every `log_every` steps. `images`, `machine`: for the start line; `time_budget`: the seconds
    a --time run was given; `preview_scale`: the scale its evaluations sample at."""

    def __init__(self, *, bar: bool, log_every: int, images: int, machine: str,
                 time_budget: float | None, preview_scale: float, world=None):  # fmt: skip
        self.show, self.log_every, self.images, self.machine = bar, log_every, images, machine
        self.time_budget, self.preview_scale = time_budget, preview_scale
        self.bar = None
        self.total: int | str = "?"
        self.world = world  # dist.World of a torchrun job, for the start line

    def note(self, msg: str) -> None:
        """A line on stderr above the progress bar (tqdm.write defaults to stdout)."""
        if self.bar is not None:
            self.bar.write(f"cfgdiff: {flag_words(msg)}", file=sys.stderr)
        else:
            log(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __call__(self, name: str, info: dict[str, Any]) -> None:
        getattr(self, f"on_{name}", lambda info: None)(info)

    def on_start(self, info) -> None:
        self.total = "?" if self.time_budget is not None else info["total"]
        end = info["total"] or f"sized to --time {self.time_budget:g} s after 25 steps"
        log(
            f"training {info['params'] / 1e6:.2f}M parameters on {info['device']}: "
            f"{self.machine}, {info['precision']}, {self.images} images, step {info['step']} "
            f"-> {end}"
        )
        if info.get("data"):
            log(info["data"])
        if self.world is not None and self.world.enabled:
            log(
                f"{self.world.size} processes: global batch {info['batch_size']} = "
                f"{info['batch_size_per_rank']} per process x {self.world.size}"
            )
        if self.show:
            from tqdm import tqdm

            self.bar = tqdm(
                total=info["total"], initial=info["step"], unit="step", dynamic_ncols=True,
                file=sys.stderr,
            )  # fmt: skip

    def on_schedule(self, info) -> None:
        self.total = info["total"]
        if self.bar is not None:
            self.bar.total = info["total"]
        self.note(
            f"--time {info['budget_s']:g} s: {info['total']} steps "
            f"({info['steps_per_s']:.2f} steps/s over steps 5-25)"
        )

    def on_step(self, info) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if info["loss"] is not None:
                self.bar.set_postfix(
                    loss=f"{info['loss']:.4f}", img_s=f"{info['images_per_s']:.0f}", refresh=False
                )
        elif not self.show and info["step"] % self.log_every == 0 and info["loss"] is not None:
            log(
                f"step {info['step']}/{self.total} loss {info['loss']:.4f} "
                f"{info['images_per_s']:.0f} img/s"
            )

    def on_sample(self, info) -> None:
        if self.bar is None:
            log(f"sample: {info['path']}")

    def on_checkpoint(self, info) -> None:
        if self.bar is None:
            log(f"checkpoint: {info['path']}")

    def on_strip(self, info) -> None:
        if self.bar is None:
            log(f"strip: {info['path']}")

    def on_skip(self, info) -> None:
        self.note(
            f"skipped a batch with a non-finite loss at step {info['step']} "
            f"({info['skipped']} so far)"
        )

    def on_compile(self, info) -> None:
        if info["ok"]:
            self.note(f"torch.compile: gradients match eager ({info['check']})")
        else:
            self.note(f"torch.compile not used, training eagerly: {info['error']}")

    def on_note(self, info) -> None:
        self.note(info["text"])

    def on_checkpoint_skipped(self, info) -> None:
        self.note(info["text"])  # the resume's line for a checkpoint.Skipped

    def on_data_changed(self, info) -> None:
        self.note(
            f"--resume: the training data changed since the checkpoint ({info['was']:,} images "
            f"then, {info['now']:,} now); training goes on with the data as it is now, so the "
            "run will not repeat an uninterrupted one exactly"
        )

    def on_eval(self, info) -> None:
        self.note(
            f"eval at step {info['step']}: FID {info['fid']:.3f}, class accuracy "
            f"{info['class_accuracy']:.4f} (s={self.preview_scale:g})"
        )
