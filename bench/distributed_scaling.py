"""Scaling efficiency of distributed training: training images/s of one process against N
processes (torch.distributed, DistributedDataParallel) at the same global batch, and what
fraction of ideal that is.

    python bench/distributed_scaling.py --device cpu --nproc 2 --threads 2   # CPU sanity check
    python bench/distributed_scaling.py --device cuda --nproc 8 --preset cifar10

Each configuration is launched as its own processes, with the environment torchrun gives its
workers, and runs the training step of `cfgdiff train` (cfgdiff.dist's process group, the
UNet in DDP, the global batch's draws sliced per rank, fused AdamW, the EMA) on random
images of the preset's shape, so no dataset is read. Images/s are rank 0's, over --steps
steps after --warmup, between two barriers.

On the CPU the machine's --threads are shared out: 1 process x T threads against N processes x
T/N threads, so ideal is the same images/s and efficiency = images/s(N) / images/s(1). This is a
sanity check of the communication overhead only (gloo over loopback), not a reason to run
several processes on one CPU. On GPUs each process drives its own GPU, so ideal is N times one
GPU and efficiency = images/s(N) / (N x images/s(1)).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def worker(a: argparse.Namespace) -> None:
    import torch

    from cfgdiff import dist
    from cfgdiff.diffusion import training_loss
    from cfgdiff.ema import EMA
    from cfgdiff.presets import PRESETS
    from cfgdiff.schedule import make_schedule
    from cfgdiff.train import make_optimizer
    from cfgdiff.unet import UNet

    torch.set_num_threads(a.threads_each)
    device = torch.device(a.device)
    with dist.session(device) as w:
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        cfg = PRESETS[a.preset]
        batch = a.batch_size or cfg.train.batch_size
        per = dist.per_rank_batch(batch, w) if w.enabled else batch
        torch.manual_seed(0)
        net = UNet(cfg.model).to(device)
        opt = make_optimizer(net, cfg.train, device)
        forward = dist.wrap(net, device) if w.enabled else net
        ema = EMA(net, cfg.train.ema_decay)
        sched = make_schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps)
        m = cfg.model
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.rand(per, m.in_channels, m.image_size, m.image_size, device=device) * 2 - 1
        y = torch.randint(0, m.num_classes, (per,), device=device)
        rows = (w.rank * per, batch) if w.enabled else None

        def step() -> None:
            loss = training_loss(forward, x, y, sched, cfg.diffusion, m.num_classes, g, rows=rows)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update(net)

        for _ in range(a.warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier(w)
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier(w)
        dt = time.perf_counter() - t0
        if w.is_main:
            print(json.dumps({"images_per_s": a.steps * batch / dt, "batch": batch, "per": per}))


def launch(a: argparse.Namespace, nproc: int, threads_each: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, __file__, "--worker", "--threads-each", str(threads_each),
            "--preset", a.preset, "--device", a.device, "--steps", str(a.steps),
            "--warmup", str(a.warmup), "--batch-size", str(a.batch_size or 0)]  # fmt: skip
    procs = []
    for r in range(nproc):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads_each)}
        if nproc > 1:
            env.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True))
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        sys.exit(f"a worker failed: {[p.returncode for p in procs]}")
    return json.loads(outs[0].strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", default="cpu-demo")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (preset's)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="CPU threads in all (cores seen)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="5 steps after 1 of warm-up")
    p.add_argument("--json", type=Path)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads-each", type=int, default=1, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.batch_size == 0:
        a.batch_size = None
    if a.worker:
        return worker(a)
    if a.quick:
        a.steps, a.warmup = 5, 1
    import torch

    from cfgdiff.runtime import describe_machine

    cpu = a.device == "cpu"
    threads = a.threads or len(os.sched_getaffinity(0))
    one = launch(a, 1, threads if cpu else 1)
    many = launch(a, a.nproc, max(1, threads // a.nproc) if cpu else 1)
    ideal = one["images_per_s"] * (1 if cpu else a.nproc)
    eff = many["images_per_s"] / ideal
    machine = describe_machine(torch.device(a.device))
    if cpu:
        setup = (f"1 process x {threads} threads vs {a.nproc} x {max(1, threads // a.nproc)} "
                 "threads (ideal: equal images/s)")  # fmt: skip
    else:
        setup = f"1 GPU vs {a.nproc} GPUs, one process each (ideal: {a.nproc}x)"
    print(f"{a.preset}, global batch {one['batch']} ({many['per']} per process), {a.steps} "
          f"steps on {a.device}: {machine}")  # fmt: skip
    print(f"  {setup}")
    print(f"  1 process:    {one['images_per_s']:9.1f} images/s")
    print(f"  {a.nproc} processes:  {many['images_per_s']:9.1f} images/s")
    print(f"  scaling efficiency: {eff:.2f} of ideal")
    if cpu:
        load = os.getloadavg()[0]
        print(
            f"  (load average {load:.1f} on {len(os.sched_getaffinity(0))} cores while it ran",
            end="",
        )
        print("; above 1: one process's threads lost more to the other jobs than the processes "
              "lost to gloo)" if eff > 1.05 else ")")  # fmt: skip
    if a.json is not None:
        record = {"preset": a.preset, "device": a.device, "machine": machine, "setup": setup,
                  "steps": a.steps, "global_batch": one["batch"], "nproc": a.nproc,
                  "one": one["images_per_s"], "many": many["images_per_s"],
                  "efficiency": eff}  # fmt: skip
        if cpu:
            record["load_average"] = os.getloadavg()[0]
        a.json.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
