"""`cfgdiff sample`: parse, prepare and run one sampling job (sampling.request), write what it
made, print where it went."""

from __future__ import annotations

import argparse
from pathlib import Path

from cfgdiff.cli.options import (
    classes,
    floats,
    guidance_of,
    int_in,
    negative_prompt_option,
    sampling_options,
    settings_of,
)
from cfgdiff.cli.progress import log


def add_parser(sub) -> None:
    sa = sub.add_parser("sample", help="generate images from a checkpoint")
    sampling_options(sa, required=False)  # the library checks: --animate-scales stands for --scale
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


def request(a: argparse.Namespace):
    """The library's SampleRequest for parsed `sample` arguments."""
    from cfgdiff.sampling.conditions import Asks
    from cfgdiff.sampling.request import SampleRequest

    asks = Asks(
        classes=tuple(a.classes) if a.classes is not None else None,
        prompts=tuple(a.prompt) if a.prompt else None, prompts_file=a.prompts,
        negative_class=a.negative_class, negative_prompt=a.negative_prompt,
    )  # fmt: skip
    return SampleRequest(
        checkpoint=a.checkpoint, scale=a.scale, w=a.w, asks=asks, per_class=a.per_class,
        guidance=guidance_of(a), guide_checkpoint=a.guide_checkpoint, settings=settings_of(a),
        out=a.out, animate=a.animate, animate_show=a.animate_show,
        animate_scales=tuple(a.animate_scales) if a.animate_scales is not None else None,
    )  # fmt: skip


def run(a: argparse.Namespace) -> int:
    from cfgdiff import dist
    from cfgdiff.cli.options import UsageError
    from cfgdiff.sampling import request as sampling

    if a.checkpoint is None:
        raise UsageError("the following arguments are required: --checkpoint")
    if a.out is None and a.animate is None:  # a command that would write nothing
        raise UsageError("one of the arguments --out --animate is required")
    world, req = dist.world(), request(a)
    job = sampling.prepare(req)
    if world.is_main:
        for line in job.skipped_lines():
            log(line)
        print(job.note(), flush=True)
    if a.animate is not None:
        from cfgdiff.pictures.images import save_animation
        from cfgdiff.sampling.animation import denoising_animation, describe

        scales = a.animate_scales or [job.scale]
        anim = denoising_animation(job, scales, show=a.animate_show, log=log)
        save_animation(anim.frames, a.animate)
        print(f"wrote {a.animate}: {describe(anim, job, scales, a.animate_show)}")
        if a.out is None:
            return 0
        samples = job.samples(anim.images, anim.seconds)
    else:
        samples = job.run(log=log, world=world)
    if a.out is not None and world.is_main:  # rank 0 alone writes
        print(samples.summary(samples.write(a.out)))
    return 0
