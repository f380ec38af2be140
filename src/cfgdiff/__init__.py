"""cfgdiff: class-conditional diffusion models with classifier-free guidance.

Public API (nothing is executed at import beyond these imports):
    RunConfig, ModelConfig, DiffusionConfig, TrainConfig, PRESETS   config.py
    UNet                                                             unet.py
    Guidance, APG, guided_denoiser, cfg_combine                      guidance.py
    sample_ddpm, sample_ddim, sample_dpmpp_2m                        samplers.py
    generate                                                         sample.py
    train                                                            train.py
    load_dataset                                                     data/
"""

from cfgdiff.config import PRESETS, DiffusionConfig, ModelConfig, RunConfig, TrainConfig
from cfgdiff.data import load_dataset
from cfgdiff.guidance import APG, Guidance, cfg_combine, guided_denoiser
from cfgdiff.sample import generate
from cfgdiff.samplers import sample_ddim, sample_ddpm, sample_dpmpp_2m
from cfgdiff.train import train
from cfgdiff.unet import UNet

__version__ = "0.1.0"
__all__ = [
    "APG",
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
