"""`cfgdiff sample`, and what sample, eval and sweep share: the guidance and sampler settings
their options ask for, and sampling with them."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cfgdiff.cli.options import (
    UsageError,
    classes,
    floats,
    int_in,
    negative_prompt_option,
    refuse_writing_inputs,
    sampling_options,
)
from cfgdiff.cli.progress import log


def add_parser(sub) -> None:
    sa = sub.add_parser("sample", help="generate images from a checkpoint")
    sampling_options(sa, required=False)  # checked in run: --animate-scales stands for --scale
    sa.add_argument(
        "--classes",
        type=classes,
        help="comma-separated class names or indices, one grid row each (default: all)",
    )
    sa.add_argument("--per-class", type=int_in(1, 100_000), default=8)
    sa.add_argument(
        "--out",
        type=Path,
        help="FILE.png (grid), FILE.npz (arrays) or a new or empty FOLDER (FOLDER/CLASS/NNNNN.png, "
        "one PNG per image, plus settings.json); --out or --animate or both",
    )
    tx = sa.add_argument_group("text models (cfgdiff train --condition text; docs/text.md)")
    tx.add_argument(
        "--prompt",
        action="append",
        metavar="TEXT",
        help="a prompt, one grid row of --per-class images (repeatable; default: each class's "
        'name as a word, "seven"); captions seen in training need no encoder, others the '
        "`text` extra",
    )
    tx.add_argument(
        "--prompts", type=Path, metavar="FILE", help="prompts, one per line (after any --prompt)"
    )
    negative_prompt_option(tx)
    an = sa.add_argument_group("animation of the denoising (docs/guidance.md)")
    an.add_argument(
        "--animate",
        type=Path,
        metavar="FILE.gif|FILE.webp",
        help="the denoising trajectory as an animation: a row per class, a frame per step",
    )
    an.add_argument(
        "--animate-show",
        default="x0",
        choices=["x0", "xt"],
        help="x0: the predicted clean image at each step (default); xt: the noisy sample",
    )
    an.add_argument(
        "--animate-scales",
        type=floats,
        metavar="S,S,...",
        help="several guidance scales side by side, the same noise at each (in place of "
        "--scale; not with --out)",
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


def text_guidance_of(a: argparse.Namespace, loaded, scale: float, device, table):
    """guidance_of for a text model, with --negative-prompt's embedding (from the run's caption
    `table`, else the encoder) as the reference of the guidance in place of the null."""
    import dataclasses

    from cfgdiff.text import embed_prompts

    guidance, record = guidance_of(a, loaded, scale, device)
    if a.negative_prompt is not None:
        neg = embed_prompts([a.negative_prompt], loaded.cfg.model, table)[0]
        guidance = dataclasses.replace(guidance, negative_condition=neg)
        guidance.validate(loaded.cfg.model.num_classes)
        record = {**guidance.to_record(), **record, "negative_prompt": a.negative_prompt}
    return guidance, record


def generate_with(a: argparse.Namespace, loaded, labels, guidance, device, indices=None):
    """sample.generate with the sampler options shared by sample, eval and sweep (split over
    the processes of a torchrun job)."""
    from cfgdiff import dist
    from cfgdiff.runtime import resolve_precision
    from cfgdiff.sample import generate

    return generate(
        loaded.net, loaded.cfg, labels, guidance=guidance, sampler=a.sampler, steps=a.steps,
        eta=a.eta, spacing=a.spacing, seed=a.seed, batch_size=a.batch_size, indices=indices,
        device=device, precision=resolve_precision(a.precision, device), compile=a.compile,
        log=log, world=dist.world(),
    )  # fmt: skip


def _check_outputs(a: argparse.Namespace) -> str | None:
    """What --out asks for (None without it), after checking --out and the animation flags."""
    from cfgdiff.viz import animation_format, sample_output_kind

    if a.checkpoint is None:
        raise UsageError("the following arguments are required: --checkpoint")
    if a.scale is None and a.w is None and a.animate_scales is None:
        raise UsageError("one of the arguments --scale --w is required")
    if a.out is None and a.animate is None:
        raise UsageError("one of the arguments --out --animate is required")
    if a.animate is None and (a.animate_scales is not None or a.animate_show != "x0"):
        raise UsageError("--animate-scales and --animate-show go with --animate FILE")
    if a.animate_scales is not None and a.out is not None:
        raise UsageError(
            "--out takes the images of one scale, --scale: with --animate-scales, leave out --out"
        )
    if a.animate is not None:
        animation_format(a.animate)
    return sample_output_kind(a.out) if a.out is not None else None


def run(a: argparse.Namespace) -> int:
    from cfgdiff import dist
    from cfgdiff.checkpoint import load_for_sampling
    from cfgdiff.runtime import resolve_device
    from cfgdiff.sample import class_grid_labels
    from cfgdiff.viz import write_samples

    kind = _check_outputs(a)
    if a.animate is not None and dist.world().enabled:
        raise UsageError("--animate runs in one process, not under torchrun")
    refuse_writing_inputs(a, ("--out", a.out), ("--animate", getattr(a, "animate", None)))
    device = resolve_device(a.device)
    loaded = load_for_sampling(a.checkpoint, device)
    if loaded.cfg.model.condition == "text":
        return _run_text(a, loaded, kind, device)
    if a.prompt or a.prompts or a.negative_prompt is not None:
        raise UsageError("--prompt, --prompts and --negative-prompt are for text models")
    k = loaded.cfg.model.num_classes
    wanted = loaded.cfg.class_indices(a.classes) if a.classes is not None else list(range(k))
    scale, given = scale_of(a)
    if scale is None:  # --animate-scales alone
        scale = a.animate_scales[0]
    guidance, record = guidance_of(a, loaded, scale, device)
    labels = class_grid_labels(wanted, a.per_class)
    t0 = time.perf_counter()
    if a.animate is not None:
        images = _animate(a, loaded, wanted, guidance, scale, device)
    else:
        images = generate_with(a, loaded, labels, guidance, device)
    dt = time.perf_counter() - t0
    if kind is None or not dist.world().is_main:  # rank 0 alone writes
        return 0
    record = {**record, "given": given}
    names = loaded.cfg.label_names()
    write_samples(a.out, images, labels, names, record, per_class=a.per_class, classes=wanted)
    where = f"{a.out}/CLASS/NNNNN.png" if kind == "folder" else a.out
    print(
        f"wrote {len(labels)} images to {where} (s={scale:g}, w={scale - 1:g}, {a.sampler} "
        f"{a.steps} steps, seed {a.seed}; {len(labels) / dt:.1f} images/s)"
    )
    return 0


def prompts_of(a: argparse.Namespace, cfg) -> list[str]:
    """--prompt and --prompts FILE, in order; by default each class's label-only caption."""
    prompts = list(a.prompt or [])
    if a.prompts is not None:
        try:
            lines = a.prompts.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--prompts {a.prompts}: cannot read it ({e})") from None
        prompts += [line.strip() for line in lines if line.strip()]
    if not prompts:
        from cfgdiff.data.captions import class_words

        prompts = class_words(cfg.label_names())
    return prompts


