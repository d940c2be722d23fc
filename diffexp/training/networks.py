"""The trained network (``network: unet | dit``), its noise schedule and the pipeline folder it is saved as.

- ``unet``: a ``UNet2DModel``, saved as a ``DDPMPipeline`` (``unet/``, ``scheduler/``);
- ``dit``: a class-conditional ``DiTTransformer2DModel`` on the pixels themselves, saved as a ``DiTPipeline``
  folder without a VAE (``transformer/``, ``scheduler/``, ``"vae": [null, null]``), which diffexp samples in pixel
  space. Its ``num_embeds_ada_norm`` is ``num_classes``; the label table has one more row, the null class
  ``num_classes``, as in DiT-XL/2.

The noise schedule is a ``DDPMScheduler`` (variance preserving) or a ``FlowMatchEulerDiscreteScheduler`` (the
rectified-flow path of ``prediction_type: flow_prediction``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    UNet2DModel,
)
from diffusers.models.embeddings import LabelEmbedding
from omegaconf import DictConfig, OmegaConf

from diffexp.errors import DiffexpError

NETWORKS = {"unet": UNet2DModel, "dit": DiTTransformer2DModel}
NOISE_SCHEDULES = {"DDPMScheduler": DDPMScheduler, "FlowMatchEulerDiscreteScheduler": FlowMatchEulerDiscreteScheduler}
NoiseScheduler = DDPMScheduler | FlowMatchEulerDiscreteScheduler


def _options(cfg: DictConfig, key: str, cls: type, set_here: set[str], why: str) -> dict[str, Any]:
    """``cfg.<key>`` as keyword arguments of ``cls``, refusing a key it does not take or one set from elsewhere."""
    block = cfg.get(key) or {}
    options = OmegaConf.to_container(block, resolve=True) if isinstance(block, DictConfig) else dict(block)
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"} - set_here
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise DiffexpError(
            f"{key}.{unknown[0]} is not a {cls.__name__} option ({why}). Options: {', '.join(sorted(allowed))}."
        )
    return dict(options)


def build_unet(cfg: DictConfig) -> UNet2DModel:
    why = "sample_size and channels come from the dataset, num_class_embeds from num_classes"
    options = _options(
        cfg, "unet", UNet2DModel, {"sample_size", "in_channels", "out_channels", "num_class_embeds"}, why
    )
    if cfg.num_classes:
        options["num_class_embeds"] = cfg.num_classes + 1  # the classes and the null class (id num_classes)
    ds = cfg.dataset
    try:
        return UNet2DModel(sample_size=ds.sample_size, in_channels=ds.channels, out_channels=ds.channels, **options)
    except (ValueError, TypeError, AssertionError) as err:
        raise DiffexpError(f"UNet2DModel refused the options {options}: {err}") from None


def build_dit(cfg: DictConfig) -> DiTTransformer2DModel:
    """A pixel-space DiT: channels in = out (no learned variance), patches that tile the image."""
    set_here = {"sample_size", "in_channels", "out_channels", "num_embeds_ada_norm", "norm_type"}
    why = "sample_size and channels come from the dataset, num_embeds_ada_norm from num_classes"
    options = _options(cfg, "dit", DiTTransformer2DModel, set_here, why)
    if not cfg.num_classes:
        raise DiffexpError("network=dit is class-conditional (adaLN-Zero takes a class label): set num_classes.")
    size, patch = cfg.dataset.sample_size, options.get("patch_size", 2)
    if not isinstance(patch, int) or not 0 < patch <= size or size % patch:
        raise DiffexpError(
            f"dit.patch_size={patch} is not allowed: patches must tile the {size}x{size} image (a divisor of {size})."
        )
    for key in ("num_layers", "num_attention_heads", "attention_head_dim"):
        if key in options and not (isinstance(options[key], int) and options[key] >= 1):
            raise DiffexpError(f"dit.{key}={options[key]} is not allowed: it must be an integer >= 1.")
    ch = cfg.dataset.channels
    try:
        dit = DiTTransformer2DModel(
            sample_size=size, in_channels=ch, out_channels=ch, num_embeds_ada_norm=cfg.num_classes, **options
        )
    except (ValueError, TypeError, AssertionError, NotImplementedError) as err:
        raise DiffexpError(f"DiTTransformer2DModel refused the options {options}: {err}") from None
    return without_own_label_dropout(dit)


def without_own_label_dropout(network: torch.nn.Module) -> torch.nn.Module:
    """DiT's label embeddings drop labels themselves in training mode (p = 0.1, each block on its own draw);
    off, so that ``label_dropout`` drops a sample's label once, for every block, from the trainer's generator.
    The null class's row stays: the table size is fixed when the network is built."""
    for module in network.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
    return network


def build_network(cfg: DictConfig) -> torch.nn.Module:
    if cfg.get("network", "unet") not in NETWORKS:
        raise DiffexpError(f"network={cfg.network}: use one of {', '.join(NETWORKS)}.")
    return build_dit(cfg) if cfg.get("network", "unet") == "dit" else build_unet(cfg)


def network_name(network: torch.nn.Module) -> str:
    """unet or dit: the ``network`` key a module was built from."""
    return next((name for name, cls in NETWORKS.items() if isinstance(network, cls)), type(network).__name__)


def class_rows(network: torch.nn.Module) -> int | None:
    """The rows of a class-conditional network's label table (classes and the null class); None: unconditional."""
    if isinstance(network, DiTTransformer2DModel):
        return network.config.num_embeds_ada_norm + 1
    return getattr(network.config, "num_class_embeds", None)


def build_noise_scheduler(config: Mapping[str, Any]) -> NoiseScheduler:
    """The noise schedule a ``noise_schedule`` config names (``_class_name``; default DDPMScheduler)."""
    name = str(config.get("_class_name") or "DDPMScheduler")
    if name not in NOISE_SCHEDULES:
        raise DiffexpError(f"noise_schedule._class_name={name}: use one of {', '.join(NOISE_SCHEDULES)}.")
    return NOISE_SCHEDULES[name].from_config(dict(config))


def pipeline_of(network: torch.nn.Module, scheduler: NoiseScheduler) -> DiffusionPipeline:
    """The pipeline a network is saved as (``save_pretrained``; a DiT's missing VAE is recorded as null)."""
    if isinstance(network, DiTTransformer2DModel):
        return DiTPipeline(transformer=network, vae=None, scheduler=scheduler)
    return DDPMPipeline(unet=network, scheduler=scheduler)


def save_quietly(pipeline: DiffusionPipeline, folder: Path) -> None:
    """``save_pretrained`` without diffusers' warning that a null component (a pixel DiT's VAE) is not saved."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        pipeline.save_pretrained(folder)
    finally:
        diffusers_logging.set_verbosity(level)
