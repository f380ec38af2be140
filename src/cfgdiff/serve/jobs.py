"""The work behind the page, without the web: a request's settings checked against the model
and the limits, one generation at a time per model with a small queue, and the events a job
sends (queued, and again when its place changes; started; previews of the predicted x0, a PNG
per image for the page's gallery; the final images, the grid PNG and the command that
reproduces it; or why it stopped). A class model is asked for a class (and a negative class);
a text model for a prompt (and a negative prompt, the reference of the guidance in place of
the null, as `cfgdiff sample --negative-prompt`): embedded when the request is checked (the
run's caption table, else the encoder the engine holds), so a prompt the model cannot read is
refused before it waits.

Everything here is a thin layer over the library's sampling request (sampling.request.job_for:
the same rows, reference and settings as `cfgdiff sample`) and generate's per-step callback: a
preview is the callback's x0_hat every few steps, a cancel is the callback raising, the final
PNG is the grid `cfgdiff sample --out FILE.png` writes for the same settings
(pictures.images.labelled_grid), and the command is that `cfgdiff sample` command. The sampler
settings a request may give (sampler, steps, seed), their bounds and their flags in the command
are SamplingSettings' own declaration; a request that gives none gets the model's own sampler.
"""

from __future__ import annotations

import base64
import dataclasses
import math
import secrets
import shlex
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cfgdiff.config import RunConfig
from cfgdiff.errors import CfgDiffError, ConfigError
from cfgdiff.pictures.images import grid_image, labelled_grid, png_bytes
from cfgdiff.sampling.conditions import Asks, Model
from cfgdiff.sampling.generate import generate, to_uint8
from cfgdiff.sampling.guidance import Guidance
from cfgdiff.sampling.request import SampleRequest, job_for
from cfgdiff.sampling.settings import SamplingSettings, flag
from cfgdiff.serve.schema import (
    CLASS_FIELDS,
    MAX_PROMPT_CHARS,
    MAX_SCALE,
    MAX_SEED,
    SETTINGS_FIELDS,
    TEXT_FIELDS,
    RequestError,
    schema,
    shown,
)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how many may wait. `max_image_steps` bounds the work
    of a request (images x sampler steps; a strip counts every cell), `max_images` the images
    (and so the memory) of one batch, `queue` the requests that may wait behind the running
    one (more are refused), `previews` about how many preview frames a request gets."""

    max_images: int = 32
    max_image_steps: int = 4000
    max_steps: int = 250
    max_scales: int = 8
    queue: int = 4
    previews: int = 12

    def validate(self) -> None:
        for name in ("max_images", "max_image_steps", "max_steps", "max_scales", "previews"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if self.queue < 0:
            raise ConfigError(f"`queue` must be >= 0, got {self.queue}")


@dataclass(frozen=True)
class Settings:
    """One checked request. mode "images": `n` images of the row `asks` asks for (a class or
    a prompt, and its reference) at `scale`; mode "strip": `n` images at each of `scales`, the
    same noise at every scale. `sampling`: the sampler settings it gave (None: the model's)."""

    asks: Asks
    scale: float
    sampling: SamplingSettings
    n: int
    mode: str = "images"
    scales: tuple[float, ...] = ()
    interval: tuple[float, float] | None = None

    @property
    def columns(self) -> tuple[float, ...]:
        return self.scales if self.mode == "strip" else (self.scale,)

    @property
    def images(self) -> int:
        return self.n * len(self.columns)

    def fields(self, names: list[str]) -> dict:
        """The request as the page's fields (`names`: the model's class names), resolved
        settings included: what a finished job reports."""
        a = self.asks
        return {
            "class": names.index(a.classes[0]) if a.classes else None,
            "prompt": a.prompts[0] if a.prompts else None, "scale": self.scale,
            **{k: getattr(self.sampling, k) for k in SETTINGS_FIELDS}, "n": self.n,
            "mode": self.mode, "scales": list(self.scales), "negative_class": a.negative_class,
            "negative_prompt": a.negative_prompt,
            "interval": list(self.interval) if self.interval else None,
        }  # fmt: skip


def parse_settings(body: Any, cfg: RunConfig, limits: Limits) -> Settings:
    """A request body (parsed JSON) for a model of `cfg`, checked field by field against its
    schema (schema.schema); a RequestError naming the field (its label, then its API name) for
    the first thing wrong. Nothing in a body names a file. A text model reads prompts
    (`prompt`, `negative_prompt`) in place of class labels."""
    names = cfg.label_names()
    text = cfg.model.condition == "text"
    if not isinstance(body, dict):
        raise RequestError("the request must be a JSON object")
    fields = schema(cfg, limits)
    for key in body:
        if key in (CLASS_FIELDS if text else TEXT_FIELDS):
            label = key.replace("_", " ")  # the page's label of each
            raise RequestError(
                f"{label}: this model reads prompts; give a prompt"
                if text
                else f"{label}: this model takes class labels; give a class",
                key,
            )
        if key not in fields:
            raise RequestError(f"unknown field {shown(str(key))} (allowed: {', '.join(fields)})")
    got = {name: f.read(body) for name, f in fields.items()}
    if text:
        asks = Asks(prompts=(got["prompt"],), negative_prompt=got["negative_prompt"])
    else:
        asks = Asks(classes=(names[got["class"]],), negative_class=got["negative_class"])
    sampling = SamplingSettings(**{k: got[k] for k in SETTINGS_FIELDS if got[k] is not None})
    scales: tuple[float, ...] = ()
    if got["mode"] == "strip":
        if got["scales"] is None:
            raise RequestError(
                f"strip scales: is empty; give {fields['scales'].allowed()}", "scales"
            )
        scales = got["scales"]
    s = Settings(asks, got["scale"], sampling, got["n"], got["mode"], scales, got["interval"])
    steps = sampling.steps or cfg.sampling.steps  # none given: the model's own
    if s.images > limits.max_images:
        raise RequestError(
            f"images × strip scales: at most {limits.max_images} images a request, got "
            f"{s.n} × {len(s.columns)} = {s.images}",
            "n",
        )
    if s.images * steps > limits.max_image_steps:
        raise RequestError(
            f"images × steps: at most {limits.max_image_steps} image-steps a request, got "
            f"{s.images} × {steps} = {s.images * steps}",
            "n",
        )
    return s


def _number_word(v: float) -> str:
    """A float as the shortest text that reads back as it (3 for 3.0)."""
    short = f"{v:g}"
    return short if float(short) == v else repr(v)


def sample_command(checkpoint: str, names: list[str], s: Settings, settings) -> list[str]:
    """The `cfgdiff sample` commands that write this request's images, one per scale (a strip
    has several): each writes the grid of that scale's images, as the page shows it for mode
    "images"; a strip's columns are the same images, sampled in one batch. `settings`: the
    job's resolved SamplingSettings, said with their own flags."""
    a = s.asks
    if a.prompts:  # `--prompt=P`: a prompt that starts with "-" is not an option
        cls = [f"--prompt={a.prompts[0]}"]
    else:  # by name where `--classes` can say it (it splits on commas and strips), else index
        name = a.classes[0]
        word = name if "," not in name and name.strip() == name and name else None
        word = word or str(names.index(name))
        cls = ["--classes", word] if not word.startswith("-") else [f"--classes={word}"]
    flags = []
    for k in SETTINGS_FIELDS:
        flags += [flag(k), str(getattr(settings, k))]
    out = []
    for scale in s.columns:
        words = [
            "cfgdiff", "sample", "--checkpoint", checkpoint, "--scale", _number_word(scale),
            *cls, "--per-class", str(s.n), *flags,
        ]  # fmt: skip
        if a.negative_class is not None:
            words += ["--negative-class", str(a.negative_class)]
        if a.negative_prompt is not None:
            words += [f"--negative-prompt={a.negative_prompt}"]
        if s.interval is not None:
            words += ["--guidance-interval", ",".join(_number_word(v) for v in s.interval)]
        name = "sample.png" if s.mode == "images" else f"strip-s{_number_word(scale)}.png"
        words += [flag("precision"), settings.precision, flag("backend"), settings.backend]
        words += ["--out", name]
        out.append(shlex.join(words))
    return out


class Busy(CfgDiffError):
    """The queue is full, or the engine is stopping: the request is refused, nothing was
    started."""


class Cancelled(Exception):
    """Raised in generate's callback to stop a job that was cancelled."""


Sink = Callable[[dict], None]


class Job:
    """One request: its settings, where its events go (`sink`: called from either thread, and
    must not block), and whether it was cancelled. Events are dicts with a "type": queued (again
    whenever the number ahead of it changes), started, preview, then one of done, cancelled or
    error."""

    def __init__(self, settings: Settings, sink: Sink):
        self.id = secrets.token_hex(8)
        self.settings = settings
        self.sink = sink
        self._cancel = threading.Event()
        self.steps_done = 0
        self.state = "queued"
        self.ahead = 0

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()


def _cells(images: torch.Tensor) -> list[str]:
    """Each image of uint8 (N, C, H, W) as a base64 PNG of its own, for the page's gallery."""
    return [base64.b64encode(png_bytes(grid_image(im[None], 1, pad=0))).decode() for im in images]


class Engine:
    """One model, one worker thread: requests run one at a time in order, at most
    `limits.queue` wait behind the running one, and a request beyond that is refused (Busy)
    at once, so a burst costs neither memory nor time. A waiting job that is cancelled leaves
    the queue at once (its slot is free for the next request), and every job behind it is
    told its new place. `stop` refuses new requests and ends every job with a final event
    that says why; `close` also waits for the worker."""

    def __init__(
        self,
        model: Model,
        limits: Limits = Limits(),
        device="cpu",
        precision: str = "fp32",
        backend: str = "torch",
    ):
        limits.validate()
        self.model, self.limits = model, limits
        self.device, self.precision = torch.device(device), precision
        # what runs the network (SamplingSettings.backend); "auto" is decided by warm_up, once
        # for every request: a page's request is too short to repay a measurement of its own
        self.backend, self.backend_reason = backend, "as asked"
        if backend == "onnxruntime":  # it runs fp32 only
            self.precision = "fp32"
        self.names = model.cfg.label_names()
        self.text = model.cfg.model.condition == "text"
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: deque[Job] = deque()
        self._stopping: str | None = None  # why new requests are refused, once stopping
        self.running: Job | None = None
        self.counts = {"done": 0, "cancelled": 0, "error": 0, "refused": 0}
        self._jobs: dict[str, Job] = {}
        self._thread = threading.Thread(target=self._work, name="cfgdiff-serve", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ the web side's calls

    def info(self) -> dict:
        """What the page needs to draw its controls: the model, and the request's fields with
        their labels and bounds (schema.schema)."""
        cfg, lim = self.model.cfg, self.limits
        m = cfg.model
        fields = schema(cfg, lim)
        return {
            "condition": m.condition, "examples": self.examples(),
            "max_prompt_chars": MAX_PROMPT_CHARS,
            "classes": self.names, "image_size": m.image_size, "channels": m.in_channels,
            "samplers": list(fields["sampler"].choices), "sampler": cfg.sampling.sampler,
            "steps": cfg.sampling.steps,
            "max_steps": min(lim.max_steps, cfg.diffusion.timesteps),
            "max_images": lim.max_images, "max_image_steps": lim.max_image_steps,
            "max_scales": lim.max_scales, "max_scale": MAX_SCALE, "max_seed": MAX_SEED,
            "checkpoint": str(self.model.path), "dataset": cfg.dataset,
            "device": str(self.device), "precision": self.precision, "backend": self.backend,
            "fields": {name: f.public() for name, f in fields.items()},
        }  # fmt: skip

    def examples(self) -> list[str]:
        """A text model's example prompts, one per class: its name, a digit's as a word
        ("seven", "Sneaker"; what `cfgdiff sample` draws without --prompt); [] for a class
        model."""
        from cfgdiff.text.captions import class_words

        return class_words(self.names) if self.text else []

    def parse(self, body: Any) -> Settings:
        """A request checked (parse_settings) and made into its sampling job, so that what the
        model cannot do (a prompt it cannot read: too many tokens, no encoder) is refused
        before it waits, as a RequestError naming the prompt; the prompts' embeddings are kept
        for the job."""
        s = parse_settings(body, self.model.cfg, self.limits)
        try:
            self.job_of(s)
        except ConfigError as e:  # what the prompt (or class) asks cannot be had
            field = "prompt" if s.asks.prompts else "class"
            raise RequestError(f"{field}: {e}", field) from None
        return s

    def job_of(self, s: Settings):
        """The library's sampling job of a checked request (sampling.request.job_for): the
        rows, reference and settings `cfgdiff sample` would take for the same flags."""
        settings = dataclasses.replace(
            s.sampling,
            batch_size=s.images,
            device=str(self.device),
            precision=self.precision,
            backend=self.backend,
        )
        req = SampleRequest(
            checkpoint=self.model.path, per_class=s.n, guidance=Guidance(interval=s.interval),
            settings=settings,
        )  # fmt: skip
        return job_for(self.model, s.asks, req, s.scale)

    def submit(self, settings: Settings, sink: Sink) -> Job:
        """Queue a job, or raise Busy when `limits.queue` jobs already wait (the running one
        does not count) or the engine is stopping."""
        job = Job(settings, sink)
        with self._lock:
            if self._stopping is not None:
                self.counts["refused"] += 1
                raise Busy(f"{self._stopping}; try again once it is back")
            waiting = len(self._waiting)
            if waiting >= self.limits.queue and (self.running or waiting):
                self.counts["refused"] += 1
                raise Busy(
                    f"busy: {waiting} request(s) already wait behind the one running; "
                    "try again when one is done"
                )
            self._waiting.append(job)
            self._jobs[job.id] = job
            job.ahead = waiting + (self.running is not None)
            # under the lock: the worker cannot start it before it is told it is queued
            job.sink({"type": "queued", "job": job.id, "ahead": job.ahead})
            self._wake.notify()
        return job

    def cancel(self, job_id: str, reason: str | None = None) -> bool:
        """Cancel a waiting or running job by its id: a waiting one leaves the queue at once,
        a running one stops at its next step. False when no such job waits or runs. `reason`:
        what the final event says, where it is not the client's own cancel."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return False
            job.cancel()
            if job.state != "queued":
                return True
            self._waiting.remove(job)
            self._reposition()
        self._finish(job, self._cancelled(job, reason))
        return True

    def status(self) -> dict:
        with self._lock:
            running = self.running
            return {
                "running": None if running is None else running.id,
                "running_steps_done": None if running is None else running.steps_done,
                "waiting": len(self._waiting),
                **self.counts,
            }

    def stop(self, reason: str = "the server is stopping") -> None:
        """Refuse new requests and end every job: the waiting ones at once, the running one at
        its next step, each with a final "cancelled" event that gives `reason`. Does not
        block, so it may be called from the server's event loop."""
        with self._lock:
            if self._stopping is None:
                self._stopping = reason
            jobs = list(self._jobs.values())
            self._wake.notify_all()
        for job in jobs:
            self.cancel(job.id, reason)

    def close(self) -> None:
        """stop(), then wait for the worker to end."""
        self.stop()
        self._thread.join(timeout=30)

    def choose_backend(self) -> None:
        """Decide a backend left "auto" for every request to come (sampling.backends.choose),
        measured on the page's default request, one image guided."""
        from cfgdiff.sampling.backends import choose

        settings = SamplingSettings(
            device=str(self.device), precision=self.precision, backend=self.backend
        ).resolve(self.model.cfg, self.device)
        choice = choose(self.model.net, self.model.cfg, settings, 1, True, min_image_steps=0)
        self.backend, self.backend_reason = choice.backend, choice.reason
        self.precision = settings.with_backend(choice.backend).precision

    def backend_words(self) -> str:
        """What runs the network, in which precision, and why (SamplingJob.backend_words)."""
        return f"{self.backend} {self.precision} ({self.backend_reason})"

    def warm_up(self) -> None:
        """One small guided generation, so that the first request does not pay for the first
        network call (memory allocation, kernel selection; ONNX Runtime's conversion). A
        backend left "auto" is decided first (choose_backend)."""
        if self.backend == "auto":
            self.choose_backend()
        c = torch.zeros(1, dtype=torch.long)
        if self.text:  # and the encoder, when it can be had (else new prompts are refused)
            c = self.model.embed(self.examples()[:1])
            try:
                self.model.load_encoder()
            except CfgDiffError:
                pass
        settings = SamplingSettings(
            steps=2,
            batch_size=1,
            device=str(self.device),
            precision=self.precision,
            backend=self.backend,
        )
        generate(self.model.net, self.model.cfg, c, settings=settings, guidance=Guidance(scale=2.0))

    # ------------------------------------------------------------ the worker thread

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and self._stopping is None:
                    self._wake.wait()
                if not self._waiting:
                    return
                job = self._waiting.popleft()
                self.running, job.state = job, "running"
                self._reposition()
            try:
                self._run(job)
            finally:
                with self._lock:
                    self.running = None

    def _reposition(self) -> None:
        """Tell each waiting job its place, where it changed (under the lock)."""
        for i, job in enumerate(self._waiting):
            ahead = i + (self.running is not None)
            if job.ahead != ahead:
                job.ahead = ahead
                job.sink({"type": "queued", "job": job.id, "ahead": ahead})

    def _cancelled(self, job: Job, reason: str | None) -> dict:
        event = {"type": "cancelled", "job": job.id, "step": job.steps_done}
        reason = reason or self._stopping
        return {**event, "reason": reason} if reason else event

    def _finish(self, job: Job, event: dict) -> None:
        """The job's last event, sent once the engine's state says it is over."""
        with self._lock:
            job.state = event["type"]
            self.counts[event["type"]] += 1
            self._jobs.pop(job.id, None)
            if self.running is job:
                self.running = None
        job.sink(event)

    def _run(self, job: Job) -> None:
        s = job.settings
        sampling = self.job_of(s)  # its prompts' embeddings are kept since parse
        cols, steps = s.columns, sampling.settings.steps
        # image i of column k is noise stream i: the stream `cfgdiff sample` gives image i
        indices = [i for i in range(s.n) for _ in cols]
        guidance = sampling.guidance
        if s.mode == "strip":
            per = torch.tensor([c for _ in range(s.n) for c in cols], dtype=torch.float32)
            guidance = dataclasses.replace(guidance, scale=per)
        every = max(1, math.ceil(steps / self.limits.previews))
        name = sampling.condition.row_labels()[0]
        row_names = [name] + [""] * (s.n - 1 if s.mode == "strip" else 0)
        col_names = [f"s={c:g}" for c in cols] if s.mode == "strip" else None
        ncols = s.n if s.mode == "images" else len(cols)

        def picture(images: torch.Tensor) -> str:
            grid = labelled_grid(images, ncols, row_names, col_names)
            return base64.b64encode(png_bytes(grid)).decode()

        def step(i, t, x_t, x0_hat):
            job.steps_done = i + 1
            if job.cancelled:
                raise Cancelled
            if i == 0 or ((i + 1) % every == 0 and i + 1 < steps):
                job.sink({
                    "type": "preview", "job": job.id, "step": i + 1, "steps": steps,
                    "t": int(t), "images": _cells(to_uint8(x0_hat).cpu()),
                })  # fmt: skip

        job.sink({"type": "started", "job": job.id, "steps": steps, "images": s.images})
        t0 = time.perf_counter()
        try:
            images = generate(
                self.model.net, self.model.cfg, sampling.condition.cond.repeat_interleave(
                    s.images, dim=0), settings=sampling.settings, guidance=guidance,
                indices=indices, callback=step,
            )  # fmt: skip
        except Cancelled:
            self._finish(job, self._cancelled(job, None))
            return
        except CfgDiffError as e:
            self._finish(job, {"type": "error", "job": job.id, "error": str(e)})
            return
        except Exception as e:  # out of memory and the like: this job fails, the server stays
            from cfgdiff.runtime import error_line

            self._finish(job, {"type": "error", "job": job.id, "error": error_line(e)})
            return
        dt = time.perf_counter() - t0
        self._finish(job, {
            "type": "done", "job": job.id, "png": picture(images), "images": _cells(images),
            "seconds": round(dt, 3),
            "images_per_s": round(s.images / max(dt, 1e-9), 2),
            "commands": sample_command(str(self.model.path), self.names, s, sampling.settings),
            "settings": {**s.fields(self.names), **{
                k: getattr(sampling.settings, k) for k in SETTINGS_FIELDS}},
        })  # fmt: skip
