"""`cfgdiff export --format diffusers`: a folder that Hugging Face diffusers loads with
`CfgdiffPipeline.from_pretrained(OUT)` (export/diffusers_pipeline.py; docs/export.md):

    OUT/model_index.json                           CfgdiffPipeline: unet + scheduler
    OUT/unet/config.json                           the run's config (RunConfig.to_dict())
    OUT/unet/diffusion_pytorch_model.safetensors   the EMA (or raw) weights, cfgdiff's names
    OUT/scheduler/scheduler_config.json            cfgdiff's noise schedule in diffusers' terms
    OUT/README.md                                  how to load it, and where it came from

Owns the mapping of a run's diffusion config onto a diffusers scheduler config
(`scheduler_config`): the exact betas (trained_betas), the prediction type, "trailing" timesteps
(cfgdiff's default spacing), x0_hat clamped to [-1, 1] (cfgdiff's default static threshold), and
the scheduler class that is the counterpart of the model's own sampler (SCHEDULERS). The folder
is built under a temporary sibling name and renamed into place, so OUT is whole or absent.
Refused before any work: an OUT that is a file or a folder holding anything, or that lies in a
checkpoint folder or on one of the run's own files; a text model (the pipeline takes class
labels); diffusers missing or older than MIN_DIFFUSERS.
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
from pathlib import Path

from cfgdiff.checkpoint import EXPORT_DTYPES, LATEST, input_paths, load_for_sampling
from cfgdiff.config import RunConfig
from cfgdiff.errors import ConfigError
from cfgdiff.files import fsync_dir, refuse_overlap, writing
from cfgdiff.records import MANIFEST
from cfgdiff.schedule import make_schedule

MIN_DIFFUSERS = (0, 30)
INSTALL = "pip install 'cfgdiff[diffusers]'"

# cfgdiff's sampler -> the diffusers scheduler that takes the same steps (docs/export.md,
# "Schedulers"); the folder holds the one of the model's own sampler.
SCHEDULERS = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "dpmpp-2m": "DPMSolverMultistepScheduler",
    # the same solver with algorithm_type "sde-dpmsolver++" (scheduler_config)
    "dpmpp-2m-sde": "DPMSolverMultistepScheduler",
    # Heun's steps in sigma without EDM's churn: the nearest diffusers has for a discrete model
    "edm": "HeunDiscreteScheduler",
}
# diffusion.prediction -> diffusers' prediction_type
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction"}


def scheduler_config(cfg: RunConfig) -> dict:
    """The scheduler config (every key any of SCHEDULERS reads; each class keeps its own) under
    which diffusers' schedulers step as cfgdiff's samplers of the same name do."""
    d = cfg.diffusion
    schedule = make_schedule(d.schedule, d.timesteps)
    return {
        "num_train_timesteps": d.timesteps,
        # the exact table: diffusers' "linear" is not cfgdiff's for T != 1000 (rescaled
        # endpoints) and its "squaredcos_cap_v2" is computed another way (schedule.py)
        "trained_betas": schedule.betas.tolist(),
        "prediction_type": PREDICTION_TYPES[d.prediction],
        # t_i = round(T - i T / steps) - 1: schedule.spaced_timesteps' "trailing"
        "timestep_spacing": "trailing",
        "steps_offset": 0,
        # alpha_bar before t = 0 is 1: samplers step to the clean data last
        "set_alpha_to_one": True,
        # x0_hat clamped to [-1, 1], cfgdiff's static threshold: a dynamic threshold whose
        # scale is capped at sample_max_value = 1 is exactly that clamp
        "thresholding": True,
        "sample_max_value": 1.0,
        "clip_sample": True,
        "clip_sample_range": 1.0,
        # DPM-Solver++(2M), first order on the first step and on the last (to sigma = 0); its
        # SDE form for a model whose own sampler is dpmpp-2m-sde
        "algorithm_type": (
            "sde-dpmsolver++" if cfg.sampling.sampler == "dpmpp-2m-sde" else "dpmsolver++"
        ),
        "solver_order": 2,
        "solver_type": "midpoint",
        "lower_order_final": True,
        "final_sigmas_type": "zero",
        # DDPM: the posterior variance beta-tilde, no noise on the last step
        "variance_type": "fixed_small",
    }


def make_scheduler(cfg: RunConfig, name: str | None = None):
    """The diffusers scheduler `name` (default: the model's own sampler's, SCHEDULERS) built
    from scheduler_config(cfg), with the keys it takes."""
    import diffusers

    cls = getattr(diffusers, name or SCHEDULERS[cfg.sampling.sampler])
    takes = set(inspect.signature(cls.__init__).parameters)
    return cls(**{k: v for k, v in scheduler_config(cfg).items() if k in takes})


def _check_diffusers() -> None:
    try:
        import diffusers
    except ImportError:
        raise ConfigError(f"`format=diffusers` needs the diffusers package: {INSTALL}") from None
    version = getattr(diffusers, "__version__", "0")
    found = tuple(int(p) if p.isdigit() else 0 for p in version.split(".")[:2])
    if found < MIN_DIFFUSERS:
        need = ".".join(map(str, MIN_DIFFUSERS))
        raise ConfigError(
            f"`format=diffusers` needs diffusers >= {need}, found {version}: {INSTALL}"
        )


def _check_out(path: Path, out: Path) -> None:
    """OUT may be a new name or an empty folder, outside checkpoint folders and the run's
    own files."""
    if out.is_symlink():
        raise ConfigError(f"`out` {out}: is a symbolic link; name a new or empty folder")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"`out` {out}: is a file; `format=diffusers` writes a folder")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"`out` {out}: is a folder that holds files; name a new or empty one")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"`out` {out}: {parent} is not a folder")
    parent = out.resolve().parent
    if (parent / "config.json").is_file() or any(
        (folder / MANIFEST).is_file() for folder in (parent, *parent.parents)
    ):
        raise ConfigError(
            f"`out` {out}: inside a checkpoint folder, whose files it could overwrite; write "
            "it elsewhere (e.g. beside the run folder)"
        )
    refuse_overlap(out, input_paths(path))


def export_diffusers(
    path: Path, out: Path, *, ema: bool = True, dtype: str = "fp32", log=None
) -> dict:
    """Write the class model at `path` (a checkpoint or run folder) as a diffusers folder `out`:
    its EMA weights (or the raw ones, ema=False) stored as `dtype`, its config, and the
    scheduler of its own sampler. Returns what was written: "summary" (one line), "weights",
    "source", "dtype", "scheduler". `log` hears each checkpoint of the run passed over."""
    path, out = Path(path), Path(out)
    _check_diffusers()
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"`dtype` must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    if path.is_file() and path.name != LATEST:
        raise ConfigError(f"`checkpoint` {path}: expected a checkpoint or run folder")
    _check_out(path, out)
    loaded = load_for_sampling(path, ema=ema)
    for s in loaded.skipped:
        if log is not None:
            log(s.line())
    cfg = loaded.cfg
    if cfg.model.condition != "class":
        raise ConfigError("`format=diffusers` exports class models; this one reads prompts")

    from cfgdiff.export.diffusers_pipeline import CfgdiffPipeline, CfgdiffUNet

    unet = CfgdiffUNet(run_config=cfg.to_dict())
    unet.net.load_state_dict(loaded.net.state_dict())
    unet.net.to(EXPORT_DTYPES[dtype])  # stored so; from_pretrained loads fp32 unless asked
    scheduler = make_scheduler(cfg)
    pipe = CfgdiffPipeline(unet=unet, scheduler=scheduler)
    source = f"{loaded.path.parent.parent.name}/{loaded.path.name}"  # RUN/step-N, no local path
    info = {
        "weights": "ema" if ema else "model",
        "source": source,
        "dtype": dtype,
        "scheduler": type(scheduler).__name__,
    }
    _write_folder(out, lambda tmp: _fill(tmp, pipe, cfg, info))
    info["summary"] = (
        f"a diffusers folder: CfgdiffPipeline with the {info['weights']} weights of {source} in "
        f"{dtype} and {info['scheduler']} (the model's own {cfg.sampling.sampler}); load it with "
        "cfgdiff.export.diffusers_pipeline.CfgdiffPipeline.from_pretrained (README.md inside)"
    )
    return info


def _fill(tmp: Path, pipe, cfg: RunConfig, info: dict) -> None:
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "README.md").write_text(_readme(cfg, info))


def _readme(cfg: RunConfig, info: dict) -> str:
    names = cfg.label_names()
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    return f"""# cfgdiff model: {cfg.dataset}

