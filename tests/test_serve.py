"""`cfgdiff serve` without a browser: requests checked field by field (HTTP 422, one line), the
final PNG and the command that makes it again, one job at a time with a small queue (503
beyond it), cancels (by the page, by a client that leaves), the Host check, the page's files,
the command line, and a burst of 50 concurrent requests."""

from __future__ import annotations

import http.client
import json
import re
import shlex
import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import folder_run
from serving import events, host_port, request

from cfgdiff.cli import main
from cfgdiff.errors import ConfigError
from cfgdiff.sampling.samplers import SAMPLERS
from cfgdiff.serve.jobs import Busy, Engine, Limits, Model, Settings, parse_settings

pytest.importorskip("uvicorn", reason="the serve extra is not installed")
STATIC = Path(__file__).resolve().parents[1] / "src" / "cfgdiff" / "serve" / "static"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny checkpoint of a 3-class folder (class0..class2), trained for a few steps."""
    return folder_run(tmp_path_factory.mktemp("serve"), 6)


@pytest.fixture(scope="module")
def loaded(run):
    from cfgdiff.checkpoint import load_for_sampling

    return load_for_sampling(run)


class Slow:
    """The tiny network, `delay` seconds a call: a job lasts long enough to be seen running."""

    def __init__(self, net, delay: float):
        self.net, self.delay = net, delay

    def __call__(self, x, t, y):
        time.sleep(self.delay)
        return self.net(x, t, y)


def _engine(loaded, delay: float = 0.0, **limits) -> Engine:
    net = Slow(loaded.net, delay) if delay else loaded.net
    return Engine(Model(net, loaded.cfg, str(loaded.path)), Limits(**limits), "cpu", "fp32")


def _collect():
    got, done = [], threading.Event()

    def sink(event):
        got.append(event)
        if event["type"] in ("done", "cancelled", "error"):
            done.set()

    return got, done, sink


LIMITS = Limits(max_images=8, max_image_steps=100, max_steps=50, max_scales=4)


def _cfg(classes: int = 3, timesteps: int = 1000, text: bool = False):
    """A model's config as the request parser reads it: classes, T, condition."""
    import dataclasses

    from cfgdiff.config import RunConfig, replace_fields

    cfg = replace_fields(
        RunConfig(), {"model.num_classes": classes, "diffusion.timesteps": timesteps}
    )
    if text:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, condition="text"))
    return cfg


