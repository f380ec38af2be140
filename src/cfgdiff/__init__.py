"""cfgdiff: class-conditional diffusion models with classifier-free guidance.

Public API (nothing is executed at import beyond these imports):
    RunConfig, ModelConfig, DiffusionConfig, TrainConfig             config.py
    PRESETS, config_for_dataset                                      presets.py
    UNet                                                             unet.py
    Guidance, APG, guided_denoiser, cfg_combine                      guidance.py
    SAMPLERS, sample_ddpm, sample_ddim, sample_dpmpp_2m              samplers.py
    generate                                                         sample.py
    train                                                            train/
    load_dataset, DATASETS                                           data/
    load_for_sampling                                                checkpoint.py
"""

from cfgdiff.checkpoint import load_for_sampling
from cfgdiff.config import DiffusionConfig, ModelConfig, RunConfig, TrainConfig
from cfgdiff.data import DATASETS, load_dataset
from cfgdiff.guidance import APG, Guidance, cfg_combine, guided_denoiser
from cfgdiff.presets import PRESETS, config_for_dataset
from cfgdiff.sample import generate
from cfgdiff.samplers import SAMPLERS, sample_ddim, sample_ddpm, sample_dpmpp_2m
from cfgdiff.train import train
from cfgdiff.unet import UNet

__version__ = "0.1.0"
__all__ = [
    "APG",
    "DATASETS",
    "SAMPLERS",
    "config_for_dataset",
    "load_for_sampling",
    "Guidance",
    "sample_dpmpp_2m",
    "PRESETS",
    "DiffusionConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "UNet",
    "cfg_combine",
    "guided_denoiser",
    "generate",
    "sample_ddim",
    "sample_ddpm",
    "train",
    "load_dataset",
]
