"""Memory of data beyond RAM: decoding a large folder, training two processes on it, training
under a memory limit smaller than the data, and the speed of the mapped path on MNIST.

    python bench/data_memory.py [--images 200000] [--size 64] [--work DIR] [--before SRC]
                                [--limit-mib 1536] [--quick]

1. Builds a synthetic folder of `--images` RGB PNGs (10 classes) and the same images as
   WebDataset tar shards (1000 samples to a tar), once, under --work.
2. Decodes each into an empty data directory in a fresh process: wall time and the process's
   peak resident memory (VmHWM).
3. Trains 2 processes under torchrun on the folder (tiny preset, batch 64, --train-steps): each
   process's peak RSS, its file-backed part (pages of the shared map, counted in every process
   that touches them), its anonymous part, and its proportional share PSS (a shared page counted
   1/k in each of the k processes mapping it): the sum of PSS over the processes is what they
   hold together.
4. Trains one process in a memory cgroup limited to --limit-mib (Linux cgroup v1 or v2, as
   root), from a checkpoint on, and resumes it: the run completes where the data is larger than
   the memory it may use.
5. MNIST training speed, mapped against in memory (the images copied into the process, as before
   the map), interleaved in one run: the ratio of training images/s.
6. Peak memory per process and the sum over processes against dataset size (--scaling-sizes,
   the first images of the folder) and the number of processes (1, 2, 4).

With --before SRC (the `src` folder of an earlier checkout, e.g. `git worktree add /tmp/before
<commit>`), 2 to 4 and 6 also run that version (PYTHONPATH=SRC), for the figures before.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"


def make_data(root: Path, n: int, size: int) -> tuple[Path, Path]:
    """(folder, shards folder) of n RGB size x size PNGs in 10 classes, made once."""
    from PIL import Image

    folder, shards = root / "folder", root / "shards"
    if (root / "done").is_file():
        return folder, shards
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(shards, ignore_errors=True)
    shards.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    tar = None
    for i in range(n):
        c = i % 10
        if i % 1000 == 0:
            if tar is not None:
                tar.close()
            tar = tarfile.open(shards / f"train-{i // 1000:06d}.tar", "w")
        base = np.stack([(xx * (c + 1) * 4) % 256, (yy * 3 + c * 25) % 256, (xx + yy) % 256], -1)
        a = (base + rng.integers(0, 24, (size, size, 3))).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG", compress_level=1)
        png = buf.getvalue()
        (folder / f"c{c}").mkdir(parents=True, exist_ok=True)
        (folder / f"c{c}" / f"{i:07d}.png").write_bytes(png)
        for ext, data in (("png", png), ("cls", str(c).encode())):
            info = tarfile.TarInfo(f"{i:07d}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tar.close()
    (shards / "classes.txt").write_text("".join(f"c{c}\n" for c in range(10)))
    (root / "done").write_text(str(n))
    return folder, shards


def env_for(src: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}


def decode(src: Path, name: str, data_dir: Path) -> dict:
    """Load dataset `name` into an empty `data_dir` in a fresh process: seconds, VmHWM."""
    shutil.rmtree(data_dir, ignore_errors=True)
    code = (
        "import time,sys; t=time.perf_counter(); from cfgdiff.data import load_dataset; "
        f"d=load_dataset({name!r}, {str(data_dir)!r}); "
        "hwm=[l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
        "print(len(d), time.perf_counter()-t, int(hwm)*1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env_for(src), capture_output=True,
                         text=True)  # fmt: skip
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    n, secs, hwm = out.stdout.split()[-3:]
    return {"images": int(n), "s": float(secs), "peak_mib": int(hwm) / 2**20}


def _memory(pid: int) -> dict | None:
    try:
        status = {}
        for line in open(f"/proc/{pid}/status"):
            key, _, value = line.partition(":")
            if value.split():
                status[key] = value.split()[0]
        pss = next(l for l in open(f"/proc/{pid}/smaps_rollup") if l.startswith("Pss:"))
    except (OSError, StopIteration):
        return None
    kib = {k: int(status.get(k, 0)) for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}
    return {**kib, "Pss": int(pss.split()[1])}


class Watch:
    """Polls the memory of every process whose command line holds `marker`, keeping each
    one's largest figures."""

    def __init__(self, marker: str):
        self.marker, self.peaks, self._stop = marker, {}, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for p in Path("/proc").iterdir():
                if not p.name.isdigit():
                    continue
                try:
                    cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                launcher = "torch.distributed.run" in cmd or "torchrun" in cmd
                if self.marker in cmd and not launcher and "cfgdiff" in cmd:
                    m = _memory(int(p.name))
                    if m is not None:
                        old = self.peaks.setdefault(int(p.name), m)
                        for k, v in m.items():
                            old[k] = max(old[k], v)
            time.sleep(0.3)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()


