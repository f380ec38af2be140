"""The page of `cfgdiff export --format web` against cfgdiff's own samplers, pixel for pixel.

Exports a checkpoint's page (onnxruntime-web fetched with npm into the cache, or --ort), serves
it from 127.0.0.1, and drives it in Debian's headless Chromium (Playwright): for every class,
guidance scale and sampler it sets the page's boxes, clicks the class and reads the canvas;
cfgdiff samples the same image in PyTorch (fp32, CPU) from the page's seeded noise
(cfgdiff.export.web.seed_noise). Prints, per sampler and scale, how many uint8 levels the two
differ by (the share of pixels equal, within 1 and within 2 levels, and the worst pixel), and
the page's time per image.

    python bench/web_export.py --checkpoint runs/demo [--steps 20] [--scales 0,1,3,6]
"""

from __future__ import annotations

import argparse
import functools
import http.server
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

from cfgdiff.checkpoint import load_for_sampling
from cfgdiff.export import export
from cfgdiff.export.web import seed_noise
from cfgdiff.sampling.generate import to_uint8
from cfgdiff.sampling.guidance import guided_denoiser
from cfgdiff.sampling.samplers import run_sampler
from cfgdiff.schedule import make_schedule

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


class Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {
        **http.server.SimpleHTTPRequestHandler.extensions_map,
        ".wasm": "application/wasm", ".mjs": "text/javascript", ".js": "text/javascript",
    }  # fmt: skip

    def log_message(self, *args):
        pass


def reference(loaded, label, scale, sampler, steps, seed) -> np.ndarray:
    cfg = loaded.cfg
    m = cfg.model
    schedule = make_schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps)
    x_T = torch.from_numpy(seed_noise(seed, (m.in_channels, m.image_size, m.image_size)))[None]
    with torch.inference_mode():
        denoise = guided_denoiser(
            loaded.net, torch.tensor([label]), schedule, null_label=m.num_classes,
            prediction=cfg.diffusion.prediction, scale=scale,
        )  # fmt: skip
        x0 = run_sampler(sampler, denoise, x_T, schedule, steps, spacing=cfg.sampling.spacing)
    return to_uint8(x0)[0].numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--scales", default="0,1,3,6")
    p.add_argument("--ort", type=Path, default=None)
    a = p.parse_args()
    from playwright.sync_api import sync_playwright

    loaded = load_for_sampling(a.checkpoint)
    m = loaded.cfg.model
    scales = [float(s) for s in a.scales.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "page"
        export(a.checkpoint, out, "web", ort=a.ort)
        server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(out))
        )
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        rows: dict[tuple[str, float], list] = {}
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page()
            page.goto(url)
            page.wait_for_selector("#status[data-state=ready]", timeout=120_000)
            page.fill("#steps", str(a.steps))
            for sampler in ("ddim", "dpmpp-2m"):
                page.select_option("#sampler", sampler)
                for scale in scales:
                    page.evaluate(
                        "(s) => { const e = document.getElementById('scale'); e.value = s; "
                        "e.dispatchEvent(new Event('input')); }",
                        scale,
                    )
                    for label in range(m.num_classes):
                        seed = 1000 * label + 17
                        page.fill("#seed", str(seed))
                        page.click(f"#classes button[data-class='{label}']")
                        page.wait_for_selector("#status[data-state=done]", timeout=300_000)
                        secs = float(page.inner_text("#status").split()[2])
                        rgba = page.evaluate(
                            "() => { const c = document.getElementById('image'); return "
                            "Array.from(c.getContext('2d').getImageData(0, 0, c.width, "
                            "c.height).data); }"
                        )
                        h = w = m.image_size
                        got = np.array(rgba, np.uint8).reshape(h, w, 4)[..., :3].transpose(2, 0, 1)
                        got = got[:1] if m.in_channels == 1 else got
                        want = reference(loaded, label, scale, sampler, a.steps, seed)
                        diff = np.abs(got.astype(int) - want.astype(int))
                        rows.setdefault((sampler, scale), []).append((diff, secs))
            browser.close()
        server.shutdown()
    print(
        f"{a.checkpoint}: {m.num_classes} classes x 1 image each, {a.steps} steps, page "
        "(onnxruntime-web, WebAssembly, 1 thread, headless Chromium) vs cfgdiff (PyTorch fp32)"
    )
    print(f"{'sampler':9s} {'s':>4s} {'=':>7s} {'<=1':>7s} {'<=2':>7s} {'worst':>5s} {'s/img':>6s}")
    for (sampler, scale), got in rows.items():
        d = np.concatenate([x.ravel() for x, _ in got])
        secs = np.mean([s for _, s in got])
        print(
            f"{sampler:9s} {scale:4g} {(d == 0).mean():7.2%} {(d <= 1).mean():7.2%} "
            f"{(d <= 2).mean():7.2%} {d.max():5d} {secs:6.2f}"
        )
    every = np.concatenate([x.ravel() for got in rows.values() for x, _ in got])
    print(
        f"all {every.size} pixels: {(every == 0).mean():.2%} equal, {(every <= 1).mean():.2%} "
        f"within 1 level, {(every <= 2).mean():.2%} within 2, worst {every.max()}"
    )


if __name__ == "__main__":
    main()
