"""Evaluating generated samples against real data: the report behind `cfgdiff eval`, the
sweep (sweep.py) and the small evaluations during training.

Owns: the judge of a model's samples (`judge_for`: the dataset's classifier at its own size,
which text adherence uses too), the choice of feature extractor (the dataset's own classifier,
or the FID Inception network), the real reference (N training images), the real-vs-real floor
(N test images measured exactly like generated ones, so every number has a baseline), the
record of an evaluation, samples made elsewhere (`read_samples`, `samples_reference`) and the
evaluator a training run calls. Measuring is given images and their requested labels; only the
training evaluator samples (through sample.generate).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cfgdiff import dist
from cfgdiff.config import RunConfig
from cfgdiff.data import Dataset, DatasetName, canonical_name, default_data_dir, load_dataset
from cfgdiff.errors import ConfigError
from cfgdiff.metrics.classifier import ClassifierFeatures, class_accuracy, get_classifier
from cfgdiff.metrics.stats import (
    fid,
    inception_score,
    kid,
    memorisation,
    precision_recall,
    train_nn_distances,
)

METRIC_KEYS = ("fid", "kid", "is", "precision", "recall", "class_accuracy", "memorisation")
# The feature spaces of FID, KID, precision and recall: the dataset's own classifier (fast,
# offline) or the FID Inception-v3 network (comparable with published numbers).
FEATURES = ("classifier", "inception")


@dataclass
class Reference:
    """Real data and extractors for one dataset at one model's size and channels."""

    dataset: str
    classifier: ClassifierFeatures
    classifier_meta: dict
    features: object  # ClassifierFeatures or InceptionFeatures
    real_features: torch.Tensor  # features of n training images
    train_pixels: torch.Tensor  # all training images, uint8 (for memorisation)
    held_out: Dataset  # n real images not in the reference, for the floor
    n: int
    mirrored: bool  # trained with hflip: a mirrored training image counts as memorised
    # memorisation's yardstick (stats.train_nn_distances of train_pixels), computed once: a
    # sweep measures 9 sets of samples against the same training images
    train_nn: torch.Tensor


def check_compatible(cfg: RunConfig, dataset: str, data: Dataset) -> None:
    m = cfg.model
    if data.channels != m.in_channels:
        raise ConfigError(
            f"`dataset` {dataset} has {data.channels} channel(s); the checkpoint has "
            f"{m.in_channels}"
        )
    if data.num_classes != m.num_classes:
        raise ConfigError(
            f"`dataset` {dataset} has {data.num_classes} classes; the checkpoint has "
            f"{m.num_classes}"
        )


def _dataset_of(cfg: RunConfig, dataset: str | None) -> str:
    """The dataset samples of `cfg`'s model are compared with: `dataset`, else the checkpoint's
    own, refused when that is a folder no longer on this machine."""
    if dataset is not None:
        return dataset
    name = DatasetName.parse(cfg.dataset)
    if name.folder is not None and not name.folder.is_dir():
        raise ConfigError(
            f"the checkpoint was trained on {cfg.dataset}, which is not on this machine; pass "
            "`dataset` folder:PATH (the same class sub-folders) to evaluate against it"
        )
    return cfg.dataset


def judge_for(
    cfg: RunConfig,
    dataset: str | None = None,
    *,
    data_dir: Path | None = None,
    device: torch.device | str = "cpu",
    log=None,
    data: Dataset | None = None,
) -> tuple[ClassifierFeatures, dict]:
    """The classifier that judges samples of a model with config `cfg` (of `dataset`, default
    the checkpoint's), as features of the model's images, and its meta. The judge of a built-in
    dataset is trained at the data's native size and channels, whatever model comes first (the
    model's images are converted to them); a folder has no native size, so its judge is trained
    at this model's. data: a folder as loaded at the model's size, if the caller has it."""
    dataset = _dataset_of(cfg, dataset)
    m = cfg.model
    folder = DatasetName.parse(dataset).is_folder
    net, meta = get_classifier(
        dataset,
        data_dir,
        device=device,
        log=log,
        image_size=m.image_size if folder else None,
        channels=m.in_channels if folder else None,
        data=data,
        flip=folder and bool(cfg.train.hflip),
    )
    if meta["num_classes"] != m.num_classes:
        raise ConfigError(
            f"`dataset` {dataset} has {meta['num_classes']} classes; the checkpoint has "
            f"{m.num_classes}"
        )
    size, channels = meta["image_size"], meta["in_channels"]
    return ClassifierFeatures(net, device, image_size=size, channels=channels), meta


