"""`cfgdiff info` (what a checkpoint or model file holds, verified) and `cfgdiff export` (one
model file to ship)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_info_parser(sub) -> None:
    inf = sub.add_parser(
        "info",
        help="what a checkpoint or model file holds (and verify it)",
        description="cfgdiff info --checkpoint PATH [--json]",
    )
    inf.add_argument(
        "--checkpoint", type=Path, required=True, help="checkpoint folder, run folder or model file"
    )
    inf.add_argument("--json", action="store_true", help="print the whole config as JSON")


def add_export_parser(sub) -> None:
    from cfgdiff.checkpoint import EXPORT_DTYPES
    from cfgdiff.export import FORMATS

    ex = sub.add_parser(
        "export",
        help="one .safetensors model file to ship: EMA weights + config (sample/eval take it)",
        description="cfgdiff export --checkpoint PATH --out FILE.safetensors [--raw]",
    )
    ex.add_argument("--checkpoint", type=Path, required=True, help="checkpoint or run folder")
    ex.add_argument(
        "--out", type=Path, required=True, help="the model file (.safetensors), or what --format "
        "writes"
    )  # fmt: skip
    ex.add_argument(
        "--format",
        default="safetensors",
        choices=list(FORMATS),
        help="safetensors: a model file cfgdiff samples (default); onnx: the network as one "
        "ONNX graph (--out FILE.onnx, fp32), checked against PyTorch, with the noise schedule, "
        "prediction type, classes or captions and the model's own sampler in its metadata "
        "(needs: pip install 'cfgdiff[onnx]')"
        "; web: a folder (--out DIR, new or empty) with a static page that samples the model in "
        "the browser with onnxruntime-web (fetched with npm, or --ort; needs the onnx extra)"
        "; diffusers: a folder (--out DIR, new or empty) that Hugging Face diffusers loads with "
        "CfgdiffPipeline.from_pretrained, for class models (needs: pip install "
        "'cfgdiff[diffusers]')",
    )
    ex.add_argument(
        "--raw", action="store_true", help="the raw weights instead of the EMA ones (sampling)"
    )
    ex.add_argument(
        "--ort", type=Path, metavar="PATH", help="--format web: onnxruntime-web's files from a "
        "folder or the .tgz of `npm pack onnxruntime-web` instead of fetching them with npm"
    )  # fmt: skip
    ex.add_argument(
        "--dtype",
        default="fp32",
        choices=list(EXPORT_DTYPES),
        help="storage type of the weights (fp16/bf16: half the file; loaded back as fp32)",
    )


def run_info(a: argparse.Namespace) -> int:
    """Load (and so verify) a checkpoint or model file and say what it is."""
    from cfgdiff.checkpoint import PREFIX, load_for_sampling, training_record
    from cfgdiff.cli.progress import log

    loaded = load_for_sampling(a.checkpoint)
    for s in loaded.skipped:
        log(s.line())
    kind = "model file" if loaded.path.is_file() else "checkpoint"
    # a checkpoint's training state (read once) says what it trained on and how
    record = training_record(loaded.path) if kind == "checkpoint" else None
    data = loaded.data if record is None else record["data_identity"]
    trained = None if record is None else record["precision"]
    if a.json:
        out = {
            "path": str(loaded.path),
            "kind": kind,
            **loaded.cfg.to_dict(),
            "data_identity": data,
        }
        if trained is not None:
            out["trained_with"] = {"device": trained[0], "precision": trained[1]}
        print(json.dumps(out, indent=1))
        return 0
    name = loaded.path.name
    step = name[len(PREFIX) :] if kind == "checkpoint" and name.startswith(PREFIX) else ""
    at = f", step {int(step)}" if step.isdigit() else ""
    print(f"{loaded.path} ({kind}{at}; SHA-256 verified)")
    print("\n".join(describe(loaded, data, trained)))
    return 0


def describe(loaded, data: dict | None, trained: tuple[str, str] | None) -> list[str]:
    """The lines of `info` below its first: data, images, network, diffusion, training,
    guidance."""
    from cfgdiff.config import GUIDANCE_CONVENTION
    from cfgdiff.unet import count_parameters

    cfg = loaded.cfg
    m, d, t = cfg.model, cfg.diffusion, cfg.train
    names = cfg.label_names()
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    lines = [f"  data:      {cfg.dataset}, {m.num_classes} classes: {shown}"]
    if data is not None:  # absent from checkpoints and files made before it was recorded
        lines.append(
            f"             {data['n']:,} training images, SHA-256 {data['sha256'][:16]}..."
        )
    timesteps = ""
    if d.t_sampling == "logit-normal":
        timesteps = f", timesteps logit-normal ({d.t_mean:g}, {d.t_std:g})"
        timesteps += f" with {d.t_uniform:g} uniform" if d.t_uniform else ""
    lines += [
        f"  images:    {m.in_channels} x {m.image_size} x {m.image_size}",
        f"  network:   {count_parameters(loaded.net) / 1e6:.2f} M parameters, base channels "
        f"{m.base_channels}, mult {m.channel_mult}, {m.num_res_blocks} res blocks per level, "
        f"attention at levels {m.attn_levels}"
        + (f", {m.patch_size}x{m.patch_size} patches" if m.patch_size > 1 else "")
        + (
            f"; conditioned on text: {m.text_encoder} ({m.text_dim} dims, weights SHA-256 "
            f"{m.text_encoder_sha256[:16]}...), a learned null vector"
            + (f"; cross-attention to {m.text_tokens} tokens" if m.text_tokens else "")
            if m.condition == "text"
            else ""
        ),
        f"  diffusion: {d.schedule} schedule, T = {d.timesteps}, {d.prediction}-prediction, "
        f"label dropout {d.label_dropout:g}"
        + (f", filler words {d.filler_words:g}" if d.filler_words else "")
        + timesteps,
        f"  training:  preset {cfg.preset}, {t.steps} steps x {t.batch_size} planned, lr {t.lr:g} "
        f"({t.lr_schedule}), EMA {t.ema_decay:g}"
        + (", random horizontal flips" if t.hflip else "")
        + (f", trained in {trained[1]} on {trained[0]}" if trained is not None else ""),
        f"  guidance:  {GUIDANCE_CONVENTION}; null label {m.num_classes}",
        f"  sampling:  {cfg.sampling.sampler}, {cfg.sampling.steps} steps, "
        f"{cfg.sampling.spacing} spacing: the model's own (sample, eval, sweep and serve take "
        "it without --sampler)",
    ]
    return lines


def run_export(a: argparse.Namespace) -> int:
    from cfgdiff.cli.progress import log
    from cfgdiff.errors import ConfigError
    from cfgdiff.export import export

    extra = {"ort": a.ort} if a.format == "web" else {}
    if a.ort is not None and a.format != "web":
        raise ConfigError(f"`ort` is for --format web, not {a.format}")
    meta = export(a.checkpoint, a.out, a.format, ema=not a.raw, dtype=a.dtype, log=log, **extra)
    if a.format != "safetensors":
        print(f"wrote {a.out}: {meta['summary']}")
        return 0
    size = a.out.stat().st_size / 2**20
    print(
        f"wrote {a.out} ({size:.1f} MiB: {meta['weights']} weights of {meta['source']} in "
        f"{meta['dtype']}, config embedded); sample with: cfgdiff sample --checkpoint {a.out} "
        "--scale 3 --out grid.png"
    )
    return 0
