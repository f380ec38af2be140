"""The web page's server under use and under a burst: `cfgdiff serve` is started as users start
it (a process of its own, loopback only) and driven over HTTP.

    python bench/serve_load.py --checkpoint runs/demo [--quick] [--burst 50]

1. first preview: one image, 20 dpmpp-2m steps, s = 3, asked for `--repeats` times one after
   another; seconds from sending the request to the first preview frame, and to the image.
2. images/s the page sustains: requests of 8 images x 20 steps at s = 3, back to back, the way
   the page asks (previews every few steps, the final PNG); against `generate` alone with the
   same settings in a worker thread (as the server runs it) and `cfgdiff sample` (which runs it
   on its main thread).
3. a burst: `--burst` requests of 4 images x 20 steps sent at once; how many ran, waited or
   were refused (HTTP 503), how fast a refusal came, when the last accepted one finished, and
   the server's resident memory before, after and at its peak (VmHWM).
4. clients that queue and leave: a long job runs, `--leavers` clients queue and go away one
   after another; the queue count after each (it must be 0 again) and whether a new request
   then waits rather than being refused.
5. idle connections: `--idle` connections opened and left silent; seconds for GET / and a
   request's first preview while they are open, and how many the server closed to make room.
6. SIGTERM while a client watches a long job: seconds to the process's exit, its exit status,
   whether the client got a final event, and whatever the server wrote on stderr (nothing:
   no traceback in any of these runs).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _post(host: str, port: int, body: dict, on_event=None) -> tuple[int, float, float | None]:
    """(status, seconds to the end, seconds to the first preview) of one request, sampled with
    DPM-Solver++ (as `generate alone` and `cfgdiff sample` below are)."""
    body = {"sampler": "dpmpp-2m", **body}
    t0 = time.perf_counter()
    c = http.client.HTTPConnection(host, port, timeout=600)
    c.request("POST", "/api/generate", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    first = None
    if r.status != 200:
        r.read()
        c.close()
        return r.status, time.perf_counter() - t0, None
    while True:
        line = r.readline()
        if not line:
            break
        if line.startswith(b"event: preview") and first is None:
            first = time.perf_counter() - t0
        if line.startswith(b"data: ") and on_event is not None:
            on_event(json.loads(line[6:]))
    c.close()
    return r.status, time.perf_counter() - t0, first


def _memory_mib(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(line.split()[1]) / 1024
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--quick", action="store_true", help="few requests (a smoke test)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--burst", type=int, default=50)
    p.add_argument("--device", default="cpu")
    p.add_argument("--leavers", type=int, default=4)
    p.add_argument("--idle", type=int, default=250)
    a = p.parse_args()
    if a.quick:
        a.repeats, a.burst = 2, 8
    steps = 4 if a.quick else 20
    proc = subprocess.Popen(
        [sys.executable, "-m", "cfgdiff", "serve", "--checkpoint", str(a.checkpoint), "--port",
         "0", "--device", a.device],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        m = re.search(r"at http://([\d.]+):(\d+)/", line)
        if m is None:
            print(line, proc.stderr.read(), file=sys.stderr)
            return 1
        host, port = m.group(1), int(m.group(2))
        import torch

        from cfgdiff.runtime import configure_cpu_threads, describe_machine

        configure_cpu_threads()
        print(f"server: {line.strip()}; {describe_machine(torch.device(a.device))}")
        print(f"load average before: {os.getloadavg()[0]:.2f}")

        c = http.client.HTTPConnection(host, port, timeout=60)
        c.request("GET", "/api/model")
        info = json.loads(c.getresponse().read())
        k = len(info["classes"])  # class i asks for i % k
        longest = {"steps": info["max_steps"], "n": info["max_image_steps"] // info["max_steps"]}
        c.close()

        # 1. first preview
        firsts, totals = [], []
        for _ in range(a.repeats):
            status, total, first = _post(host, port, {"class": 7 % k, "scale": 3, "steps": steps})
            assert status == 200, status
            firsts.append(first)
            totals.append(total)
        print(
            f"first preview, 1 image x {steps} steps, s=3, {a.repeats} requests: median "
            f"{statistics.median(firsts):.3f} s, max {max(firsts):.3f} s; whole image median "
            f"{statistics.median(totals):.3f} s"
        )

        # 2. images/s the page sustains
        n, requests = (2, 2) if a.quick else (8, 6)
        t0 = time.perf_counter()
        for i in range(requests):
            status, _, _ = _post(host, port, {"class": i % k, "scale": 3, "steps": steps, "n": n,
                                              "seed": i})  # fmt: skip
            assert status == 200, status
        page_ips = n * requests / (time.perf_counter() - t0)
        from cfgdiff.checkpoint import load_for_sampling
        from cfgdiff.runtime import resolve_precision
        from cfgdiff.sampling.generate import generate
        from cfgdiff.sampling.guidance import Guidance
        from cfgdiff.sampling.settings import SamplingSettings

        loaded = load_for_sampling(a.checkpoint, a.device)
        precision = resolve_precision("auto", torch.device(a.device))
        warm = SamplingSettings(steps=2, precision=precision, compile="off")
        generate(loaded.net, loaded.cfg, [0], settings=warm, guidance=Guidance(scale=3.0))
        alone: list[float] = []

        def alone_run() -> None:  # in a thread of its own, as the server's worker runs
            t0 = time.perf_counter()
            for i in range(requests):
                settings = SamplingSettings(
                    sampler="dpmpp-2m", steps=steps, seed=i, batch_size=n, precision=precision,
                    compile="off",
                )  # fmt: skip
                generate(loaded.net, loaded.cfg, [i % k] * n, settings=settings,
                         guidance=Guidance(scale=3.0))  # fmt: skip
            alone.append(n * requests / (time.perf_counter() - t0))

        worker = threading.Thread(target=alone_run)
        worker.start()
        worker.join()
        cli = subprocess.run(
            [sys.executable, "-m", "cfgdiff", "sample", "--checkpoint", str(a.checkpoint),
             "--sampler", "dpmpp-2m", "--scale", "3", "--classes", str(3 % k), "--per-class",
             str(n), "--steps", str(steps),
             "--device", a.device, "--out", str(Path(tempfile.mkdtemp()) / "sample.png")],
            capture_output=True, text=True,
        )  # fmt: skip
        m_cli = re.search(r"([\d.]+) images/s", cli.stdout)
        print(
            f"sustained, {requests} requests of {n} images x {steps} steps, s=3: page "
            f"{page_ips:.2f} images/s; generate alone (a worker thread, as the server's) "
            f"{alone[0]:.2f} images/s; `cfgdiff sample` (its main thread) "
            f"{m_cli.group(1) if m_cli else '?'} images/s"
        )

        # 3. a burst
        before = _memory_mib(proc.pid)
        results: list = [None] * a.burst
        go = threading.Barrier(a.burst)

        def one(i: int) -> None:
            go.wait()
            results[i] = _post(host, port, {"class": i % k, "scale": 3, "steps": steps, "n": 4})

        threads = [threading.Thread(target=one, args=(i,)) for i in range(a.burst)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        after = _memory_mib(proc.pid)
        ok = [r for r in results if r[0] == 200]
        refused = [r for r in results if r[0] == 503]
        other = [r for r in results if r[0] not in (200, 503)]
        print(
            f"burst of {a.burst} (4 images x {steps} steps each): {len(ok)} served, "
            f"{len(refused)} refused with 503, {len(other)} other; refusals answered in at most "
            f"{max((r[1] for r in refused), default=0):.3f} s; last served one done after "
            f"{max((r[1] for r in ok), default=0):.2f} s; all answered in {wall:.2f} s"
        )
        print(
            f"server memory: {before['VmRSS']:.0f} MiB before, {after['VmRSS']:.0f} MiB after, "
            f"peak {after['VmHWM']:.0f} MiB"
        )
        status, _, _ = _post(host, port, {"class": 1 % k, "scale": 3, "steps": steps})
        print(f"after the burst: a new request answered {status}")

        # 4. clients that queue and leave
        long = _stream(host, port, {"class": 0, **longest})
        _until(long, b"event: started")
        waiting = []
        for _ in range(a.leavers):
            c = _stream(host, port, {"class": 2 % k, "steps": steps, "n": 1})
            c.sock.shutdown(socket.SHUT_RDWR)
            c.close()
            deadline = time.perf_counter() + 2
            while _get(host, port, "/api/status")["waiting"] and time.perf_counter() < deadline:
                time.sleep(0.01)
            waiting.append(_get(host, port, "/api/status")["waiting"])
        c = _stream(host, port, {"class": 1 % k, "steps": steps})
        after_leavers = c.response.status
        c.close()
        print(
            f"{a.leavers} clients that queued and left: waiting after each {waiting}; a new "
            f"request then answered {after_leavers}"
        )
        long.close()

        # 5. idle connections
        while _get(host, port, "/api/status")["running"] is not None:
            time.sleep(0.05)
        idle = [socket.create_connection((host, port)) for _ in range(a.idle)]
        t0 = time.perf_counter()
        page = http.client.HTTPConnection(host, port, timeout=30)
        page.request("GET", "/")
        page_status = page.getresponse().status
        page_s = time.perf_counter() - t0
        page.close()
        status, total, first = _post(host, port, {"class": 7 % k, "scale": 3, "steps": steps})
        closed = 0
        for sock in idle:
            sock.settimeout(0.01)
            try:
                closed += sock.recv(1) == b""
            except (TimeoutError, ConnectionResetError):
                pass
            sock.close()
        print(
            f"{a.idle} idle connections open: GET / answered {page_status} in {page_s:.3f} s; "
            f"a request answered {status}, first preview after {first or 0:.3f} s; the server "
            f"closed {closed} idle ones to make room"
        )

        print(f"load average after: {os.getloadavg()[0]:.2f}")

        # 6. SIGTERM mid-stream
        watch = _stream(host, port, {"class": 0, **longest})
        _until(watch, b"event: preview")
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        rest = watch.response.read()
        rc = proc.wait(30)
        stop_s = time.perf_counter() - t0
        last = [json.loads(x[6:]) for x in rest.split(b"\n") if x.startswith(b"data: ")][-1:]
        out, err = proc.communicate()
        final = f"{last[0]['type']} ({last[0].get('reason')})" if last else "none"
        print(
            f"SIGTERM mid-stream: exit status {rc} after {stop_s:.2f} s; the client's last "
            f"event: {final}; the server printed {out.strip()!r}; stderr: "
            f"{'nothing' if not err else repr(err[-300:])}"
        )
        good = (
            not other and status == 200 and after_leavers == 200 and max(waiting) == 0
            and page_status == 200 and rc == 0 and last and not err
        )  # fmt: skip
        return 0 if good else 1
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _stream(host: str, port: int, body: dict) -> http.client.HTTPConnection:
    """A request whose answer is left open: the connection, its response in .response."""
    c = http.client.HTTPConnection(host, port, timeout=60)
    c.request("POST", "/api/generate", json.dumps(body), {"Content-Type": "application/json"})
    c.response = c.getresponse()
    return c


def _until(c: http.client.HTTPConnection, marker: bytes) -> None:
    while marker not in c.response.readline():
        pass


def _get(host: str, port: int, path: str) -> dict:
    c = http.client.HTTPConnection(host, port, timeout=30)
    c.request("GET", path)
    out = json.loads(c.getresponse().read())
    c.close()
    return out


if __name__ == "__main__":
    sys.exit(main())