@dataclass(frozen=True)
class ReferenceOptions:
    """The real data samples are measured against (`cfgdiff eval`'s and `sweep`'s flags)."""

    dataset: str | None = None  # default: the checkpoint's
    features: str = "classifier"  # FEATURES
    inception: Path | None = None  # a local copy of the FID Inception network
    data_dir: Path | None = None
    device: torch.device | str = "auto"  # where the judge and the feature network run

    def inputs(self) -> list[tuple[str, Path]]:
        """What an output must not be or lie inside (files.refuse_overlap): the Inception
        network read and a folder dataset's folder (a bad name is left to the command)."""
        from cfgdiff.errors import CfgDiffError

        found = [("the Inception network", self.inception)] if self.inception else []
        if self.dataset is not None:
            try:
                folder = DatasetName.parse(self.dataset).folder
            except CfgDiffError:
                folder = None
            if folder is not None:
                found.append(("the dataset folder", folder))
        return found

    def check(self, reads: tuple[str, ...], kind: str) -> None:
        """Refuse, before any work, an option a kind of model's judge does not read."""
        unread = {"features": self.features != "classifier", "inception": self.inception}
        for name, given in unread.items():
            if given and name not in reads:
                value = f"={getattr(self, name)}" if name == "features" else ""
                raise ConfigError(
                    f"`{name}{value}`: only for class models (a {kind} model is measured by the "
                    "judge's class accuracy and attribute rank correlations, not FID)"
                )