@pytest.mark.parametrize(
    "body,field,message",
    [
        ([3], None, "the request must be a JSON object"),
        ({"scale": 1}, "class", "class: is missing; give a whole number from 0 to 2"),
        ({"class": None}, "class", "class: is empty; give a whole number from 0 to 2"),
        ({"class": 3}, "class", "class: must be a whole number from 0 to 2, got 3"),
        ({"class": True}, "class", "class: must be a whole number from 0 to 2, got true"),
        ({"class": 0.5}, "class", "class: must be a whole number from 0 to 2, got 0.5"),
        ({"class": 0, "scale": 11}, "scale", "scale: must be a number from 0 to 10, got 11"),
        ({"class": 0, "scale": float("nan")}, "scale", "scale: must be a number from 0 to 10, "
         "got not a number"),
        ({"class": 0, "scale": "3"}, "scale", 'scale: must be a number from 0 to 10, got "3"'),
        ({"class": 0, "steps": 51}, "steps", "steps: must be a whole number from 1 to 50, got 51"),
        ({"class": 0, "steps": 0}, "steps", "steps: must be a whole number from 1 to 50, got 0"),
        # a huge number is said in a few words, not echoed digit by digit
        ({"class": 0, "steps": 1e300}, "steps", "steps: must be a whole number from 1 to 50, "
         "got 1e+300"),
        ({"class": 10**400}, "class", "class: must be a whole number from 0 to 2, got a "
         "401-digit number"),
        ({"class": 0, "sampler": "euler"}, "sampler",
         f'sampler: must be one of {", ".join(SAMPLERS)}, got "euler"'),
        # a list or an object where a word is wanted: refused like any other value
        ({"class": 0, "sampler": ["ddim"]}, "sampler", "got a list"),
        ({"class": 0, "sampler": {}}, "sampler", "got an object"),
        ({"class": 0, "mode": {"a": 1}}, "mode", "view: must be one of images, strip, got an "
         "object"),
        ({"class": 0, "seed": -1}, "seed", "seed: must be a whole number from 0 to "
         "9007199254740991, got -1"),
        ({"class": 0, "n": 9}, "n", "images: must be a whole number from 1 to 8, got 9"),
        ({"class": 0, "n": None}, "n", "images: is empty; give a whole number from 1 to 8"),
        ({"class": 0, "n": 5, "steps": 30}, "n", "images × steps: at most 100 image-steps a "
         "request, got 5 × 30 = 150"),
        ({"class": 0, "mode": "grid"}, "mode", "view: must be one of images, strip"),
        ({"class": 0, "mode": "strip"}, "scales", "strip scales: is empty; give 1 to 4 distinct"),
        ({"class": 0, "mode": "strip", "scales": [1, 1]}, "scales", "strip scales: must be "
         "distinct"),
        ({"class": 0, "mode": "strip", "scales": [1, 2, 3], "n": 3}, "n", "at most 8 images"),
        ({"class": 0, "negative_class": 3}, "negative_class", "negative class: must be a whole "
         "number from 0 to 2, got 3"),
        ({"class": 0, "interval": [2, 1]}, "interval", "guidance interval σ: must satisfy lo < "
         "hi, got [2, 1]"),
        ({"class": 0, "interval": "0,1"}, "interval", "guidance interval σ: must be two "
         "numbers lo < hi"),
        ({"class": 0, "interval": [0, None]}, "interval", "guidance interval σ: must be two"),
        ({"class": 0, "out": "/etc/passwd"}, None, 'unknown field "out"'),
        ({"class": 0, "checkpoint": "/tmp/x"}, None, 'unknown field "checkpoint"'),
        ({"class": 0, "x" * 5000: 1}, None, 'unknown field "xxxxxxxxxxxxxxxxxxxxxxxxxxxxx…"'),
    ],
)  # fmt: skip
def test_every_field_is_checked_with_a_one_line_reason(body, field, message):
    """Each refusal names the field by the page's label (and its API name for the page to mark
    the box), says what is allowed, and says what came in a few words: at most 200 characters
    whatever was sent."""
    from cfgdiff.serve.schema import RequestError

    with pytest.raises(RequestError) as e:
        parse_settings(body, _cfg(), LIMITS)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert e.value.field == field and len(str(e.value)) <= 200


@pytest.mark.parametrize(
    "body,message",
    [
        ({"class": 0}, "class: this model reads prompts; give a prompt"),
        ({"prompt": "a", "negative_class": 1}, "negative class: this model reads prompts"),
        ({"scale": 2}, "prompt: is missing; give one line of text, at most 200 characters"),
        ({"prompt": "  "}, "prompt: must be one line of text, at most 200 characters, got blank"),
        ({"prompt": 7}, "prompt: must be one line of text, at most 200 characters, got 7"),
        ({"prompt": "x" * 201}, 'got "xxxxxxxxxxxxxxxxxxxxxxxxxxxxx…"'),
        ({"prompt": "a\nb"}, 'prompt: must be one line of printable text, got "a\\nb"'),
        ({"prompt": "a", "negative_prompt": ""}, "negative prompt: must be one line of text"),
    ],
)
def test_a_text_models_fields_are_checked_with_a_one_line_reason(body, message):
    with pytest.raises(ConfigError) as e:
        parse_settings(body, _cfg(text=True), LIMITS)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_class_model_refuses_prompts():
    for key in ("prompt", "negative_prompt"):
        label = key.replace("_", " ")
        with pytest.raises(ConfigError, match=f"{label}: this model takes class labels; give"):
            parse_settings({"class": 0, key: "seven"}, _cfg(), LIMITS)


