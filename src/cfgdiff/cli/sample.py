"""`cfgdiff sample`, and what sample, eval and sweep share: the guidance and sampler settings
their options ask for, and sampling with them."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cfgdiff.cli.options import classes, int_in, sampling_options
from cfgdiff.cli.progress import log


def add_parser(sub) -> None:
    sa = sub.add_parser("sample", help="generate images from a checkpoint")
    sampling_options(sa)
    sa.add_argument(
        "--classes",
        type=classes,
        help="comma-separated class names or indices, one grid row each (default: all)",
    )
    sa.add_argument("--per-class", type=int_in(1, 100_000), default=8)
    sa.add_argument(
        "--out",
        type=Path,
        required=True,
        help="FILE.png (grid), FILE.npz (arrays) or a new or empty FOLDER (FOLDER/CLASS/NNNNN.png, "
        "one PNG per image, plus settings.json)",
    )


def scale_of(a: argparse.Namespace) -> tuple[float, str]:
    """The guidance scale s of --scale or --w (w = s - 1), and which was given."""
    from cfgdiff.guidance import scale_from_w

    if a.w is not None:
        return scale_from_w(a.w), "w"
    return a.scale, "scale"


def guidance_of(a: argparse.Namespace, loaded, scale: float, device):
    """The Guidance the options ask for and the record of it and the sampler settings for output
    files; every sampling option is checked here, before any reference or compilation."""
    from cfgdiff.checkpoint import load_guide
    from cfgdiff.guidance import APG, Guidance
    from cfgdiff.sample import check_steps

    guide = load_guide(a.guide_checkpoint, loaded, device) if a.guide_checkpoint else None
    apg = None
    if a.apg:
        apg = APG(eta=a.apg_eta, norm_threshold=a.apg_norm_threshold, momentum=a.apg_momentum)
    g = Guidance(
        scale=scale, interval=a.guidance_interval, rescale=a.rescale,
        negative_class=a.negative_class, guide_net=guide.net if guide else None,
        threshold=a.threshold, threshold_percentile=a.threshold_percentile, apg=apg,
    )  # fmt: skip
    g.validate(loaded.cfg.model.num_classes)
    check_steps(a.steps, loaded.cfg)
    record = {
        **g.to_record(),
        "sampler": a.sampler,
        "steps": a.steps,
        "spacing": a.spacing,
        "eta": a.eta,
        "seed": a.seed,
        "checkpoint": str(loaded.path),
        "guide_checkpoint": str(a.guide_checkpoint) if a.guide_checkpoint else None,
    }
    return g, record


def generate_with(a: argparse.Namespace, loaded, labels, guidance, device, indices=None):
    """sample.generate with the sampler options shared by sample, eval and sweep."""
    from cfgdiff.runtime import resolve_precision
    from cfgdiff.sample import generate

    return generate(
        loaded.net, loaded.cfg, labels, guidance=guidance, sampler=a.sampler, steps=a.steps,
        eta=a.eta, spacing=a.spacing, seed=a.seed, batch_size=a.batch_size, indices=indices,
        device=device, precision=resolve_precision(a.precision, device), compile=a.compile,
        log=log,
    )  # fmt: skip


def run(a: argparse.Namespace) -> int:
    from cfgdiff.checkpoint import load_for_sampling
    from cfgdiff.runtime import resolve_device
    from cfgdiff.sample import class_grid_labels
    from cfgdiff.viz import sample_output_kind, write_samples

    kind = sample_output_kind(a.out)
    device = resolve_device(a.device)
    loaded = load_for_sampling(a.checkpoint, device)
    k = loaded.cfg.model.num_classes
    wanted = loaded.cfg.class_indices(a.classes) if a.classes is not None else list(range(k))
    scale, given = scale_of(a)
    guidance, record = guidance_of(a, loaded, scale, device)
    labels = class_grid_labels(wanted, a.per_class)
    t0 = time.perf_counter()
    images = generate_with(a, loaded, labels, guidance, device)
    dt = time.perf_counter() - t0
    record = {**record, "given": given}
    names = loaded.cfg.label_names()
    write_samples(a.out, images, labels, names, record, per_class=a.per_class, classes=wanted)
    where = f"{a.out}/CLASS/NNNNN.png" if kind == "folder" else a.out
    print(
        f"wrote {len(labels)} images to {where} (s={scale:g}, w={scale - 1:g}, {a.sampler} "
        f"{a.steps} steps, seed {a.seed}; {len(labels) / dt:.1f} images/s)"
    )
    return 0