def train_cmd(dataset: str, out: Path, data_dir: Path, steps: int, batch: int, extra=()):
    return ["-m", "cfgdiff", "train", "--dataset", dataset, "--out", str(out), "--preset", "tiny",
            "--steps", str(steps), "--batch-size", str(batch), "--sample-every", "0",
            "--checkpoint-every", str(max(1, steps // 2)), "--no-progress", "--precision", "fp32",
            "--data-dir", str(data_dir), "--patch-size", "2", *extra]  # fmt: skip


def torchrun(src: Path, dataset: str, work: Path, data_dir: Path, steps: int,
             procs: int = 2) -> dict:  # fmt: skip
    """Train `steps` on `procs` processes under torchrun: seconds and each process's peaks (MiB),
    the largest first."""
    out = work / f"tr-{src.parent.name}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(procs), *train_cmd(dataset, out, data_dir, steps, 64)]  # fmt: skip
    t0 = time.perf_counter()
    with Watch(str(out)) as w:
        r = subprocess.run(cmd, env=env_for(src), capture_output=True, text=True)
    took = time.perf_counter() - t0
    if r.returncode:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1], "s": took}
    found = sorted(w.peaks.values(), key=lambda m: -m["VmHWM"])[:procs]
    mib = {k: [m[k] / 1024 for m in found] for k in ("VmHWM", "RssAnon", "RssFile", "Pss")}
    return {"s": took, **mib}


def subset_folder(folder: Path, root: Path, n: int) -> Path:
    """The first n images of make_data's folder (image i is in class i mod 10) as hard links in
    `root`, made once: the same images, a smaller dataset."""
    if (root / "done").is_file():
        return root / "folder"
    shutil.rmtree(root, ignore_errors=True)
    for i in range(n):
        c = i % 10
        (root / "folder" / f"c{c}").mkdir(parents=True, exist_ok=True)
        os.link(folder / f"c{c}" / f"{i:07d}.png", root / "folder" / f"c{c}" / f"{i:07d}.png")
    (root / "done").write_text(str(n))
    return root / "folder"


# what the version before the map held per process, in dataset sizes (part 2 at 200,000 images:
# 5,011 MiB of peak RSS for 2,344 MiB of images), to leave out runs that would not fit
BEFORE_COPY = 2.5


def available_mib() -> float:
    return next(int(line.split()[1]) for line in open("/proc/meminfo")
                if line.startswith("MemAvailable")) / 1024  # fmt: skip


def scaling(versions, folder: Path, a, record: dict) -> None:
    """Peak memory per process and the sum of PSS against dataset size and process count: each
    size's folder decoded first into its own data directory (so that training only reads the
    cache), then `--scaling-steps` steps on each count of `--scaling-procs` processes. A
    "before" run whose copies would not fit in the available memory is left out."""
    sizes = [int(v) for v in a.scaling_sizes.split(",")]
    print(f"\n5. peak memory against dataset size and processes ({a.scaling_steps} steps of the "
          "tiny preset, batch 64; MiB)")  # fmt: skip
    print(f"{'version':8s} {'images':>8s} {'GiB':>5s} {'procs':>5s} {'peak RSS (largest)':>19s} "
          f"{'sum PSS':>8s} {'s':>5s}")  # fmt: skip
    rows = []
    for n in sizes:
        gib = n * 3 * a.size * a.size / 2**30
        sub = folder if n == a.images else subset_folder(folder, a.work / f"subset-{n}", n)
        for label, src in versions:
            dd = a.work / (f"dd-{label}-folder" + ("" if n == a.images else f"-{n}"))
            if not (dd / "cache").is_dir():
                decode(src, f"folder:{sub}", dd)
            for procs in (int(v) for v in a.scaling_procs.split(",")):
                if label == "before" and procs * gib * 1024 * BEFORE_COPY > available_mib():
                    print(f"{label:8s} {n:8,d} {gib:5.2f} {procs:5d} left out: {procs} copies "
                          f"would not fit in {available_mib():,.0f} MiB available")  # fmt: skip
                    continue
                r = torchrun(src, f"folder:{sub}", a.work, dd, a.scaling_steps, procs)
                row = {"version": label, "images": n, "gib": gib, "procs": procs, **r}
                rows.append(row)
                if "error" in r:
                    print(f"{label:8s} {n:8,d} {gib:5.2f} {procs:5d} error: {r['error']}")
                    continue
                print(f"{label:8s} {n:8,d} {gib:5.2f} {procs:5d} {max(r['VmHWM']):19.0f} "
                      f"{sum(r['Pss']):8.0f} {r['s']:5.0f}", flush=True)  # fmt: skip
    record["scaling"] = rows