def _run_text(a: argparse.Namespace, loaded, kind, device) -> int:
    """sample for a text model: a row per prompt."""
    import torch

    from cfgdiff import dist
    from cfgdiff.text import embed_prompts, run_caption_table
    from cfgdiff.viz import PROMPT_LABEL_CHARS, write_samples

    if a.classes is not None:
        raise UsageError("a text model takes --prompt/--prompts, not --classes")
    prompts = prompts_of(a, loaded.cfg)
    table = run_caption_table(loaded.path)
    scale, given = scale_of(a)
    if scale is None:  # --animate-scales alone
        scale = a.animate_scales[0]
    guidance, record = text_guidance_of(a, loaded, scale, device, table)
    rows = embed_prompts(prompts, loaded.cfg.model, table)
    conditions = rows.repeat_interleave(a.per_class, dim=0)
    labels = torch.arange(len(prompts)).repeat_interleave(a.per_class)
    t0 = time.perf_counter()
    if a.animate is not None:
        images = _animate(a, loaded, rows, guidance, scale, device, names=prompts)
    else:
        images = generate_with(a, loaded, conditions, guidance, device)
    dt = time.perf_counter() - t0
    if kind is None or not dist.world().is_main:  # rank 0 alone writes
        return 0
    record = {**record, "given": given, "prompts": prompts}
    names = prompts if kind != "folder" else [f"prompt-{i:03d}" for i in range(len(prompts))]
    write_samples(
        a.out, images, labels, names, record, per_class=a.per_class, classes=range(len(prompts)),
        label_chars=PROMPT_LABEL_CHARS,
    )  # fmt: skip
    print(
        f"wrote {len(labels)} images of {len(prompts)} prompts to {a.out} (s={scale:g}, "
        f"w={scale - 1:g}{', negative prompt' if a.negative_prompt is not None else ''}, "
        f"{a.sampler} {a.steps} steps, seed {a.seed}; {len(labels) / dt:.1f} images/s)"
    )
    return 0


def _animate(a: argparse.Namespace, loaded, wanted, guidance, scale: float, device, names=None):
    """Write --animate; returns the final images (those --out takes, at --scale). A text
    model's `wanted` are its prompts' embeddings and `names` the prompts."""
    from cfgdiff.previews import denoising_animation
    from cfgdiff.runtime import resolve_precision
    from cfgdiff.viz import save_animation

    scales = a.animate_scales or [scale]
    anim = denoising_animation(
        loaded.net, loaded.cfg, wanted, scales=scales, per_class=a.per_class, guidance=guidance,
        names=names,
        sampler=a.sampler, steps=a.steps, eta=a.eta, spacing=a.spacing, seed=a.seed,
        device=device, precision=resolve_precision(a.precision, device), show=a.animate_show,
        log=log,
    )  # fmt: skip
    save_animation(anim.frames, a.animate)
    print(
        f"wrote {a.animate}: {len(anim.frames)} frames of {a.steps} {a.sampler} steps, "
        f"{'predicted x0' if a.animate_show == 'x0' else 'x_t'}; rows = "
        f"{'prompts' if names is not None else 'classes'}, columns = "
        f"s {','.join(f'{s:g}' for s in scales)} x {a.per_class} (seed {a.seed})"
    )
    return anim.images
