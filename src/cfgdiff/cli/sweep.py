"""`cfgdiff sweep`: every figure of a model's judge across guidance scales (metrics.sweep);
parse, one library call, print."""

from __future__ import annotations

import argparse
from pathlib import Path

from cfgdiff.cli.options import (
    floats,
    int_in,
    judged_options,
    reference_of,
    reference_options,
    sampling_options,
    sampling_request,
)
from cfgdiff.cli.progress import log


def add_parser(sub) -> None:
    sw = sub.add_parser("sweep", help="metrics across guidance scales: CSV, JSON and plots")
    sampling_options(sw, scale=False)
    g = sw.add_mutually_exclusive_group()
    g.add_argument("--scales", type=floats, default=None, help="comma-separated scales s")
    g.add_argument("--ws", type=floats, help="comma-separated paper weights w = s - 1")
    sw.add_argument(
        "--n",
        "--num-samples",
        type=int_in(10, 1_000_000),
        default=5000,
        help="samples per scale (a text model: rounded up to whole rounds of its held-out prompts)",
    )
    sw.add_argument("--out", type=Path, help="output folder (default: RUN/sweep)")
    reference_options(sw)
    judged_options(sw)


def run(a: argparse.Namespace) -> int:
    from cfgdiff import dist
    from cfgdiff.metrics.sweep import SweepRequest, sweep

    req = SweepRequest(
        sampling=sampling_request(a), scales=tuple(a.scales) if a.scales else None,
        ws=tuple(a.ws) if a.ws else None, n=a.n, reference=reference_of(a), out=a.out,
    )  # fmt: skip
    result = sweep(req, log=log, world=dist.world())
    if result is not None:  # rank 0 of a torchrun job, or the one process
        print("\n".join(result.lines()))
    return 0