def cgroup_run(src: Path, dataset: str, work: Path, data_dir: Path, limit: int, steps: int):
    """Train `steps` in a memory cgroup of `limit` bytes, then resume to 2 x steps in it."""
    v1 = Path("/sys/fs/cgroup/memory")
    group = v1 / "cfgdiff-bench" if v1.is_dir() else Path("/sys/fs/cgroup/cfgdiff-bench")
    try:
        group.mkdir(exist_ok=True)
        (group / ("memory.limit_in_bytes" if v1.is_dir() else "memory.max")).write_text(str(limit))
        if v1.is_dir():
            (group / "memory.max_usage_in_bytes").write_text("0")
    except OSError as e:
        return {"error": f"no memory cgroup here ({e})"}
    out = work / f"cg-{src.parent.name}"
    shutil.rmtree(out, ignore_errors=True)
    results = []
    for n, extra in ((steps, ()), (2 * steps, ("--resume",))):
        cmd = train_cmd(dataset, out, data_dir, n, 64, extra)
        shell = f"echo $$ > {group}/cgroup.procs && exec {sys.executable} " + " ".join(cmd)
        t0 = time.perf_counter()
        r = subprocess.run(["bash", "-c", shell], env=env_for(src), capture_output=True, text=True)
        peak = None
        if v1.is_dir():
            peak = int((group / "memory.max_usage_in_bytes").read_text()) / 2**20
        results.append({"rc": r.returncode, "s": time.perf_counter() - t0, "cgroup_peak_mib": peak,
                        "last": (r.stderr.strip().splitlines() or ["?"])[-1][:160]})  # fmt: skip
        if r.returncode:
            break
    rows = list(csv.DictReader(open(out / "loss.csv"))) if (out / "loss.csv").is_file() else []
    return {"runs": results, "last_step": int(rows[-1]["step"]) if rows else 0}