def build_reference(
    cfg: RunConfig,
    n: int,
    options: ReferenceOptions = ReferenceOptions(),
    *,
    seed: int = 0,
    log=None,
    n_arg: str = "`n`",
    at_most: bool = False,
) -> Reference:
    """Real reference for comparing n generated samples of a model with config `cfg`.
    n_arg: the parameter that set n, for the message when the data is too small for it.
    at_most: n is an upper bound, the reference takes as many real images as the data has up
    to it (a text sweep's sample count is whole rounds of its prompts, not a number asked for)."""
    from cfgdiff.runtime import resolve_device

    o = options
    dataset, features, inception = _dataset_of(cfg, o.dataset), o.features, o.inception
    device = resolve_device(o.device) if isinstance(o.device, str) else o.device
    data_dir = Path(o.data_dir) if o.data_dir is not None else default_data_dir()
    m = cfg.model
    name = DatasetName.parse(dataset)
    # The checkpoint's own dataset is read as training read it, at the model's size and channels
    # (training with channels=3 on MNIST converts it); another dataset must have the model's
    # channels.
    # Folders are resized by Pillow while reading, as in training, so mixed sizes are fine.
    # (compared as absolute paths: runs recorded before folder paths were made absolute)
    own = canonical_name(dataset) == canonical_name(cfg.dataset)
    folder = name.is_folder
    train = load_dataset(
        dataset,
        data_dir,
        image_size=m.image_size,
        channels=m.in_channels if own else None,
        log=log,
    )
    check_compatible(cfg, dataset, train)
    whole = train
    if folder:
        # No test split: every k-th image (classes are contiguous, so each class is represented)
        # is held out of the reference, k = 10 unless that leaves fewer than n, down to halves.
        # The generator saw them all; the floor only needs two disjoint sets of real images.
        if at_most:
            n = min(n, len(train) // 2)
        if n > len(train) // 2:
            raise ConfigError(
                f"{n_arg} must be <= {len(train) // 2} for {dataset} ({len(train)} images: the "
                f"real-vs-real floor compares N of them with N others), got {n}"
            )
        train, test = train.hold_out(max(2, min(10, len(train) // n)))
    else:
        test = load_dataset(
            dataset, data_dir, split="test", image_size=m.image_size, channels=m.in_channels
        )
    if at_most:
        n = min(n, len(test), len(train))
    if n > len(test) or n > len(train):
        raise ConfigError(
            f"{n_arg} must be <= {min(len(test), len(train))} for {dataset} (the real-vs-real "
            f"floor compares N training with N held-out images), got {n}"
        )
    clf, clf_meta = judge_for(
        cfg, dataset, data_dir=data_dir, device=device, log=log, data=whole if folder else None
    )
    if features == "classifier":
        extractor = clf
    elif features == "inception":
        from cfgdiff.metrics.inception import InceptionFeatures, inception_path

        extractor = InceptionFeatures(inception_path(data_dir, inception, log), device)
    else:
        raise ConfigError(f"`features` must be one of {', '.join(FEATURES)}, got {features!r}")
    g = torch.Generator().manual_seed(seed)
    train_idx = torch.randperm(len(train), generator=g)[:n]
    test_idx = torch.randperm(len(test), generator=g)[:n]
    real_features, _ = extractor(train.images[train_idx])
    held = Dataset(dataset, test.images[test_idx], test.labels[test_idx], test.class_names)
    mirrored = bool(cfg.train.hflip)
    train_nn = train_nn_distances(train.images.float() / 255)
    return Reference(
        dataset, clf, clf_meta, extractor, real_features, train.images, held, n, mirrored, train_nn
    )


def _features_and_logits(ref: Reference, images: torch.Tensor, world: dist.World | None):
    """The features and the judge's logits of `images`; with the processes of a torchrun job,
    each extracts those of its contiguous share and all of them get all back, in order (FID's
    float64 moments, KID, precision/recall and IS then need every sample's features, which are
    small beside the images: N x D floats)."""
    w = world or dist.World()
    part = dist.shard(len(images), w)
    mine = images[part.start : part.stop]
    feats, logits = ref.features(mine)
    if ref.features is not ref.classifier:
        _, logits = ref.classifier(mine)
    return dist.gather(feats, len(images), w), dist.gather(logits, len(images), w)


def measure(
    ref: Reference, images: torch.Tensor, labels: torch.Tensor, world: dist.World | None = None
) -> dict:
    """Every metric of `images` (uint8) generated for `labels`, against the reference. `world`:
    the processes of a torchrun job, which share the feature extraction (all must call)."""
    feats, logits = _features_and_logits(ref, images, world)
    acc, per = class_accuracy(logits, labels.cpu())
    is_mean, is_std = inception_score(logits, splits=min(10, max(1, len(labels) // 100)))
    kid_mean, kid_std = kid(ref.real_features, feats, subsets=50, subset_size=min(1000, len(feats)))
    p, r = precision_recall(ref.real_features, feats, k=3)
    train = ref.train_pixels.float() / 255
    mem = memorisation(images.float() / 255, train, ref.mirrored, train_nn=ref.train_nn)
    return {
        "fid": fid(ref.real_features, feats),
        "kid": kid_mean,
        "kid_std": kid_std,
        "is": is_mean,
        "is_std": is_std,
        "precision": p,
        "recall": r,
        "class_accuracy": acc,
        "per_class_accuracy": per,
        "memorisation": mem["fraction"],
        "memorisation_detail": mem,
    }


def read_samples(path: Path, class_names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples made elsewhere, as uint8 images (N, C, H, W) and the label each was asked for, in
    the reference dataset's class order.

    path: an .npz with `images` (uint8 N x C x H x W) and `labels` (as `cfgdiff sample` writes;
    its `class_names`, when present, are matched by name) or `arr_0` (N x H x W x C) and `arr_1`
    (as guided-diffusion's samplers write), or a folder of class sub-folders of
    images (as `cfgdiff sample --out FOLDER` writes), named as the dataset's classes, as their
    folder-safe forms ("T-shirt_top") or as class indices.
    """
    import numpy as np

    from cfgdiff.data.folders import class_folder_names, folder_dataset, scan_folder
    from cfgdiff.errors import CfgDiffError

    path = Path(path)
    k = len(class_names)
    if path.is_dir():
        try:
            scan = scan_folder(path)
            sizes: dict = {}  # each size -> its first file
            for (p, _), (_, size) in zip(scan.files, scan.headers, strict=True):
                sizes.setdefault(size, p)
            if len(sizes) > 1:  # samples are measured as made: never resized to one size here
                (a, pa), (b, pb) = list(sizes.items())[:2]
                raise ConfigError(
                    f"`samples` {path}: the images must all be one size, found "
                    f"{a[0]}x{a[1]} ({pa.name}) and {b[0]}x{b[1]} ({pb.name})"
                )
            x, y, folders = folder_dataset(path, None, None, scan=scan)
        except ConfigError:
            raise
        except CfgDiffError as e:
            raise ConfigError(f"`samples` {path}: {e}") from None
        names = list(folders)
    elif path.suffix.lower() == ".npz" and path.is_file():
        try:
            with np.load(path) as z:
                if "images" in z:
                    x, y = z["images"], z["labels"]
                else:  # guided-diffusion / ADM evaluation format: arr_0 NHWC, arr_1 labels
                    x, y = z["arr_0"], z["arr_1"]
                names = [str(c) for c in z["class_names"]] if "class_names" in z else None
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(
                f"`samples` {path}: not an .npz with images and labels ({e})"
            ) from None
        if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # NHWC -> NCHW
        if x.dtype != np.uint8 or x.ndim != 4 or y.shape != (x.shape[0],):
            raise ConfigError(
                f"`samples` {path}: images must be uint8 (N, C, H, W) and labels (N,), got "
                f"{x.dtype} {tuple(x.shape)} and {tuple(y.shape)}"
            )
        if names is None:
            names = [str(c) for c in range(k)]
    else:
        raise ConfigError(f"`samples` must be an .npz file or a folder of class folders: {path}")
    # each sample's class name -> the dataset's index: by name, folder-safe name or index
    lookup = {str(i): i for i in range(k)}
    lookup.update({n: i for i, n in enumerate(class_folder_names(class_names))})
    lookup.update({n: i for i, n in enumerate(class_names)})
    if y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all():
        y = y.astype(np.int64)  # 3.0 is class 3; 3.7 is no class at all
    if y.dtype.kind not in "iu":
        flat = y.ravel()
        if y.dtype.kind == "f":
            flat = flat[~np.isfinite(flat) | (flat != np.round(flat))]
        raise ConfigError(
            f"`samples` {path}: labels must be integers (class indices), got "
            f"{flat[:1].tolist()} ({y.dtype})"
        )
    used = sorted({int(c) for c in np.unique(y)})
    if used and (used[0] < 0 or used[-1] >= len(names)):
        raise ConfigError(f"`samples` {path}: labels must be in [0, {len(names) - 1}]")
    unknown = [names[c] for c in used if names[c] not in lookup]
    if unknown:
        raise ConfigError(
            f"`samples` {path}: classes {unknown} are not classes of the dataset "
            f"({', '.join(class_names)}) or their indices"
        )
    index = torch.tensor([lookup[n] for n in names])
    return torch.as_tensor(x), index[torch.as_tensor(y, dtype=torch.long)]


def floor(ref: Reference, world: dist.World | None = None) -> dict:
    """The real-vs-real floor: held-out real images measured exactly like generated ones."""
    return measure(ref, ref.held_out.images, ref.held_out.labels, world)


def evaluation(
    ref: Reference, images: torch.Tensor, labels: torch.Tensor, record: dict,
    world: dist.World | None = None,
) -> dict:  # fmt: skip
    """Every metric of `images` (asked for `labels`) and of the real floor, as the record an
    evaluation writes: `record` (what was sampled, how) first, then the results. `world`: as
    for measure."""
    gen = measure(ref, images, labels, world)
    return {
        **record,
        "dataset": ref.dataset,
        "features": ref.features.name,
        "classifier_test_accuracy": ref.classifier_meta["test_accuracy"],
        "generated": gen,
        "real_floor": floor(ref, world),
        # flat copies of the headline numbers
        "class_accuracy": gen["class_accuracy"],
        "fid": gen["fid"],
    }


def samples_reference(
    path: Path, options: ReferenceOptions, log=None
) -> tuple[Reference, torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """Samples made elsewhere (read_samples) and the reference of `options.dataset` to measure
    them against, at the samples' size and channels, as it would be for a model that made them
    (so a folder of mixed sizes is fine, as in training); returns (reference, images, labels,
    the dataset's class names)."""
    from cfgdiff.data import class_names_of
    from cfgdiff.presets import PRESETS, config_for_dataset

    dataset, data_dir = options.dataset, options.data_dir
    images, labels = read_samples(path, class_names_of(dataset, data_dir, log=log))
    n, c, h, w = images.shape
    if h != w or c not in (1, 3) or not 8 <= h <= 1024:
        raise ConfigError(
            f"`samples` {path}: images must be square, 8 to 1024 pixels, with 1 or 3 "
            f"channels, got {c}x{h}x{w}"
        )
    if n < 10:
        raise ConfigError(f"`samples` {path}: at least 10 samples are needed, got {n}")
    # A stand-in config of the samples' shape; build_reference's own read of the data hits the
    # decoded-folder cache; hflip as the dataset's default (for memorisation).
    data = load_dataset(dataset, data_dir, image_size=h, channels=c, log=log)
    cfg = config_for_dataset(PRESETS["tiny"], data, dataset)
    ref = build_reference(cfg, n, options, log=log, n_arg="the number of `samples`")
    return ref, images, labels, data.class_names


class TrainingEvaluator:
    """Small-N evaluation during training (train's `evaluator`): cfg.train.eval_n samples at
    the preview scale with the preview sampler, classifier features, against a reference built
    once, here (so a bad eval_n is refused before training starts)."""

    KEYS = ("fid", "class_accuracy", "precision", "recall", "is")

    def __init__(self, cfg: RunConfig, *, dataset: str, data_dir=None, device="cpu",
                 precision: str = "fp32", log=None):  # fmt: skip
        self.cfg, self.device, self.precision = cfg, torch.device(device), precision
        n = cfg.train.eval_n
        options = ReferenceOptions(dataset=dataset, data_dir=data_dir, device=self.device)
        self.ref = build_reference(cfg, n, options, log=log, n_arg="`eval_n`")
        self.labels = torch.arange(n) % cfg.model.num_classes
        self.batch_size: int | None = None  # measured on the first evaluation

    def __call__(self, net) -> dict[str, float]:
        import dataclasses

        from cfgdiff.runtime import sampling_batch_size
        from cfgdiff.sampling.generate import generate
        from cfgdiff.sampling.guidance import Guidance
        from cfgdiff.sampling.previews import preview_settings

        if self.batch_size is None:
            self.batch_size = sampling_batch_size(net, self.cfg.model, self.device, self.precision)
        settings = preview_settings(self.cfg, self.precision)
        images = generate(
            net, self.cfg, self.labels,
            settings=dataclasses.replace(settings, batch_size=self.batch_size),
            guidance=Guidance(scale=self.cfg.train.preview_scale),
        )  # fmt: skip
        m = measure(self.ref, images, self.labels)
        return {k: m[k] for k in self.KEYS}