A class-conditional diffusion model trained with cfgdiff ({info["weights"]} weights of
{info["source"]}, stored in {info["dtype"]}), as Hugging Face diffusers components.
Classes ({cfg.model.num_classes}): {shown}. Images: {cfg.model.in_channels} x
{cfg.model.image_size} x {cfg.model.image_size}.

```python
# pip install cfgdiff diffusers
from cfgdiff.export.diffusers_pipeline import CfgdiffPipeline
pipe = CfgdiffPipeline.from_pretrained("path/to/this/folder")
images = pipe([0, 1, 2], guidance_scale=3.0, num_inference_steps={cfg.sampling.steps}).images
```

`guidance_scale` is cfgdiff's s: eps_null + s (eps_cond - eps_null); s = 1 is conditional, s = 0
unconditional (the paper's w is s - 1). The scheduler is diffusers' {info["scheduler"]} (the
model's own sampler, {cfg.sampling.sampler}); DDIMScheduler or DPMSolverMultistepScheduler
`.from_config(pipe.scheduler.config)` take the same schedule. See cfgdiff's docs/export.md.
"""


def _write_folder(out: Path, fill) -> None:
    """`fill(tmp)` writes the folder's content into a temporary sibling of `out`; every file is
    fsynced and the folder renamed to `out` (which may be an empty folder). A failure leaves
    `out` as it was and no temporary folder behind."""
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        try:
            os.chmod(tmp, 0o755)
            fill(tmp)
            for root, _, files in os.walk(tmp):
                for name in files:
                    os.chmod(Path(root) / name, 0o644)
                    fd = os.open(Path(root) / name, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                fsync_dir(Path(root))
            os.rename(tmp, out)  # onto a new name or an empty folder, nothing else
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(out.parent)
