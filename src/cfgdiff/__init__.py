"""cfgdiff: class-conditional diffusion models with classifier-free guidance.

Public API (nothing is executed at import beyond these imports):
    RunConfig, ModelConfig, DiffusionConfig, TrainConfig, SamplingConfig  config.py
    PRESETS, config_for_dataset                                          presets.py
    UNet                                                                 unet.py
    Guidance, APG, guided_denoiser, cfg_combine                          sampling/guidance.py
    SAMPLERS, sample_ddpm, sample_ddim, sample_dpmpp_2m,
    sample_dpmpp_2m_sde, sample_edm                                      sampling/samplers.py
    SamplingSettings                                                     sampling/settings.py
    Asks, Model, ClassLabels, TextPrompts                                sampling/conditions.py
    generate                                                             sampling/generate.py
    SampleRequest, prepare (-> SamplingJob -> run -> Samples)            sampling/request.py
    train                                                                train/
    load_dataset, DATASETS                                               data/
    load_for_sampling                                                    checkpoint.py
"""

from cfgdiff.checkpoint import load_for_sampling
from cfgdiff.config import DiffusionConfig, ModelConfig, RunConfig, SamplingConfig, TrainConfig
from cfgdiff.data import DATASETS, load_dataset
from cfgdiff.presets import PRESETS, config_for_dataset
from cfgdiff.sampling.conditions import Asks, ClassLabels, Model, TextPrompts
from cfgdiff.sampling.generate import generate
from cfgdiff.sampling.guidance import APG, Guidance, cfg_combine, guided_denoiser
from cfgdiff.sampling.request import SampleRequest, prepare
from cfgdiff.sampling.samplers import (
    SAMPLERS,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_edm,
)
from cfgdiff.sampling.settings import SamplingSettings
from cfgdiff.train import train
from cfgdiff.unet import UNet

__version__ = "0.1.0"
__all__ = [
    "APG",
    "Asks",
    "ClassLabels",
    "DATASETS",
    "DiffusionConfig",
    "Guidance",
    "Model",
    "ModelConfig",
    "PRESETS",
    "RunConfig",
    "SAMPLERS",
    "SampleRequest",
    "SamplingConfig",
    "SamplingSettings",
    "TextPrompts",
    "TrainConfig",
    "UNet",
    "cfg_combine",
    "config_for_dataset",
    "generate",
    "guided_denoiser",
    "load_dataset",
    "load_for_sampling",
    "prepare",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_edm",
    "train",
]