def mnist_speed(src_new: Path, work: Path, data_dir: Path, steps: int, rounds: int) -> dict:
    """Training images/s on MNIST, mapped (this version) against the images copied into memory
    first (CFGDIFF_BENCH_IN_MEMORY through bench/in_memory.py), interleaved."""
    speeds: dict[str, list[float]] = {"mapped": [], "in memory": []}
    for r in range(rounds):
        for kind in ("mapped", "in memory"):
            out = work / f"speed-{kind.replace(' ', '-')}-{r}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = train_cmd("mnist", out, data_dir, steps, 64)
            args = [sys.executable, *cmd]
            if kind == "in memory":
                args = [sys.executable, str(HERE / "in_memory.py"), *cmd[2:]]
            env = {**env_for(src_new), "OMP_NUM_THREADS": str(os.cpu_count())}
            subprocess.run(args, env=env, check=True, capture_output=True)
            rows = list(csv.DictReader(open(out / "loss.csv")))[1:]  # the first window warms up
            speeds[kind].append(float(np.mean([float(x["images_per_s"]) for x in rows])))
    return speeds


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=200_000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--work", type=Path, default=Path("/tmp/cfgdiff-data-bench"))
    p.add_argument("--before", type=Path, default=None, help="src/ of an earlier checkout")
    p.add_argument("--limit-mib", type=int, default=1536)
    p.add_argument("--train-steps", type=int, default=40)
    p.add_argument("--speed-steps", type=int, default=120)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="seconds: 2,000 images of 16x16")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: decode,torchrun,"
                   "cgroup,speed,scaling")  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.add_argument("--scaling-sizes", default="50000,100000,200000",
                   help="images in each dataset of part 5 (at most --images)")  # fmt: skip
    p.add_argument("--scaling-procs", default="1,2,4", help="process counts of part 5")
    p.add_argument("--scaling-steps", type=int, default=20)
    a = p.parse_args()
    if a.quick:
        a.images, a.size, a.train_steps, a.speed_steps, a.rounds = 2000, 16, 4, 12, 1
        a.scaling_sizes, a.scaling_procs, a.scaling_steps = "2000", "1,2", 2
        a.skip = a.skip or "cgroup"
    skip = set(filter(None, a.skip.split(",")))
    a.work.mkdir(parents=True, exist_ok=True)
    data_root = a.work / f"data-{a.images}-{a.size}"
    t0 = time.perf_counter()
    folder, shards = make_data(data_root, a.images, a.size)
    gib = a.images * 3 * a.size * a.size / 2**30
    took = time.perf_counter() - t0
    print(f"data: {a.images:,} RGB {a.size}x{a.size} images, {gib:.2f} GiB as uint8 "
          f"({took:.0f} s to make or find); {os.cpu_count()} cores")  # fmt: skip
    versions = [("after", SRC)] + ([("before", a.before)] if a.before else [])
    record: dict = {"images": a.images, "size": a.size, "dataset_gib": gib}
    if "decode" not in skip:
        print("\n1. decoding into an empty data directory (a fresh process each)")
        print(f"{'version':8s} {'dataset':8s} {'s':>7s} {'peak RSS MiB':>13s}")
        for label, src in versions:
            for kind, name in (("folder", f"folder:{folder}"), ("shards", f"shards:{shards}")):
                if label == "before" and kind == "shards":
                    continue
                r = decode(src, name, a.work / f"dd-{label}-{kind}")
                record[f"decode_{label}_{kind}"] = r
                if "error" in r:
                    print(f"{label:8s} {kind:8s} error: {r['error']}")
                else:
                    print(f"{label:8s} {kind:8s} {r['s']:7.1f} {r['peak_mib']:13.0f}", flush=True)
    if "torchrun" not in skip:
        print(f"\n2. torchrun, 2 processes, {a.train_steps} steps of the tiny preset, batch 64 "
              "(MiB per process; PSS shares each shared page among its processes)")  # fmt: skip
        print(f"{'version':8s} {'peak RSS':>17s} {'file-backed':>17s} {'anonymous':>17s} "
              f"{'PSS':>17s} {'sum PSS':>8s}")  # fmt: skip
        for label, src in versions:
            dd = a.work / f"dd-{label}-folder"
            r = torchrun(src, f"folder:{folder}", a.work, dd, a.train_steps)
            record[f"torchrun_{label}"] = r
            if "error" in r:
                print(f"{label:8s} error: {r['error']}")
                continue

            def two(v):
                return " / ".join(f"{x:7.0f}" for x in v)

            print(f"{label:8s} {two(r['VmHWM'])} {two(r['RssFile'])} {two(r['RssAnon'])} "
                  f"{two(r['Pss'])} {sum(r['Pss']):8.0f}", flush=True)  # fmt: skip
    if "cgroup" not in skip:
        print(
            f"\n3. one process in a memory cgroup of {a.limit_mib} MiB ({gib * 1024:,.0f} MiB "
            f"of images): {a.train_steps} steps, then resumed to {2 * a.train_steps}"
        )
        for label, src in versions:
            dd = a.work / f"dd-{label}-folder"
            r = cgroup_run(src, f"folder:{folder}", a.work, dd, a.limit_mib << 20, a.train_steps)
            record[f"cgroup_{label}"] = r
            if "error" in r:
                print(f"{label:8s} {r['error']}")
                continue
            for i, run in enumerate(r["runs"]):
                what = "train " if i == 0 else "resume"
                print(f"{label:8s} {what} exit {run['rc']}, {run['s']:.0f} s, cgroup peak "
                      f"{run['cgroup_peak_mib']} MiB; {run['last']}")  # fmt: skip
            print(f"{label:8s} last step in loss.csv: {r['last_step']}")
    if "speed" not in skip:
        print(
            f"\n4. MNIST, the tiny preset (a step short enough for the data path to show), "
            f"batch 64, {a.speed_steps} steps, "
            f"{a.rounds} round(s) interleaved: training images/s"
        )
        dd = a.work / "dd-mnist"
        shutil.copytree(Path.home() / ".cache/cfgdiff/data/cache/mnist", dd / "cache" / "mnist",
                        dirs_exist_ok=True)  # fmt: skip
        s = mnist_speed(SRC, a.work, dd, a.speed_steps, a.rounds)
        record["mnist_speed"] = s
        m, i = np.median(s["mapped"]), np.median(s["in memory"])
        print(f"mapped {s['mapped']} / in memory {s['in memory']}: ratio {m / i:.3f}")
    if "scaling" not in skip:
        scaling(versions, folder, a, record)
    print("\n" + json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
