"""The page of `cfgdiff serve` in a real browser: Debian's headless Chromium driven by Playwright
(the Makefile's install-test installs both; the test skips, saying why, only where they cannot
be had).

It serves a digit model on a free loopback port, clicks a class, moves the slider, sees preview
frames and a final image whose class the shipped MNIST judge confirms, checks the command it
shows, draws a strip with a negative class, shows a bad value's one-line reason, cancels a
second request (the server stops its work) and saves screenshots: serve.png and
serve-strip.png in tmp_path, and also in $CFGDIFF_SCREENSHOTS when that names a folder (those
of docs/walkthrough/ are made this way). $CFGDIFF_SERVE_CHECKPOINT serves that checkpoint (a
trained MNIST model) instead of the closed-form digit model.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
from pathlib import Path

import pytest
from serving import DigitsOracle, digits_config, judge_digits

pytestmark = pytest.mark.slow
CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="module")
def chromium():
    playwright = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (make install-test installs it)"
    )
    if not CHROMIUM.is_file():
        pytest.skip(
            f"no browser at {CHROMIUM} (make install-test installs Debian's chromium as root)"
        )
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def server():
    pytest.importorskip("uvicorn", reason="the serve extra is not installed")
    from cfgdiff.serve.app import start_in_thread
    from cfgdiff.serve.jobs import Engine, Limits, Model

    given = os.environ.get("CFGDIFF_SERVE_CHECKPOINT")
    if given:
        from cfgdiff.checkpoint import load_for_sampling

        loaded = load_for_sampling(Path(given))
        model = Model(loaded.net, loaded.cfg, str(loaded.path))
    else:  # a network's time per call, so that a long request is still running when cancelled
        cfg = digits_config()
        model = Model(DigitsOracle(cfg, delay=0.02), cfg, "runs/digits")
    engine = Engine(model, Limits(max_image_steps=4000, max_steps=250, queue=2), "cpu", "fp32")
    engine.warm_up()
    running = start_in_thread(engine)
    yield running
    running.stop()


def _screenshot(page, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("CFGDIFF_SCREENSHOTS"):
        shutil.copyfile(path, Path(os.environ["CFGDIFF_SCREENSHOTS"]) / path.name)


def _data_url_bytes(src: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:40]
    return base64.b64decode(src[len(prefix) :])


def _gallery_images(page):
    """The gallery's images as uint8 (N, 1, H, W), decoded from the cells the page shows."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    srcs = page.eval_on_selector_all("#gallery img", "els => els.map(e => e.src)")
    cells = [np.asarray(Image.open(io.BytesIO(_data_url_bytes(s))).convert("L")) for s in srcs]
    return torch.from_numpy(np.stack(cells))[:, None]