def test_a_good_request_and_its_defaults():
    from cfgdiff.sampling.conditions import Asks
    from cfgdiff.sampling.settings import SamplingSettings

    cfg = _cfg()
    s = parse_settings({"class": 2, "mode": "strip", "scales": [0, 2.5]}, cfg, LIMITS)
    assert s == Settings(Asks(classes=("2",)), 3.0, SamplingSettings(), 1, "strip", (0.0, 2.5))
    assert s.images == 2 and s.columns == (0.0, 2.5)
    # no sampler settings given: the model's own, seed 0
    own = s.sampling.resolve(cfg, "cpu")
    assert (own.sampler, own.steps, own.seed) == (cfg.sampling.sampler, cfg.sampling.steps, 0)
    # steps are capped by the model's T too
    with pytest.raises(ConfigError, match=r"steps: must be a whole number from 1 to 10, got 11"):
        parse_settings({"class": 0, "steps": 11}, _cfg(timesteps=10), LIMITS)


def test_the_final_png_is_what_the_command_it_gives_writes(loaded, tmp_path):
    engine = _engine(loaded)
    try:
        body = {"class": 1, "scale": 2.5, "steps": 6, "seed": 7, "n": 3, "negative_class": 2,
                "interval": [0.1, 50]}  # fmt: skip
        got, done, sink = _collect()
        engine.submit(engine.parse(body), sink)
        assert done.wait(60)
    finally:
        engine.close()
    kinds = [e["type"] for e in got]
    assert kinds[:2] == ["queued", "started"] and kinds[-1] == "done"
    assert kinds.count("preview") >= 2
    final = got[-1]
    (command,) = final["commands"]
    argv = shlex.split(command)
    assert argv[:2] == ["cfgdiff", "sample"] and argv[-2:] == ["--out", "sample.png"]
    assert "--negative-class 2" in command and "--guidance-interval 0.1,50" in command
    argv[-1] = str(tmp_path / "again.png")
    assert main(argv[1:]) == 0
    import base64

    assert (tmp_path / "again.png").read_bytes() == base64.b64decode(final["png"])


def test_strip_columns_are_the_scales_commands(loaded):
    engine = _engine(loaded)
    try:
        got, done, sink = _collect()
        body = {"class": 0, "mode": "strip", "scales": [0, 1.5, 4], "n": 2, "steps": 4}
        engine.submit(engine.parse(body), sink)
        assert done.wait(60)
    finally:
        engine.close()
    commands = got[-1]["commands"]
    assert [re.search(r"--scale (\S+)", c).group(1) for c in commands] == ["0", "1.5", "4"]
    assert all("--per-class 2" in c and c.endswith(f"--out strip-s{s}.png")
               for c, s in zip(commands, ["0", "1.5", "4"], strict=True))  # fmt: skip


def test_one_job_at_a_time_a_small_queue_and_cancels(loaded):
    engine = _engine(loaded, delay=0.05, queue=2, max_steps=200, max_image_steps=10_000)
    try:
        long = engine.parse({"class": 0, "steps": 200})
        first, first_done, sink1 = _collect()
        job1 = engine.submit(long, sink1)
        deadline = time.time() + 30
        while engine.status()["running"] != job1.id and time.time() < deadline:
            time.sleep(0.01)
        second, second_done, sink2 = _collect()
        job2 = engine.submit(long, sink2)
        third, third_done, sink3 = _collect()
        engine.submit(engine.parse({"class": 1, "steps": 2}), sink3)
        assert [second[0]["ahead"], third[0]["ahead"]] == [1, 2]
        with pytest.raises(Busy, match="busy: 2 request"):
            engine.submit(long, lambda e: None)
        assert engine.counts["refused"] == 1
        # a waiting job cancelled is over at once; the running one stops at its next step
        assert engine.cancel(job2.id)
        assert second_done.wait(1) and second[-1] == {
            "type": "cancelled",
            "job": job2.id,
            "step": 0,
        }
        assert engine.cancel(job1.id)
        assert first_done.wait(5) and first[-1]["type"] == "cancelled"
        assert 0 < first[-1]["step"] < 200
        assert third_done.wait(30) and third[-1]["type"] == "done"  # the queue goes on
        assert not engine.cancel(job1.id)  # finished jobs are forgotten
        assert engine.status() == {"running": None, "running_steps_done": None, "waiting": 0,
                                   "done": 1, "cancelled": 2, "error": 0, "refused": 1}  # fmt: skip
    finally:
        engine.close()


