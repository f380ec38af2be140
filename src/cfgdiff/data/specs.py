"""The datasets cfgdiff knows, and dataset names as parsed values.

Owns: one `DatasetSpec` per built-in dataset (its class names, the fetcher that obtains it,
whether its images mean the same mirrored, the recipe of the classifier that judges samples of
it, and the preset fields measured better on it), the spec of image folders, and `DatasetName`,
the parsed form of a name ("mnist", "folder:PATH"), so nothing else slices strings.

A new dataset is one entry in DATASETS plus its fetcher in sources.py: the CLI's choices and
help, the cache, the judge and the presets read it from here.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cfgdiff.data import sources
from cfgdiff.errors import DataError

FOLDER_PREFIX = "folder:"
SHARDS_PREFIX = "shards:"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    # label index -> name; empty for folders (their sub-folder names, sorted)
    class_names: tuple[str, ...]
    # (data_dir, log, timeout) -> ({split: (images, labels)}, where they came from); None for
    # folders, which are read in place
    fetch: Callable[..., tuple[Any, str]] | None
    # random horizontal flips by default: the images mean the same mirrored (DDPM's CIFAR-10
    # recipe, Ho et al. 2020, App. B); off for digits and clothes, and for folders, whose owner
    # decides (hflip=True)
    hflip: bool = False
    # how its judge is trained (metrics/classifier.py): epochs, whether flips keep the label,
    # and (folders) a floor on optimizer steps; recorded in the judge's meta and compared
    judge: Mapping[str, Any] = field(default_factory=dict)
    # preset name -> {"section.field": value}: where a preset's choice measured worse on this
    # dataset, what it takes here instead, unless the run sets one of those fields itself
    # (docs/results.md, "Fashion-MNIST")
    preset_changes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        "mnist",
        sources.MNIST.class_names,
        sources.fetch_mnist,
        judge={"epochs": 2, "flip": False},
    ),
    "fashion-mnist": DatasetSpec(
        "fashion-mnist",
        sources.FASHION_MNIST.class_names,
        sources.fetch_fashion_mnist,
        judge={"epochs": 6, "flip": True},
        # cpu-demo's timestep mixture was tuned on MNIST; uniform timesteps gave better s = 1
        # accuracy and FID here on both CPUs measured
        preset_changes={
            "cpu-demo": {
                "diffusion.t_sampling": "uniform",
                "diffusion.t_mean": 0.0,
                "diffusion.t_std": 1.0,
                "diffusion.t_uniform": 0.0,
            }
        },
    ),
    "cifar10": DatasetSpec(
        "cifar10",
        sources.CIFAR10_CLASSES,
        sources.fetch_cifar10,
        hflip=True,
        judge={"epochs": 8, "flip": True},
    ),
}

# Image folders: the judge trains at least 300 steps (3 epochs of 180 images are 6 steps, which
# left a 40x40 3-class folder's judge at 72 % held-out accuracy; 300 steps reach 100 % there).
FOLDER = DatasetSpec(
    "folder",
    (),
    None,
    judge={"epochs": 3, "flip": False, "min_steps": 300},
)

# WebDataset tar shards (data/shards.py): a user's own images, judged as a folder's are.
SHARDS = dataclasses.replace(FOLDER, name="shards")

NAMES_HELP = " | ".join([*DATASETS, f"{FOLDER_PREFIX}PATH", f"{SHARDS_PREFIX}PATTERN"])


@dataclass(frozen=True)
class DatasetName:
    """A dataset name, parsed: a built-in's spec, the folder spec and the folder's absolute
    path, or the shards spec and the shards' pattern (absolute). str() gives the canonical name
    that runs record."""

    spec: DatasetSpec
    folder: Path | None = None
    shards: str | None = None

    @classmethod
    def parse(cls, name: str) -> DatasetName:
        if name in DATASETS:
            return cls(DATASETS[name])
        if name.startswith(FOLDER_PREFIX) and len(name) > len(FOLDER_PREFIX):
            path = os.path.abspath(os.path.expanduser(name[len(FOLDER_PREFIX) :]))
            return cls(FOLDER, Path(path))
        if name.startswith(SHARDS_PREFIX) and len(name) > len(SHARDS_PREFIX):
            pattern = os.path.abspath(os.path.expanduser(name[len(SHARDS_PREFIX) :]))
            return cls(SHARDS, shards=pattern)
        raise DataError(
            f"`dataset` must be one of {', '.join(DATASETS)}, {FOLDER_PREFIX}PATH or "
            f"{SHARDS_PREFIX}PATTERN, got {name!r}"
        )

    @property
    def is_folder(self) -> bool:
        """A user's own images (a folder or shards): no test split, judged as folders are."""
        return self.folder is not None or self.shards is not None

    def __str__(self) -> str:
        if self.shards is not None:
            return f"{SHARDS_PREFIX}{self.shards}"
        return f"{FOLDER_PREFIX}{self.folder}" if self.folder is not None else self.spec.name


def check_name(name: str) -> None:
    DatasetName.parse(name)


def canonical_name(name: str) -> str:
    """folder:PATH with ~ expanded and PATH made absolute, so that a run records where its data
    is, and can be resumed, evaluated and have its judge found from any directory; other names
    unchanged (an unknown one too: it is refused where it is used). Symbolic links are kept as
    given."""
    try:
        return str(DatasetName.parse(name))
    except DataError:
        return name


def is_folder(name: str) -> bool:
    return name.startswith(FOLDER_PREFIX)
