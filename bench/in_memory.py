"""`python bench/in_memory.py train ...`: `cfgdiff train` with its dataset copied into the
process's memory and its batches drawn from that copy on the main thread, as training read data
before the memory map (bench/data_memory.py's speed ratio compares the two in one run)."""

from __future__ import annotations

import dataclasses
import sys

from cfgdiff.data import batches
from cfgdiff.train import run as run_module

_load = run_module.load_dataset


def _copied(*args, **kwargs):
    d = _load(*args, **kwargs)
    return dataclasses.replace(d, images=d.images.clone(), labels=d.labels.clone())


run_module.load_dataset = _copied
batches.choose_placement = lambda images, device: ("device", "data: copied into memory")

if __name__ == "__main__":
    from cfgdiff.cli import main

    raise SystemExit(main(sys.argv[1:]))