@pytest.fixture
def server(loaded):
    from cfgdiff.serve.app import start_in_thread

    running = start_in_thread(_engine(loaded, delay=0.02, queue=1, max_image_steps=2000))
    yield running
    running.stop()


def test_http_answers(server):
    url = server.url
    status, headers, body = request(url, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in headers["content-security-policy"]
    for path in ("/app.js", "/app.css"):
        assert request(url, "GET", path)[0] == 200
    for path in ("/index.html", "/../pyproject.toml", "/static/app.js", "/api/generate"):
        status, headers, body = request(url, "GET", path)
        assert status in (404, 405), path
        # the API's one JSON shape, for these too
        assert headers["content-type"] == "application/json" and set(json.loads(body)) == {
            "error", "field"}  # fmt: skip
    assert json.loads(request(url, "GET", "/nope")[2])["error"] == "no such page or API: /nope"
    assert json.loads(request(url, "GET", "/api/cancel")[2])["error"] == (
        "GET is not allowed on /api/cancel"
    )
    status, _, body = request(url, "GET", "/api/model")
    assert status == 200 and b'"classes":["class0","class1","class2"]' in body
    # bad input: 422 with one line, before anything runs
    status, _, body = request(url, "POST", "/api/generate", {"class": 0, "steps": 0})
    assert (status, json.loads(body)) == (
        422,
        {"error": "steps: must be a whole number from 1 to 250, got 0", "field": "steps"},
    )
    status, _, body = request(
        url, "POST", "/api/generate", b"{nope", {"Content-Type": "application/json"}
    )
    assert (status, body) == (422, b'{"error":"the body is not valid JSON","field":null}')
    # numbers of any length: a short answer that names the field, never the digits
    for digits in (400, 4000, 5000):
        raw = b'{"class":' + b"9" * digits + b"}"
        status, _, body = request(url, "POST", "/api/generate", raw,
                                  {"Content-Type": "application/json"})  # fmt: skip
        assert (status, json.loads(body)) == (422, {"error": "class: must be a whole number "
            f"from 0 to 2, got a {digits}-digit number", "field": "class"})  # fmt: skip
    status, _, body = request(url, "POST", "/api/generate", b'{"class":1,"steps":1e300}',
                              {"Content-Type": "application/json"})  # fmt: skip
    assert status == 422 and len(body) < 120 and b"got 1e+300" in body
    # a list or an object as a word: 422, not a server error
    for bad in (["ddim"], {}):
        status, _, body = request(url, "POST", "/api/generate", {"class": 1, "sampler": bad})
        assert status == 422 and json.loads(body)["field"] == "sampler"
    status, _, _ = request(url, "POST", "/api/generate", b"class=0", {"Content-Type": "text/plain"})
    assert status == 415  # a form from another site cannot post here without a preflight
    status, _, _ = request(url, "POST", "/api/generate", {"class": 0, "pad": "x" * 9000})
    assert status == 413
    status, _, body = request(url, "POST", "/api/cancel", {"job": "../../etc"})
    assert status == 422
    assert request(url, "POST", "/api/cancel", {"job": "0" * 16})[2] == b'{"cancelled":false}'
    # a page served from elsewhere that resolves its name to 127.0.0.1 is refused
    status, _, body = request(url, "GET", "/api/model", headers={"Host": "attacker.example"})
    assert (status, json.loads(body)["error"]) == (
        400, "the Host header must name this machine's loopback")  # fmt: skip
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
        assert request(url, "GET", "/api/model", headers={"Host": host})[0] == 200, host
    assert server.engine.counts == {"done": 0, "cancelled": 0, "error": 0, "refused": 0}
    # a good request: a stream of events ending in done
    status, headers, body = request(url, "POST", "/api/generate", {"class": 2, "steps": 5, "n": 2})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    got = events(body)
    assert [e["type"] for e in got][:2] == ["queued", "started"] and got[-1]["type"] == "done"


def _open_stream(url: str, body: dict):
    host, port = host_port(url)
    c = http.client.HTTPConnection(host, port, timeout=30)
    c.request("POST", "/api/generate", json.dumps(body), {"Content-Type": "application/json"})
    return c, c.getresponse()


def test_a_client_that_leaves_cancels_its_job(server):
    c, r = _open_stream(server.url, {"class": 0, "steps": 200})
    assert r.status == 200
    while b"event: preview" not in r.readline():
        pass
    c.sock.shutdown(socket.SHUT_RDWR)
    c.close()
    deadline = time.time() + 10
    while server.engine.counts["cancelled"] == 0 and time.time() < deadline:
        time.sleep(0.02)
    assert server.engine.counts["cancelled"] == 1
    assert server.engine.status()["running"] is None


def test_clients_that_queue_and_leave_free_their_places(server):
    """A long job runs; four clients queue (the queue holds one here, so three are refused)
    and leave: the queue is empty again at once, counts add up, and a new request is not
    refused as busy."""
    long_job, r = _open_stream(server.url, {"class": 0, "steps": 250})
    assert r.status == 200
    while b"event: started" not in r.readline():
        pass
    statuses = []
    for _ in range(4):  # like `curl -m 1`: queue, then go away
        c, r2 = _open_stream(server.url, {"class": 2, "steps": 5, "n": 1})
        statuses.append(r2.status)
        if r2.status == 200:
            assert b"event: queued" in r2.readline()
        c.sock.shutdown(socket.SHUT_RDWR)
        c.close()
        deadline = time.time() + 5
        while server.engine.status()["waiting"] and time.time() < deadline:
            time.sleep(0.01)
        assert server.engine.status()["waiting"] == 0
    assert 200 in statuses
    status = server.engine.status()
    assert status["running"] is not None and status["cancelled"] == statuses.count(200)
    # a new client waits (ahead: the running one) rather than being told the queue is full
    c, r3 = _open_stream(server.url, {"class": 1, "steps": 2})
    assert r3.status == 200 and b'"ahead":1' in r3.readline() + r3.readline()
    c.close()
    long_job.close()


def test_the_queue_tells_each_waiting_job_its_place(loaded):
    engine = _engine(loaded, delay=0.05, queue=3, max_steps=200, max_image_steps=10_000)
    try:
        long = engine.parse({"class": 0, "steps": 200})
        sinks = [_collect() for _ in range(4)]
        jobs = [engine.submit(long, sinks[0][2])]
        while engine.status()["running"] is None:
            time.sleep(0.01)
        jobs += [engine.submit(long, sink) for _, _, sink in sinks[1:]]
        assert [got[0]["ahead"] for got, _, _ in sinks[1:]] == [1, 2, 3]
        assert engine.cancel(jobs[1].id)  # the first in line leaves: the others move up
        assert [got[-1]["ahead"] for got, _, _ in sinks[2:]] == [1, 2]
        assert engine.status()["waiting"] == 2
        engine.cancel(jobs[0].id)  # the running one stops: the next starts, the last moves up
        deadline = time.time() + 10
        while not any(e["type"] == "started" for e in sinks[2][0]) and time.time() < deadline:
            time.sleep(0.01)
        assert engine.status()["running"] == jobs[2].id and engine.status()["waiting"] == 1
        assert sinks[3][0][-1] == {"type": "queued", "job": jobs[3].id, "ahead": 1}
        assert [e["ahead"] for e in sinks[3][0]] == [3, 2, 1]
    finally:
        engine.close()
    # stopping ends every job with a final event that says why, and refuses new ones
    for got, done, _ in sinks:
        assert done.wait(5) and got[-1]["type"] == "cancelled"
    assert sinks[3][0][-1]["reason"] == "the server is stopping"
    with pytest.raises(Busy, match="the server is stopping"):
        engine.submit(long, lambda e: None)


def _open(url: str) -> socket.socket:
    host, port = host_port(url)
    return socket.create_connection((host, port), timeout=10)


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes `sock` within `seconds` (reads until EOF or a reset)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    finally:
        sock.close()


def test_idle_and_half_sent_connections_are_bounded(loaded):
    """A connection that sends nothing, or half a request, is closed after `request` seconds;
    a body that does not come is answered 408; with more than `connections` idle ones open the
    oldest are closed, and the page still answers."""
    from cfgdiff.serve.app import Timeouts, start_in_thread

    timeouts = Timeouts(request=0.5, body=0.5, keep_alive=0.5, connections=16)
    running = start_in_thread(_engine(loaded), timeouts=timeouts)
    url = running.url
    try:
        silent = _open(url)
        half = _open(url)
        half.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
        t0 = time.perf_counter()
        assert _closed_within(silent, 5) and _closed_within(half, 5)
        assert time.perf_counter() - t0 < 3
        slow = _open(url)
        slow.sendall(b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                     b"application/json\r\nContent-Length: 20\r\n\r\n{")  # fmt: skip
        slow.settimeout(5)
        answer = b""
        while b'"field"' not in answer and (chunk := slow.recv(4096)):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408 ") and b'"field":null' in answer
        slow.close()
    finally:
        running.stop()
    # many idle connections, and a long wait for a request: the oldest make room for new ones
    timeouts = Timeouts(request=60, body=60, keep_alive=60, connections=16)
    running = start_in_thread(_engine(loaded), timeouts=timeouts)
    try:
        idle = [_open(running.url) for _ in range(60)]  # more than `connections`, all silent
        status, _, body = request(running.url, "GET", "/")
        assert status == 200 and b"<title>" in body
        assert request(running.url, "GET", "/api/status")[0] == 200
        closed = sum(_closed_within(s, 0.5) for s in idle[:40])
        assert closed == 40  # the oldest, closed long before their 60 s were up
    finally:
        for s in idle:
            s.close()
        running.stop()


def _serve_process(run, cwd):
    import os
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "cfgdiff", "serve", "--checkpoint", str(run), "--port", "0",
         "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    line = proc.stdout.readline()
    return proc, re.search(r"at (http://127\.0\.0\.1:\d+/)", line).group(1)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_mid_stream_ends_the_stream_whole_and_exits_0(run, tmp_path, sig):
    """SIGTERM or Ctrl-C while a client watches a long job: the client gets a final
    "cancelled" event that says the server is stopping, the process prints `stopped` and exits
    0, and nothing is printed on stderr (no traceback, no tasks cancelled at the deadline)."""
    import signal

    proc, url = _serve_process(run, tmp_path)
    try:
        c, r = _open_stream(url, {"class": 0, "steps": 250, "n": 8})
        assert r.status == 200
        while b"event: preview" not in r.readline():
            pass
        t0 = time.perf_counter()
        proc.send_signal(getattr(signal, sig))
        rest = r.read()
        rc = proc.wait(10)
        took = time.perf_counter() - t0
    finally:
        proc.kill()
    final = events(rest)[-1]
    assert final["type"] == "cancelled" and final["reason"] == "the server is stopping"
    # not timed here (bench/serve_load.py times it): had the streams not ended first, uvicorn
    # would have cancelled them after its grace period and said so on stderr
    assert rc == 0, (rc, took)
    assert proc.stdout.read().strip() == "stopped"
    assert proc.stderr.read() == ""


def test_sigterm_when_idle_exits_0(run, tmp_path):
    import signal

    proc, url = _serve_process(run, tmp_path)
    try:
        assert request(url, "GET", "/api/model")[0] == 200
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(10)
    finally:
        proc.kill()
    assert rc == 0 and proc.stdout.read().strip() == "stopped"
    assert proc.stderr.read() == ""


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.slow
def test_fifty_concurrent_requests_are_queued_or_refused_cleanly(server):
    """A burst of 50 requests: one runs, one waits, the rest are refused at once with 503 and
    one line; every accepted one finishes; memory stays where it was; the server goes on."""
    url = server.url
    before = _rss_mib()
    results: list[tuple[int, bytes, float]] = [None] * 50  # type: ignore[list-item]
    go = threading.Barrier(50)

    def one(i: int) -> None:
        go.wait()
        t0 = time.perf_counter()
        status, _, body = request(
            url, "POST", "/api/generate", {"class": i % 3, "steps": 10, "n": 4}
        )
        results[i] = (status, body, time.perf_counter() - t0)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r is not None for r in results)
    accepted = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 503]
    assert len(accepted) + len(refused) == 50
    assert 1 <= len(accepted) <= 2  # the one running and the queue of one
    assert all(events(body)[-1]["type"] == "done" for _, body, _ in accepted)
    assert all(b'"error":"busy: ' in body and body.count(b"\n") == 0 for _, body, _ in refused)
    assert max(dt for _, _, dt in refused) < 10
    assert _rss_mib() - before < 200
    assert request(url, "POST", "/api/generate", {"class": 0, "steps": 2})[0] == 200


