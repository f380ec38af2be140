"""What the web page's tests share: a digit 'model' whose samples the shipped MNIST judge can
read, made without MNIST (the tests never download it), a server started on a free loopback
port, and reading the grids the page shows.

The model is a closed-form denoiser: each class is a narrow Gaussian around a digit drawn with
Pillow's own font, x0 | c ~ N(T_c, tau^2 I). Then x_t | c ~ N(a T_c, v I) with
v = a^2 tau^2 + s^2, E[eps | x_t, c] = s (x_t - a T_c) / v, and the null label gets the
mixture's E[eps | x_t] = sum_c p(c | x_t) E[eps | x_t, c]; so guidance, samplers, previews and
the judge all see what a trained digit model would give them.
"""

from __future__ import annotations

import dataclasses
import http.client
import io
import json
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from cfgdiff.diffusion import alpha_sigma
from cfgdiff.presets import PRESETS
from cfgdiff.schedule import make_schedule


def digit_templates(size: int = 28) -> torch.Tensor:
    """The digits 0-9 drawn white on black in Pillow's default font, uint8 (10, 1, size, size)."""
    font = ImageFont.load_default(size=18 * size // 28)
    out = []
    for c in range(10):
        img = Image.new("L", (size, size), 0)
        ImageDraw.Draw(img).text((size / 2, size / 2), str(c), fill=255, font=font, anchor="mm")
        out.append(np.asarray(img))
    return torch.from_numpy(np.stack(out))[:, None]


class DigitsOracle:
    """f(x_t, t, y) -> the exact eps for classes N(T_c, tau^2 I); y = 10 is the null label.
    `delay`: seconds each call waits, to stand in for a network's time."""

    def __init__(self, cfg, tau: float = 0.05, delay: float = 0.0):
        self.schedule = make_schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps)
        self.means = digit_templates(cfg.model.image_size).float() / 127.5 - 1
        self.tau, self.delay = tau, delay

    def __call__(self, x, t, y):
        if self.delay:
            time.sleep(self.delay)
        a, s = alpha_sigma(self.schedule, t, x)
        v = a**2 * self.tau**2 + s**2
        mu = self.means.to(x)
        e_c = s * (x - a * mu[y.clamp(max=9)]) / v
        d = x.unsqueeze(1) - a.unsqueeze(1) * mu.unsqueeze(0)  # (B, 10, C, H, W)
        logp = -(d**2).flatten(2).sum(-1) / (2 * v.flatten())[:, None]
        w = torch.softmax(logp, dim=1).reshape(*logp.shape, 1, 1, 1)
        e_u = (w * d).sum(1) * s / v
        return torch.where((y == 10).reshape(-1, 1, 1, 1), e_u, e_c)


def digits_config():
    """A RunConfig of 28x28 one-channel digits named "0".."9" (cpu-demo's diffusion)."""
    base = PRESETS["cpu-demo"]
    model = dataclasses.replace(base.model, in_channels=1, image_size=28, num_classes=10)
    return dataclasses.replace(
        base, model=model, dataset="mnist", class_names=tuple(str(c) for c in range(10))
    )


def grid_cells(png: bytes, n: int, label: str, size: int = 28, upscale: int = 2) -> torch.Tensor:
    """The n images of a one-row grid as viz.labelled_grid draws it (row label `label`, pad 2),
    uint8 (n, 1, size, size)."""
    img = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    left = 8 + 7 * len(label)
    cells = []
    for k in range(n):
        x0, y0 = left + upscale * (2 + k * (size + 2)), upscale * 2
        cell = img[y0 : y0 + size * upscale : upscale, x0 : x0 + size * upscale : upscale]
        cells.append(cell)
    return torch.from_numpy(np.stack(cells).copy())[:, None]


def judge_digits(images: torch.Tensor) -> torch.Tensor:
    """The shipped MNIST judge's logits for uint8 (N, 1, 28, 28) images."""
    from cfgdiff.metrics.classifier import predict, shipped_judge

    net, _ = shipped_judge("mnist")
    return predict(net, images)


def host_port(url: str) -> tuple[str, int]:
    host, port = url.split("//")[1].strip("/").rsplit(":", 1)
    return host, int(port)


def request(url: str, method: str, path: str, body=None, headers=None, timeout: float = 60):
    """(status, headers, body bytes) of one request; a dict body is sent as JSON."""
    host, port = host_port(url)
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    hdrs = dict(headers or {})
    if isinstance(body, dict | list):
        body = json.dumps(body)
        hdrs.setdefault("Content-Type", "application/json")
    c.request(method, path, body=body, headers=hdrs)
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, dict(r.getheaders()), data


def events(data: bytes) -> list[dict]:
    """The events of a text/event-stream body."""
    out = []
    for chunk in data.decode().split("\n\n"):
        for line in chunk.split("\n"):
            if line.startswith("data: "):
                out.append(json.loads(line[6:]))
    return out


def train_text_run(root, steps: int = 3):
    """A tiny text checkpoint of a 3-class folder (class0..class2, no captions file: captions
    of the class names), trained for a few steps; needs the `text` extra's encoder."""
    from conftest import image_folder

    from cfgdiff.cli import main

    folder = image_folder(root / "folder", 6)
    out = root / "run"
    argv = ["train", "--condition", "text", "--dataset", f"folder:{folder}", "--preset", "tiny",
            "--out", str(out), "--steps", str(steps), "--no-progress", "--precision", "fp32",
            "--sample-every", "0"]  # fmt: skip
    assert main(argv) == 0
    return out


def text_engine_model(run):
    """serve.jobs.Model of a text run, with its caption table (as `cfgdiff serve` loads it)."""
    from cfgdiff.checkpoint import load_for_sampling
    from cfgdiff.serve.jobs import Model
    from cfgdiff.text.embedding import run_caption_table

    loaded = load_for_sampling(run)
    return Model(loaded.net, loaded.cfg, str(loaded.path), run_caption_table(loaded.path))
