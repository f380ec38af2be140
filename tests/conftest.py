"""Shared fixtures: tiny synthetic datasets on disk and tiny configs. No test uses the network."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os

import numpy as np
import pytest
import torch

from cfgdiff.config import ModelConfig, RunConfig
from cfgdiff.data import sources
from cfgdiff.data.idx import idx_bytes
from cfgdiff.presets import PRESETS


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Tests must never reach a mirror or the package index."""

    def refuse(*a, **k):
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr("urllib.request.urlopen", refuse)
    monkeypatch.setattr(sources, "mnist_from_package_index", refuse)
    # one thread per worker where pytest-xdist runs two workers on the two cores (make test)
    torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(autouse=True, scope="session")
def _session_data_dir(tmp_path_factory):
    """The default data directory of module- and session-scoped fixtures (which run before any
    function-scoped one): never the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CFGDIFF_DATA_DIR", str(tmp_path_factory.mktemp("session-data")))
        yield


@pytest.fixture(autouse=True)
def _own_data_dir(_session_data_dir, tmp_path_factory, monkeypatch):
    """Each test has its own default data directory, so that what a test caches there (decoded
    folders, trained judges) neither lands in the user's ~/.cache nor leaks into another test.
    (Not under tmp_path, which some tests use as a folder dataset's root.)"""
    monkeypatch.setenv("CFGDIFF_DATA_DIR", str(tmp_path_factory.mktemp("default-data")))


def fake_digits(n: int, seed: int, size: int = 28, classes: int = 10):
    """Images whose class is visible: a bright square at a class-dependent place."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    rng.shuffle(y)
    x = (rng.random((n, size, size)) * 40).astype(np.uint8)
    for i, c in enumerate(y):
        r, k = divmod(int(c), 4)
        x[i, 2 + 6 * r : 6 + 6 * r, 2 + 6 * k : 6 + 6 * k] = 255
    return x, y.astype(np.uint8)


@pytest.fixture
def idx_dir(tmp_path, monkeypatch):
    """A folder with the four MNIST IDX files (train .gz, test raw) of synthetic digits, and the
    MNIST spec's checksums pointed at them."""
    return mnist_idx(tmp_path / "idx", monkeypatch, fake_digits(200, 0), fake_digits(50, 1))


def mnist_idx(d, monkeypatch, train, test):
    """Write (images, labels) arrays as MNIST's four IDX files in d (train .gz, test raw) and
    point the MNIST spec's checksums at them; returns d."""
    d.mkdir(parents=True)
    (xs, ys), (xt, yt) = train, test
    content = {
        "train_images": idx_bytes(xs),
        "train_labels": idx_bytes(ys),
        "test_images": idx_bytes(xt),
        "test_labels": idx_bytes(yt),
    }
    for role, data in content.items():
        stem = sources.MNIST.files[role]
        if role.startswith("train"):
            (d / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (d / stem).write_bytes(data)
        monkeypatch.setitem(sources.MNIST.sha256, role, hashlib.sha256(data).hexdigest())
    return d


def image_folder(root, per_class: int):
    """A folder:PATH dataset at root: 3 classes (class0..2) x per_class grayscale 8x8 PNGs, each
    class a bright vertical bar at its own place."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            a = (rng.random((8, 8)) * 50).astype(np.uint8)
            a[:, 2 * c : 2 * c + 2] = 255
            Image.fromarray(a, mode="L").save(root / f"class{c}" / f"{i}.png")
    return root


@pytest.fixture
def folder_data(tmp_path):
    """folder:PATH dataset: 3 classes x 6 grayscale 8x8 PNGs."""
    return image_folder(tmp_path / "folder", 6)


# The allocation failures torch raises: CUDA's, the CPU allocator's plain RuntimeError, Python's.
OUT_OF_MEMORY = [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 4 GB"),
    MemoryError(),
]


def tiny_config(**train_overrides) -> RunConfig:
    base = PRESETS["tiny"]
    model = dataclasses.replace(base.model, in_channels=1, image_size=8, num_classes=3)
    return dataclasses.replace(
        base, model=model, train=dataclasses.replace(base.train, **train_overrides), dataset="x"
    )


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    from cfgdiff.unet import UNet

    cfg = ModelConfig(
        in_channels=1,
        image_size=8,
        num_classes=3,
        base_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attn_levels=(1,),
        num_heads=2,
    )
    net = UNet(cfg).eval()
    # Non-zero output layer so the net is not the constant 0 at init.
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)
    return net


def fashion_system_dir(d, monkeypatch, train, test):
    """Write (images, labels) arrays as Fashion-MNIST's four .gz files in d, as Debian's package
    lays them out (recompressed: the .gz differs from upstream's, the content checksums do not),
    and point the Fashion-MNIST spec at d and at their checksums; returns d."""
    d.mkdir(parents=True)
    (xs, ys), (xt, yt) = train, test
    for role, a in (
        ("train_images", xs),
        ("train_labels", ys),
        ("test_images", xt),
        ("test_labels", yt),
    ):
        content = idx_bytes(a)
        (d / f"{sources.FASHION_MNIST.files[role]}.gz").write_bytes(
            gzip.compress(content, compresslevel=1)
        )
        monkeypatch.setitem(sources.FASHION_MNIST.sha256, role, hashlib.sha256(content).hexdigest())
    spec = dataclasses.replace(sources.FASHION_MNIST, system_dirs=(str(d),))
    monkeypatch.setitem(sources.IDX_DATASETS, "fashion-mnist", spec)
    return d


@pytest.fixture
def data(folder_data):
    """The folder_data folder loaded as a Dataset."""
    from cfgdiff.data import load_dataset

    return load_dataset(f"folder:{folder_data}")


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory):
    """A module's folder of 3 classes x 40 8x8 images whose class is a bright column."""
    from PIL import Image

    root = tmp_path_factory.mktemp("evaldata") / "folder"
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(40):
            a = (rng.random((8, 8)) * 60).astype(np.uint8)
            a[:, 2 * c + 1 : 2 * c + 3] = 255
            Image.fromarray(a).save(root / f"c{c}" / f"{i}.png")
    return root


def remanifest(ckpt) -> None:
    """Recompute a checkpoint's MANIFEST.json after its files were changed, as someone who
    controls the folder would: what is left to refuse them is their content."""
    import json

    from cfgdiff.files import file_digest

    files = ("config.json", "ema.safetensors", "model.safetensors", "state.pt")
    names = [f for f in files if (ckpt / f).exists()]
    (ckpt / "MANIFEST.json").write_text(json.dumps({f: file_digest(ckpt / f) for f in names}))


def cli(argv, capsys) -> tuple[int, list[str]]:
    """main(argv) and the lines it wrote to stderr."""
    from cfgdiff.cli import main

    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err.strip().splitlines()


def one_line(rc: int, err: list[str], status=(2,)) -> str:
    """The one error line of a refused command, checked: its status, the last line on stderr
    (after any progress notes a training run writes), no traceback."""
    assert rc in status, (rc, err)
    errors = [e for e in err if e.startswith("cfgdiff: error: ")]
    assert len(errors) == 1 and err[-1] == errors[0], err
    assert not any(e.startswith("Traceback") for e in err), err
    return errors[0]


def tiny_folder_run(root):
    """A finished 2-step run of the tiny preset on a 3-class folder under `root`: (run, folder)."""
    from cfgdiff.cli import main

    folder = image_folder(root / "folder", 6)
    argv = ["train", "--dataset", f"folder:{folder}", "--preset", "tiny", "--out", root / "run",
            "--steps", "2", "--sample-every", "0", "--no-progress", "--precision", "fp32",
            "--device", "cpu"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    return root / "run", folder


def sample_with(net, cfg, cond, *, scale=1.0, guidance=None, indices=None, callback=None,
                log=None, world=None, **settings):  # fmt: skip
    """generate with the sampler settings as loose keywords and a plain-CFG scale (a test's
    shorthand for generate(..., settings=SamplingSettings(...), guidance=Guidance(...)))."""
    from cfgdiff.sampling.generate import generate
    from cfgdiff.sampling.guidance import Guidance
    from cfgdiff.sampling.settings import SamplingSettings

    return generate(
        net, cfg, cond, settings=SamplingSettings(**settings),
        guidance=guidance if guidance is not None else Guidance(scale=scale), indices=indices,
        callback=callback, log=log, world=world,
    )  # fmt: skip


def folder_run(root, per_class: int = 6):
    """A tiny checkpoint of a 3-class folder (image_folder's class0..class2, `per_class` images
    each), trained for 4 steps in fp32 by `cfgdiff train`, previews on; returns the run folder."""
    from cfgdiff.cli import main

    folder = image_folder(root / "folder", per_class)
    out = root / "run"
    argv = ["train", "--dataset", f"folder:{folder}", "--preset", "tiny", "--out", str(out),
            "--steps", "4", "--no-progress", "--precision", "fp32"]  # fmt: skip
    assert main(argv) == 0
    return out


def write_shards(folder, out, per_shard: int, classes_txt: bool = True, cls: bool = True,
                 captions: dict[int, str] | None = None):  # fmt: skip
    """The images of `folder` (class sub-folders) as WebDataset shards in `out`: samples
    KEY.png + KEY.cls (unless not `cls`) + KEY.txt (image i's caption in `captions`, if any)
    in the folder's order, `per_shard` to a tar (Python's tarfile)."""
    import io
    import tarfile

    out.mkdir(parents=True)
    from cfgdiff.data import folders

    listing = folders.list_folder(folder)
    captions = captions or {}
    for s in range(0, len(listing.files), per_shard):
        with tarfile.open(out / f"train-{s // per_shard:04d}.tar", "w") as tar:
            for j, (path, label) in enumerate(listing.files[s : s + per_shard]):
                parts = [("png", path.read_bytes())]
                parts += [("cls", str(label).encode())] if cls else []
                if s + j in captions:
                    parts.append(("txt", captions[s + j].encode()))
                for ext, data in parts:
                    info = tarfile.TarInfo(f"{s + j:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    if classes_txt:
        (out / "classes.txt").write_text("\n".join(listing.class_names) + "\n")
    return out