def test_the_page_guides_previews_judges_and_cancels(chromium, server, tmp_path):
    page = chromium.new_page(viewport={"width": 1000, "height": 640})
    errors, urls = [], []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("request", lambda r: urls.append(r.url))
    page.goto(server.url)
    page.wait_for_selector("#classes button")
    names = page.locator("#classes button").all_inner_texts()
    assert names == [str(c) for c in range(10)]  # named from the checkpoint

    # the class to ask for: one whose template or digit the judge reads (7 where it can)
    label = 7
    page.fill("#steps", "16")
    page.fill("#n", "3")
    page.click(f"#classes button[data-class='{label}']")
    assert page.get_attribute(f"#classes button[data-class='{label}']", "class") == "selected"

    # move the slider: a click at 45 % of its track; the labels follow, w = s - 1
    box = page.locator("#scale").bounding_box()
    page.mouse.click(box["x"] + 0.45 * box["width"], box["y"] + box["height"] / 2)
    s = float(page.input_value("#scale"))
    assert 3.5 <= s <= 5.5, s
    word = f"{s:g}"
    assert page.inner_text("#scale-label") == f"s = {s:.1f}" or word in page.inner_text(
        "#scale-label"
    )
    w_text = page.inner_text("#w-label")
    assert abs(float(w_text.rsplit("=", 1)[1].strip()) - (s - 1)) < 1e-6, w_text

    # the request of the slider's value: previews, then the final image and its command
    page.wait_for_function(
        f"""() => document.getElementById('status').dataset.state === 'done'
            && document.getElementById('command').textContent.includes('--scale {word} ')""",
        timeout=120_000,
    )
    frames = int(page.get_attribute("#gallery", "data-frames"))
    assert frames >= 2, frames
    assert page.get_attribute("#gallery", "data-kind") == "final"
    final = _data_url_bytes(page.get_attribute("#download", "href"))  # the grid, to download
    assert final.startswith(b"\x89PNG")
    assert page.get_attribute("#download", "download").endswith(".png")
    images = _gallery_images(page)
    assert images.shape == (3, 1, 28, 28)
    verdict = judge_digits(images).argmax(1).tolist()
    assert verdict.count(label) >= 2, verdict
    command = page.inner_text("#command")
    assert command.startswith("cfgdiff sample --checkpoint ")
    for part in (f"--scale {word} ", f"--classes {label} ", "--per-class 3 ", "--steps 16 "):
        assert part in command, command
    _screenshot(page, tmp_path / "serve.png")

    # a strip: the same noise at several scales, steered away from another class
    page.select_option("#mode", "strip")
    page.fill("#scales", "0,1,3,6")
    page.fill("#n", "2")
    page.click("#options summary")
    page.select_option("#negative", "1")
    page.click("#generate")
    page.wait_for_function(
        """() => document.getElementById('status').dataset.state === 'done'
            && document.getElementById('command').textContent.includes('strip-s6.png')""",
        timeout=120_000,
    )
    commands = page.inner_text("#command").splitlines()
    assert [re.search(r"--scale (\S+)", c).group(1) for c in commands] == ["0", "1", "3", "6"]
    assert all("--negative-class 1 " in c for c in commands)
    _screenshot(page, tmp_path / "serve-strip.png")

    # a bad value is refused by the server with one line, which the page shows
    page.fill("#interval-lo", "5")
    page.fill("#interval-hi", "1")
    page.click("#generate")
    page.wait_for_selector("#status[data-state=error]")
    assert page.inner_text("#status") == "guidance interval σ: must satisfy lo < hi, got [5, 1]"
    assert page.get_attribute("#interval-lo", "aria-invalid") == "true"  # the box is marked
    # the class highlighted is still the one of the images and command shown (the strip's)
    assert page.get_attribute(f"#classes button[data-class='{label}']", "class") == "selected"
    errors.remove("Failed to load resource: the server responded with a status of 422 "
                  "(Unprocessable Entity)")  # fmt: skip
    page.fill("#interval-lo", "")
    page.fill("#interval-hi", "")
    # an empty box is said to be empty, by its label, not sent as 0
    page.fill("#n", "")
    page.click("#generate")
    page.wait_for_function("() => document.getElementById('status').textContent.startsWith("
                           "'images: is empty')")  # fmt: skip
    assert page.get_attribute("#n", "aria-invalid") == "true"
    errors.remove("Failed to load resource: the server responded with a status of 422 "
                  "(Unprocessable Entity)")  # fmt: skip
    page.fill("#n", "2")
    assert page.get_attribute("#n", "aria-invalid") is None  # typing clears the mark
    page.select_option("#negative", "")
    page.select_option("#mode", "images")

    # a second, long request, cancelled: the server stops it before its last step
    cancelled_before = server.engine.counts["cancelled"]
    page.fill("#steps", "250")
    page.fill("#n", "16")
    page.click("#generate")
    page.wait_for_function(
        "() => Number(document.getElementById('gallery').dataset.frames) >= 1", timeout=60_000
    )
    page.click("#cancel")
    page.wait_for_selector("#status[data-state=cancelled]", timeout=30_000)
    stopped_at = int(re.search(r"step (\d+)", page.inner_text("#status")).group(1))
    assert stopped_at < 250
    status = server.engine.status()
    assert status["running"] is None and status["waiting"] == 0
    assert server.engine.counts["cancelled"] == cancelled_before + 1

    assert all(u.startswith(server.url) or u.startswith("data:") for u in urls), urls
    assert errors == []
    page.close()


def _done(page, timeout: float = 120_000) -> None:
    page.wait_for_selector("#status[data-state=done]", timeout=timeout)