def test_static_page_loads_nothing_from_elsewhere():
    assert sorted(f.name for f in STATIC.iterdir()) == ["app.css", "app.js", "index.html"]
    for f in STATIC.iterdir():
        text = f.read_text()
        assert "http://" not in text and "https://" not in text and "@import" not in text, f
        assert not re.search(r"""(src|href)=["']//""", text), f


def test_cli_serve(run, monkeypatch, capsys):
    """The command: a port in use is one line (exit 2); a host other than the loopback is
    served with a warning; the missing extra is one line."""
    import sys

    import cfgdiff.serve.app as app

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    assert main(["serve", "--checkpoint", str(run), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"cfgdiff: error: --port {port} on 127.0.0.1: ") and "\n" not in err
    taken.close()

    served = {}
    real_bind = app.bind
    monkeypatch.setattr(app, "bind", lambda host, port: real_bind("127.0.0.1", 0))
    monkeypatch.setattr(app, "serve_forever", lambda engine, sock, host: served.update(
        host=host, classes=engine.info()["classes"]) or sock.close() or engine.close())  # fmt: skip
    assert main(["serve", "--checkpoint", str(run), "--host", "0.0.0.0", "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert "warning: --host 0.0.0.0 is not a loopback address" in out.err
    assert re.search(r"serving .*step-0000004 at http://127\.0\.0\.1:\d+/", out.out)
    assert served == {"host": "0.0.0.0", "classes": ["class0", "class1", "class2"]}

    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert main(["serve", "--checkpoint", str(run)]) == 2
    assert "pip install 'cfgdiff[serve]'" in capsys.readouterr().err


def test_a_real_server_process_stops_on_ctrl_c(run, tmp_path):
    """`cfgdiff serve` as users run it: it prints its URL, answers, and Ctrl-C stops it."""
    import os
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "cfgdiff", "serve", "--checkpoint", str(run), "--port", "0",
         "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        url = re.search(r"at (http://127\.0\.0\.1:\d+/)", line).group(1)
        assert request(url, "GET", "/api/model")[0] == 200
        got = events(request(url, "POST", "/api/generate", {"class": 1, "steps": 3})[2])
        assert got[-1]["type"] == "done"
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(30)
    assert rc == 0, proc.stderr.read()
    assert proc.stdout.read().strip() == "stopped"


@pytest.mark.slow
def test_the_load_benchmark_runs(run):
    """bench/serve_load.py's quick mode (the figures of docs/results.md come from its full one)."""
    import subprocess
    import sys

    bench = Path(__file__).resolve().parents[1] / "bench" / "serve_load.py"
    out = subprocess.run(
        [sys.executable, str(bench), "--checkpoint", str(run), "--quick"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "first preview" in out.stdout and "refused with 503" in out.stdout
    assert "4 clients that queued and left: waiting after each [0, 0, 0, 0]" in out.stdout
    assert "250 idle connections open: GET / answered 200" in out.stdout
    assert re.search(r"SIGTERM mid-stream: exit status 0 after \d+\.\d\d s; the client's last "
                     r"event: cancelled \(the server is stopping\).*stderr: nothing",
                     out.stdout)  # fmt: skip
    print(out.stdout)


def test_the_command_names_the_class_so_that_the_cli_reads_it_back():
    import dataclasses

    from conftest import tiny_config

    from cfgdiff.cli import build_parser
    from cfgdiff.sampling.conditions import Asks
    from cfgdiff.sampling.settings import SamplingSettings
    from cfgdiff.serve.jobs import sample_command

    names = ("a,b", "-x", "Ankle boot")
    cfg = dataclasses.replace(tiny_config(), class_names=names)
    for label, word in ((0, "--classes 0 "), (1, "--classes=-x "), (2, "--classes 'Ankle boot' ")):
        given = SamplingSettings(sampler="ddim", steps=5, seed=1, precision="fp32")
        asks = Asks(classes=(names[label],))
        (command,) = sample_command("runs/x", list(names), Settings(asks, 2.5, given, 2), given)
        assert word in command, command
        args = build_parser().parse_args(shlex.split(command)[1:])
        assert cfg.class_indices(args.classes) == [label]
        assert (args.scale, args.steps, args.seed, args.per_class) == (2.5, 5, 1, 2)


# --- a text model: prompts, a negative prompt, the command that makes the same images


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    pytest.importorskip("wordllama", reason="the text extra is not installed")
    from serving import train_text_run

    return train_text_run(tmp_path_factory.mktemp("serve-text"))


def test_a_text_model_is_asked_for_prompts_and_its_command_makes_the_same_png(text_run, tmp_path):
    import base64

    from serving import text_engine_model

    engine = Engine(text_engine_model(text_run), LIMITS, "cpu", "fp32")
    try:
        engine.warm_up()
        info = engine.info()
        assert info["condition"] == "text" and info["max_prompt_chars"] == 200
        assert info["examples"] == ["class0", "class1", "class2"]  # the classes' names
        # a prompt the model cannot read is refused when it is checked, before it waits
        with pytest.raises(ConfigError, match="has 20 tokens; this model reads at most 16"):
            engine.parse({"prompt": " ".join(["bar"] * 20)})
        body = {"prompt": "-a bar on the left", "negative_prompt": "a class2", "scale": 2.5,
                "steps": 4, "seed": 3, "n": 3}  # fmt: skip
        got, done, sink = _collect()
        engine.submit(engine.parse(body), sink)
        assert done.wait(60)
        strip, strip_done, sink = _collect()
        body = {"prompt": "a class1", "mode": "strip", "scales": [0, 3], "n": 2, "steps": 3}
        engine.submit(engine.parse(body), sink)
        assert strip_done.wait(60)
    finally:
        engine.close()
    final = got[-1]
    assert final["type"] == "done" and final["settings"]["prompt"] == "-a bar on the left"
    (command,) = final["commands"]
    assert "'--prompt=-a bar on the left'" in command and "--classes" not in command
    assert "'--negative-prompt=a class2'" in command
    argv = shlex.split(command)
    argv[-1] = str(tmp_path / "again.png")
    assert main(argv[1:]) == 0
    assert (tmp_path / "again.png").read_bytes() == base64.b64decode(final["png"])
    assert strip[-1]["type"] == "done" and len(strip[-1]["commands"]) == 2


def test_the_http_api_of_a_text_model(text_run):
    from serving import text_engine_model

    from cfgdiff.serve.app import start_in_thread

    engine = Engine(text_engine_model(text_run), LIMITS, "cpu", "fp32")
    running = start_in_thread(engine)
    try:
        status, _, body = request(running.url, "GET", "/api/model")
        assert status == 200 and b'"condition":"text"' in body.replace(b" ", b"")
        status, _, body = request(running.url, "POST", "/api/generate", {"class": 1})
        assert status == 422 and b"this model reads prompts" in body
        status, _, body = request(
            running.url, "POST", "/api/generate", {"prompt": "a class0", "steps": 2}
        )
        assert status == 200 and events(body)[-1]["type"] == "done"
    finally:
        running.stop()


def test_cli_serve_of_a_text_model_loads_its_caption_table(text_run, monkeypatch, capsys):
    import cfgdiff.serve.app as app

    served = {}
    real_bind = app.bind
    monkeypatch.setattr(app, "bind", lambda host, port: real_bind("127.0.0.1", 0))
    monkeypatch.setattr(app, "serve_forever", lambda engine, sock, host: served.update(
        info=engine.info(), captions=engine.model.captions, encoder=engine.model.encoder
    ) or sock.close() or engine.close())  # fmt: skip
    assert main(["serve", "--checkpoint", str(text_run), "--device", "cpu"]) == 0
    assert served["info"]["condition"] == "text" and served["info"]["examples"][0] == "class0"
    assert "a class0" in served["captions"].captions  # the run's table: no encoder for these
    assert served["encoder"] is not None  # loaded once, when the server started
    capsys.readouterr()
