"""A small CNN classifier trained on a dataset's training split, deterministically, and cached.

It answers "does the sample show the requested class?" (class accuracy). Trained with a fixed
seed, a fixed data order and light random shifts; cached as safetensors + JSON (test accuracy,
SHA-256 of the weights) under <data_dir>/classifiers/.

MNIST's and Fashion-MNIST's judges also ship with the package (judges/): the bytes these
recipes give on a 2-core CPU. On first use one is checked against the local test split (its
test accuracy must come out as recorded, to SHIPPED_TOLERANCE) and cached like a trained one; a
test split that disagrees (another MNIST) gets a judge trained on it instead. So every machine
judges those samples with the same features, and a first evaluation does not spend minutes
training the judge.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from cfgdiff.data import Dataset, DatasetName, convert_images, default_data_dir, load_dataset
from cfgdiff.errors import CheckpointError, ConfigError
from cfgdiff.files import atomic_write_bytes
from cfgdiff.runtime import autocast, resolve_precision

CLASSIFIER_VERSION = 2  # 2: MNIST recipe 2 epochs (99.37 % in 70 s; v1: 3 epochs)
SHIPPED = Path(__file__).parent / "judges"
# a shipped judge is used where its test accuracy on the local test split is within this of the
# recorded one (10 images of MNIST's 10,000; fp32 kernels of other machines move a few at most)
SHIPPED_TOLERANCE = 0.001


class SmallCNN(nn.Module):
    """conv(32)x2 - pool - conv(64)x2 - pool - fc(256) - fc(K), BatchNorm after each conv."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        w = width

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(in_channels, w),
            *block(w, w),
            nn.MaxPool2d(2),
            *block(w, 2 * w),
            *block(2 * w, 2 * w),
            nn.MaxPool2d(2),
            *block(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(4 * w, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return f, self.head(f)


def epochs_for(n: int, epochs: int, min_steps: int = 0, batch_size: int = 128) -> int:
    """`epochs` over n images, or more if that is fewer than `min_steps` optimizer steps."""
    return max(epochs, -(-min_steps // -(-n // batch_size)))


def max_shift_for(image_size: int) -> int:
    """Random translation range of the augmentation: 2 pixels at 28 and 32 (the built-in
    datasets), 1 at 8-27 (2 of 8 pixels moved an 8x8 class cue onto another class's), a
    fourteenth of the size above."""
    return max(1, image_size // 14)


class ClassifierFeatures:
    """uint8 images -> (penultimate features (N, 4*width), logits (N, K)) of a SmallCNN.

    image_size / channels: the classifier's own (its meta); images of another size or channel
    count (a 32x32 or 3-channel model of MNIST) are converted to them first, as load_dataset
    converts data, so the judge always sees what it was trained on."""

    name = "classifier"

    def __init__(
        self,
        net: SmallCNN,
        device: torch.device | str = "cpu",
        *,
        image_size: int | None = None,
        channels: int | None = None,
    ):
        self.net = net.to(device).eval()
        self.device = torch.device(device)
        self.image_size, self.channels = image_size, channels

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, batch_size: int = 1000):
        feats, logits = [], []
        for i in range(0, images.shape[0], batch_size):
            x = convert_images(images[i : i + batch_size], self.image_size, self.channels)
            f, lg = self.net.features_and_logits(_to_input(x.to(self.device)))
            feats.append(f.float().cpu())
            logits.append(lg.float().cpu())
        return torch.cat(feats), torch.cat(logits)


def _to_input(images: torch.Tensor) -> torch.Tensor:
    return images.float().div(127.5).sub(1.0)


def _augment(x: torch.Tensor, g: torch.Generator, flip: bool, max_shift: int = 2) -> torch.Tensor:
    """Random translation by up to max_shift pixels (one shift per batch) and, if `flip`,
    a horizontal flip of each image with probability 1/2."""
    dx, dy = (torch.randint(-max_shift, max_shift + 1, (2,), generator=g)).tolist()
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    if flip:
        mask = (torch.rand(x.shape[0], generator=g) < 0.5).to(x.device).reshape(-1, 1, 1, 1)
        x = torch.where(mask, x.flip(3), x)
    return x


@dataclass(frozen=True)
class Recipe:
    """How a judge is trained (a dataset spec's `judge` gives epochs, flips and a step floor)."""

    epochs: int = 3
    flip: bool = False  # random horizontal flips (where left and right mean the same)
    min_steps: int = 0  # at least this many optimizer steps, whatever the epochs
    batch_size: int = 128
    lr: float = 3e-3
    seed: int = 0
    width: int = 32  # channels of the CNN's first level


def train_classifier(
    train: Dataset,
    test: Dataset,
    recipe: Recipe = Recipe(),
    *,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    on_epoch: Callable[[int, float], None] | None = None,
) -> tuple[SmallCNN, float]:
    """Train deterministically under the recipe's seed (for a given device and precision) for
    its epochs, or more if that is fewer than its `min_steps` optimizer steps; returns (model
    in eval mode, test accuracy measured in fp32)."""
    epochs, flip, min_steps = recipe.epochs, recipe.flip, recipe.min_steps
    batch_size, lr, seed, width = recipe.batch_size, recipe.lr, recipe.seed, recipe.width
    device = torch.device(device)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = SmallCNN(train.channels, train.num_classes, width).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=5e-4)
    n = len(train)
    steps_per_epoch = (n + batch_size - 1) // batch_size
    epochs = epochs_for(n, epochs, min_steps, batch_size)
    shift = max_shift_for(train.image_size)
    report_every = max(1, epochs // 10)  # test accuracy (and on_epoch) at most ~10 times
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps_per_epoch)
    x_all, y_all = train.images.to(device), train.labels.to(device)
    for ep in range(epochs):
        net.train()
        perm = torch.randperm(n, generator=g).to(device)
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            x = _augment(_to_input(x_all[idx]), g, flip, shift)
            with autocast(device, precision):
                logits = net(x)
            loss = F.cross_entropy(logits.float(), y_all[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (ep + 1) % report_every and ep + 1 < epochs:
            continue  # (evaluation changes no weight and draws no random number)
        acc = accuracy(net, test.images, test.labels, device=device)
        if on_epoch is not None:
            on_epoch(ep + 1, acc)
    net.eval()
    return net, acc


@torch.inference_mode()
def predict(
    net: nn.Module, images: torch.Tensor, batch_size: int = 1000, device="cpu"
) -> torch.Tensor:
    """Logits (N, K) for uint8 images (N, C, H, W)."""
    net.eval()
    out = [
        net(_to_input(images[i : i + batch_size].to(device))).float().cpu()
        for i in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(out) if out else torch.empty(0)


def accuracy(net, images, labels, device="cpu") -> float:
    logits = predict(net, images, device=device)
    return float((logits.argmax(1) == labels.cpu()).float().mean())


def _weights_sha(net: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def classifier_path(data_dir: Path, dataset: str, flip: bool = False) -> Path:
    safe = dataset.replace("/", "_").replace(":", "_")
    return data_dir / "classifiers" / f"{safe}{'-flip' if flip else ''}-v{CLASSIFIER_VERSION}"


def get_classifier(
    dataset: str,
    data_dir: Path | None = None,
    *,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    data: Dataset | None = None,
    flip: bool = False,
    retrain: bool = False,
) -> tuple[SmallCNN, dict]:
    """Load the cached classifier for `dataset`, else the shipped one (checked on the test
    split), else train one; cache what was not cached. retrain: train even so.

    A folder's judge is cached by path, so the folder's classes and labels are fingerprinted
    (not its pixels: models of any size share the judge trained at the first one's size) and
    a judge of other classes or images is trained again. data: the folder as loaded with
    image_size and channels, if the caller has it (else it is read). flip (folders only): the
    judge of a model trained with --hflip, for which mirrored images are the same class; it is
    trained with flips and cached beside the plain one."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    name = DatasetName.parse(dataset)
    folder = name.is_folder
    flip = flip and folder  # the built-ins' recipes say whether they flip
    base = classifier_path(data_dir, dataset, flip)
    meta_path, weights_path = base.with_suffix(".json"), base.with_suffix(".safetensors")
    recipe = dict(name.spec.judge)  # its dataset spec's: epochs, flips, a step floor
    if flip:
        recipe = {**recipe, "flip": True}
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    if folder and data is None:
        data = load_dataset(dataset, data_dir, image_size=image_size, channels=channels, log=log)
    content = {"labels_sha256": _labels_sha(data)} if folder else {}
    cached, stale = meta is not None and weights_path.is_file() and not retrain, None
    if cached and not _same_recipe(meta, recipe):
        stale = "trained with an earlier recipe"
    elif cached and folder and meta.get("labels_sha256") != content["labels_sha256"]:
        stale = "trained on other classes or images of the folder"
    if cached and stale is None:
        return _load(meta, weights_path, "delete it to retrain").to(device), meta
    if stale is not None and log is not None:
        log(f"{meta_path}: {stale}; training it again")
    test = None
    if not folder:
        test = load_dataset(
            dataset, data_dir, split="test", image_size=image_size, channels=channels, log=log
        )
        shipped = None if retrain else _shipped(dataset, recipe, test, device, log)
        if shipped is not None:
            net, meta = shipped
            _cache(net, meta, meta_path, weights_path, log)
            return net, meta
        data = load_dataset(dataset, data_dir, image_size=image_size, channels=channels, log=log)
    train = data
    if folder:  # no test split: hold out every 10th image
        train, test = train.hold_out(10)
    t0 = time.perf_counter()

    def epoch_note(ep: int, acc: float) -> None:
        if log is not None:
            log(f"classifier epoch {ep}: test accuracy {acc:.4f}")

    precision = resolve_precision("auto", torch.device(device))
    net, acc = train_classifier(
        train, test, Recipe(**recipe), device=device, precision=precision, on_epoch=epoch_note
    )
    meta = {
        "version": CLASSIFIER_VERSION,
        "dataset": dataset,
        "in_channels": train.channels,
        "image_size": train.image_size,
        "num_classes": train.num_classes,
        "width": 32,
        "test_accuracy": acc,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "precision": precision,
        **recipe,
        "max_shift": max_shift_for(train.image_size),
        **content,
        "epochs_trained": epochs_for(len(train), recipe["epochs"], recipe.get("min_steps", 0)),
        "weights_sha256": _weights_sha(net),
    }
    _cache(net, meta, meta_path, weights_path, log)
    return net.to(device).eval(), meta


def _cache(net: nn.Module, meta: dict, meta_path: Path, weights_path: Path, log) -> None:
    """Write a judge to the cache: the old meta first (its weights are being replaced), each
    file atomically, the new meta last, so a judge on disk is whole or absent, never weights of
    one and meta of another. A failure is logged: the evaluation goes on with the judge it has."""
    try:
        weights_path.parent.mkdir(parents=True, exist_ok=True)
        meta_path.unlink(missing_ok=True)
        state = {k: v.cpu().contiguous() for k, v in net.state_dict().items()}
        atomic_write_bytes(weights_path, save(state))
        atomic_write_bytes(meta_path, json.dumps(meta, indent=1).encode())
    except OSError as e:
        if log is not None:
            log(f"the judge is not cached ({e}); the next evaluation makes it again")


def shipped_judge(dataset: str) -> tuple[SmallCNN, dict] | None:
    """The judge of a built-in dataset that ships with cfgdiff, as (net in eval mode, meta), or
    None; its weights are checked against the SHA-256 its meta records."""
    base = SHIPPED / f"{dataset}-v{CLASSIFIER_VERSION}"
    meta_path, weights_path = base.with_suffix(".json"), base.with_suffix(".safetensors")
    if not (meta_path.is_file() and weights_path.is_file()):
        return None
    meta = json.loads(meta_path.read_text())
    return _load(meta, weights_path, "a damaged install: reinstall cfgdiff"), meta


def _load(meta: dict, weights_path: Path, remedy: str) -> SmallCNN:
    """A judge's weights, in eval mode, checked against the SHA-256 its meta records; an
    unreadable or mismatching file is a CheckpointError that ends with `remedy`."""
    net = SmallCNN(meta["in_channels"], meta["num_classes"], meta["width"])
    try:
        net.load_state_dict(load_file(str(weights_path)))
    except (SafetensorError, RuntimeError, OSError) as e:
        raise CheckpointError(f"{weights_path}: cannot load classifier ({e}); {remedy}") from None
    if _weights_sha(net) != meta["weights_sha256"]:
        raise CheckpointError(f"{weights_path}: weights hash mismatch; {remedy}")
    return net.eval()


def _shipped(
    dataset: str, recipe: dict, test: Dataset, device, log
) -> tuple[SmallCNN, dict] | None:
    """The shipped judge of `dataset` if there is one of this recipe, made for images like the
    test split's, and its test accuracy on that split is the recorded one; else None."""
    found = shipped_judge(dataset)
    if found is None:
        return None
    net, meta = found
    like = (meta["image_size"], meta["in_channels"]) == (test.image_size, test.channels)
    if not (_same_recipe(meta, recipe) and like and meta["num_classes"] == test.num_classes):
        return None
    if meta.get("test_split_sha256") == split_sha(test):
        # the very split it was measured on: its recorded accuracy holds without 10,000 images
        # through it (most of a first evaluation's time on a 2-core CPU)
        if log is not None:
            log(
                f"{dataset} judge: the one shipped with cfgdiff (test accuracy "
                f"{meta['test_accuracy']:.4f} on this test split, the one it was measured on)"
            )
        return net, {**meta, "source": "shipped"}
    acc = accuracy(net.to(device), test.images, test.labels, device=device)
    if abs(acc - meta["test_accuracy"]) > SHIPPED_TOLERANCE:
        if log is not None:
            log(
                f"the {dataset} judge shipped with cfgdiff scores {acc:.4f} on this test split, "
                f"not {meta['test_accuracy']:.4f}: training one on this data"
            )
        return None
    if log is not None:
        log(f"{dataset} judge: the one shipped with cfgdiff (test accuracy {acc:.4f} here)")
    return net, {**meta, "source": "shipped", "test_accuracy_here": acc}


def split_sha(data: Dataset) -> str:
    """SHA-256 of a split's pixels (uint8, N x C x H x W in order) and labels (int64): the
    same number only for the same images with the same labels."""
    h = hashlib.sha256(data.images.contiguous().numpy().tobytes())
    h.update(data.labels.numpy().astype("<i8").tobytes())
    return h.hexdigest()


def _labels_sha(data: Dataset) -> str:
    """SHA-256 of a dataset's class names and labels in order: it changes when a class or an
    image is added or removed (an image replaced by another of the same class goes unseen)."""
    h = hashlib.sha256("\n".join(data.class_names).encode())
    h.update(data.labels.numpy().astype("<i8").tobytes())
    return h.hexdigest()


def _same_recipe(meta: dict, recipe: dict) -> bool:
    """Whether a cached classifier was trained with `recipe` (classifiers cached before the
    step floor and the size-dependent shift had neither: no floor, a shift of 2)."""
    if any(meta.get(k, 0) != v for k, v in recipe.items()):
        return False
    return meta.get("max_shift", 2) == max_shift_for(meta["image_size"])


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, list[float]]:
    """Overall and per-class fraction of samples classified as their requested label."""
    pred = logits.argmax(1)
    ok = (pred == labels).float()
    k = logits.shape[1]
    per = [float(ok[labels == c].mean()) if (labels == c).any() else float("nan") for c in range(k)]
    return float(ok.mean()), per


def train_judge(
    dataset: str | None,
    data_dir: Path | None = None,
    *,
    device: str = "auto",
    image_size: int | None = None,
    retrain: bool = False,
    log=None,
) -> str:
    """`cfgdiff eval train-classifier`: the judge of `dataset` trained (or found cached or
    shipped, unless `retrain`) and cached; returns the line that says what it is."""
    from cfgdiff.data import check_name, default_data_dir
    from cfgdiff.runtime import resolve_device

    if dataset is None:
        raise ConfigError("eval train-classifier: `dataset` is required")
    check_name(dataset)
    _, meta = get_classifier(
        dataset, data_dir, device=resolve_device(device), log=log, image_size=image_size,
        retrain=retrain,
    )  # fmt: skip
    path = classifier_path(data_dir or default_data_dir(), dataset)
    epochs = meta.get("epochs_trained", meta["epochs"])  # (cached before the step floor: epochs)
    how = f"{meta['train_seconds']} s", f"{meta['precision']}, {epochs} epochs"
    made = f"trained in {how[0]} ({how[1]})"
    if meta.get("source") == "shipped":
        here = meta.get("test_accuracy_here")
        where = "the split it was measured on" if here is None else f"{here:.4f} on this test split"
        made = f"{where}; shipped with cfgdiff (trained in {', '.join(how)})"
    return (
        f"{dataset}: test accuracy {meta['test_accuracy']:.4f}, {made}, weights "
        f"sha256 {meta['weights_sha256'][:16]}..., cached at {path}.safetensors"
    )