@pytest.mark.parametrize("width", [1280, 420])
def test_32_images_wrap_and_the_page_remembers_its_runs(chromium, server, tmp_path, width):
    """32 images are all in the window, none cut off and no horizontal scrolling, on a wide
    window and a phone-sized one; the settings and the last runs survive a reload, and a run
    from the history brings back its images, command and settings."""
    page = chromium.new_page(viewport={"width": width, "height": 800})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(server.url)
    page.wait_for_selector("#classes button")
    if not os.environ.get("CFGDIFF_SERVE_CHECKPOINT"):  # a trained model: its own steps
        page.fill("#steps", "6")
    page.fill("#n", "3")
    page.click("#classes button[data-class='2']")
    _done(page)
    first = page.inner_text("#command")
    page.fill("#n", "32")
    page.fill("#seed", "5")
    page.click("#classes button[data-class='4']")
    page.wait_for_function(
        "() => document.getElementById('status').dataset.state === 'done' && "
        "document.getElementById('command').textContent.includes('--per-class 32')",
        timeout=120_000,
    )
    boxes = page.eval_on_selector_all(
        "#gallery img", "els => els.map(e => { const r = e.getBoundingClientRect(); "
        "return [r.left, r.right, r.width]; })")  # fmt: skip
    assert len(boxes) == 32
    assert all(left >= 0 and right <= width and w >= 28 for left, right, w in boxes), boxes
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    # a readable size: at least twice the pixels of a 28-px digit on a wide window
    assert width < 800 or min(w for _, _, w in boxes) >= 56
    _screenshot(page, tmp_path / f"serve-32-images-{width}px.png")

    # a reload keeps the boxes, the class picked, the images shown and the history
    page.fill("#steps", steps := str(int(page.input_value("#steps")) + 1))
    page.reload()
    page.wait_for_selector("#history button")
    assert (page.input_value("#n"), page.input_value("#seed")) == ("32", "5")
    assert page.input_value("#steps") == steps
    assert page.get_attribute("#classes button[data-class='4']", "class") == "selected"
    assert page.locator("#gallery img").count() == 32
    assert page.locator("#history button").count() == 2
    page.locator("#history button").nth(1).click()  # the older run: 3 images of class 2
    assert page.inner_text("#command") == first
    assert page.locator("#gallery img").count() == 3 and page.input_value("#n") == "3"
    assert page.get_attribute("#classes button[data-class='2']", "class") == "selected"
    assert errors == []
    page.close()


def test_the_queue_as_the_page_sees_it(chromium, server, tmp_path):
    """While another client's job runs: quick clicks leave one request waiting, which the page
    says (one ahead); a full queue is retried when the server says; a cancel leaves the class
    of the images shown highlighted; copying the command says that it did."""
    import json
    import threading

    from serving import request

    page = chromium.new_page(viewport={"width": 1000, "height": 700})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(server.url)
    page.wait_for_selector("#classes button")
    page.fill("#steps", "5")
    page.fill("#n", "2")
    page.click("#classes button[data-class='3']")
    _done(page)
    engine = server.engine

    def others(n: int) -> list[threading.Thread]:  # another client's long requests
        body = {"class": 1, "steps": 250, "n": 1}
        threads = [threading.Thread(target=request, args=(server.url, "POST", "/api/generate",
                                                          body)) for _ in range(n)]  # fmt: skip
        for t in threads:
            t.start()
        return threads

    def clear() -> None:  # the other client's jobs cancelled
        for job in list(engine._jobs):
            request(server.url, "POST", "/api/cancel", {"job": job})

    threads = others(1)
    page.wait_for_function("() => true")
    while engine.status()["running"] is None:
        page.wait_for_timeout(20)
    mine = set()
    for c in (5, 6, 7, 8):  # quick clicks: each replaces the one before, which leaves the queue
        page.click(f"#classes button[data-class='{c}']")
        page.wait_for_timeout(60)
    page.wait_for_function("() => document.getElementById('status').textContent === "
                           "'waiting: 1 request(s) ahead'")  # fmt: skip
    assert engine.status()["waiting"] == 1
    mine = {j for j in engine._jobs if engine._jobs[j] is not engine.running}
    assert len(mine) == 1
    # the page's request is cancelled: the highlight goes back to the images shown (class 3)
    page.click("#cancel")
    page.wait_for_selector("#status[data-state=cancelled]")
    assert page.get_attribute("#classes button[data-class='3']", "class") == "selected"
    assert page.locator("#classes button.selected").count() == 1
    assert engine.status()["waiting"] == 0

    # a full queue: the page retries when told (Retry-After), then gets its images
    threads += others(2)
    while engine.status()["waiting"] < 2:
        page.wait_for_timeout(20)
    page.click("#classes button[data-class='9']")
    page.wait_for_selector("#status[data-state=retrying]")
    assert "busy: 2 request(s) already wait" in page.inner_text("#status")
    clear()
    _done(page, 30_000)
    assert "--classes 9 " in page.inner_text("#command")
    for t in threads:
        t.join(30)
    assert json.loads(request(server.url, "GET", "/api/status")[2])["waiting"] == 0

    page.click("#copy")  # feedback either way: copied, or selected for Ctrl-C
    page.wait_for_function("() => document.getElementById('copy').textContent !== "
                           "'copy command'")  # fmt: skip
    errors = [e for e in errors if "status of 503" not in e]
    assert errors == []
    page.close()


@pytest.fixture
def text_server(tmp_path):
    """A text model's server: $CFGDIFF_SERVE_TEXT_CHECKPOINT (a trained MNIST text model, for
    docs/walkthrough's screenshot) or a tiny text run of a 3-class folder."""
    pytest.importorskip("uvicorn", reason="the serve extra is not installed")
    pytest.importorskip("wordllama", reason="the text extra is not installed")
    from serving import text_engine_model, train_text_run

    from cfgdiff.serve.app import start_in_thread
    from cfgdiff.serve.jobs import Engine, Limits

    given = os.environ.get("CFGDIFF_SERVE_TEXT_CHECKPOINT")
    run = Path(given) if given else train_text_run(tmp_path)
    engine = Engine(text_engine_model(run), Limits(queue=2), "cpu", "fp32")
    engine.warm_up()
    running = start_in_thread(engine)
    yield running
    running.stop()


def test_the_page_of_a_text_model_takes_prompts(chromium, text_server, tmp_path):
    page = chromium.new_page(viewport={"width": 1000, "height": 640})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(text_server.url)
    page.wait_for_selector("#classes button")
    examples = text_server.engine.examples()
    assert page.locator("#classes button").all_inner_texts() == examples
    assert page.text_content("#classes-title") == "Prompt" and page.is_visible("#prompt")
    assert "text prompts" in page.inner_text("#model-name")

    def done_with(part: str) -> str:
        page.wait_for_function(
            f"""() => document.getElementById('status').dataset.state === 'done'
                && document.getElementById('command').textContent.includes({part!r})""",
            timeout=120_000,
        )
        return page.inner_text("#command")

    # a prompt's button fills the box and asks for it
    page.fill("#steps", "8")
    page.fill("#n", "4")
    page.click("#classes button[data-class='1']")
    assert page.input_value("#prompt") == examples[1]
    command = done_with(f"--prompt={examples[1]}")
    assert command.startswith("cfgdiff sample --checkpoint ") and "--classes" not in command

    # a prompt of one's own, sent with Enter, steered away from a negative prompt
    prompt = "a thick, slanted seven" if examples[7:8] == ["seven"] else f"a wide {examples[2]}"
    page.click("#options summary")
    assert page.is_hidden("#negative-class-row") and page.is_visible("#negative-prompt")
    page.fill("#negative-prompt", "thin")
    page.fill("#prompt", prompt)
    assert page.locator("#classes button.selected").count() == 0
    page.press("#prompt", "Enter")
    command = done_with(f"'--prompt={prompt}'")
    assert "--negative-prompt=thin " in command
    assert page.get_attribute("#download", "download").startswith("cfgdiff-a_")
    _screenshot(page, tmp_path / "serve-text.png")

    # a prompt the model cannot read: the server's one-line reason, shown on the page
    page.fill("#negative-prompt", "")
    page.fill("#prompt", " ".join(["seven"] * 20))
    page.press("#prompt", "Enter")
    page.wait_for_selector("#status[data-state=error]")
    assert page.inner_text("#status").endswith("has 20 tokens; this model reads at most 16")
    errors.remove("Failed to load resource: the server responded with a status of 422 "
                  "(Unprocessable Entity)")  # fmt: skip
    assert errors == []
    page.close()
