"""Latent diffusion models: the Stable Diffusion family (text, ``StableDiffusionPipeline``,
``StableDiffusionXLPipeline``, and the transformers ``StableDiffusion3Pipeline`` and ``FluxPipeline``, whose latent
models are in ``diffexp.sampling.mmdit``) and DiT (class labels, ``DiTPipeline``), loaded with their own diffusers
pipeline, whose class in ``model_index.json`` picks the adapter.

The loop runs in latent space; ``to_pixels`` decodes x or x0 as the pipelines do,
``vae.decode(latents / scaling_factor + shift_factor).sample``, or shows them through a fixed linear
latent-to-RGB map (``preview=latent``) that calls no decoder. Prompts are encoded once per run with the pipeline's
own ``encode_prompt``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from diffexp.errors import DiffexpError
from diffexp.sampling.previews import LATENT_RGB, LatentRGB, known_previews, vae_key

# the pipeline class of model_index.json -> what conditions it: text (prompts) or class labels
LATENT_PIPELINES = {"StableDiffusionPipeline": "text", "StableDiffusionXLPipeline": "text", "DiTPipeline": "class"}
# flow-matching text-to-image transformers (diffexp.sampling.sd3, diffexp.sampling.flux)
LATENT_PIPELINES |= {"StableDiffusion3Pipeline": "text", "FluxPipeline": "text"}
# what diffexp leaves out, and why
NOT_SUPPORTED: dict[str, str] = {}
# the parts a text pipeline folder must hold to encode prompts
TEXT_PARTS = {
    "StableDiffusionPipeline": ("text_encoder", "tokenizer"),
    "StableDiffusionXLPipeline": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
    # SD3: two CLIPs (its T5, text_encoder_3 and tokenizer_3, may be left out); Flux: CLIP and T5
    "StableDiffusion3Pipeline": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
    "FluxPipeline": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
}
# from_pretrained's options beyond the weights: SD's safety checker is not loaded
LOAD_OPTIONS: dict[str, dict[str, Any]] = {
    "StableDiffusionPipeline": {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False},
}


def pipeline_class(source: str, revision: str | None = None) -> str | None:
    """The pipeline class that ``model_index.json`` names; None when it cannot be read (the loader then says why)."""
    from diffusers import DiffusionPipeline

    try:
        return str(DiffusionPipeline.load_config(source, revision=revision).get("_class_name"))
    except Exception:  # the Hub client raises many types; the pipeline loader reports the failure
        return None


def check_text_parts(source: str, class_name: str) -> None:
    """A local text-to-image folder must hold its text encoders and tokenizers."""
    folder = Path(source)
    if not folder.is_dir():
        return
    index = json.loads((folder / "model_index.json").read_text())
    for part in TEXT_PARTS[class_name]:
        entry = index.get(part)
        if not entry or entry[0] is None or not (folder / part).is_dir():
            raise DiffexpError(
                f"The {class_name} folder '{source}' has no {part} ({part}/ and its model_index.json entry): "
                "diffexp encodes prompts with the pipeline's own text encoders and tokenizers, so they must be "
                f"there, as {class_name}.save_pretrained writes them."
            )


@dataclass
class LatentModel:
    """The parts of a latent pipeline around its denoiser: the pipeline (prompt encoding), the VAE, the size."""

    pipeline: Any
    kind: str  # text | class
    size: tuple[int, int]  # latent height and width of this run

    @property
    def vae(self) -> Any:
        return self.pipeline.vae

    @property
    def scale(self) -> int:
        """Pixels per latent (the pipelines' ``vae_scale_factor``)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def denoiser(self) -> Any:
        return self.pipeline.unet if self.kind == "text" else self.pipeline.transformer

    @property
    def channels(self) -> int:
        """Latent channels of a sample as the loop holds it."""
        return int(self.denoiser.config.in_channels)

    def timesteps_kwargs(self, scheduler: Any, steps: int) -> dict[str, Any]:
        """The ``set_timesteps`` arguments the pipeline itself passes beyond the step count (none here)."""
        return {}

    @property
    def default_hw(self) -> tuple[int, int]:
        size = self.denoiser.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return h * self.scale, w * self.scale

    def set_size(self, height: int | None, width: int | None) -> None:
        """The latent size for ``height`` x ``width`` pixels (null: the model's own), or a clear refusal."""
        default = self.default_hw
        h, w = height or default[0], width or default[1]
        if self.kind == "class" and (h, w) != default:
            raise DiffexpError(
                f"height={h} / width={w} is not allowed: DiT's position embeddings fix its size at "
                f"{default[0]}x{default[1]} pixels (leave height and width unset)."
            )
        if h <= 0 or w <= 0 or h % self.scale or w % self.scale:
            raise DiffexpError(
                f"height={h} / width={w} is not allowed: the VAE downsamples by {self.scale}, so both must be positive "
                f"multiples of {self.scale} (the model's own size is {default[0]}x{default[1]})."
            )
        self.size = (h // self.scale, w // self.scale)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1], float32: the pipelines' ``vae.decode(latents / scaling_factor)``."""
        vae = self.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None)
        if shift:
            z = z + shift
        return vae.decode(z).sample.float().clamp(-1, 1)

    def preview_map(self) -> LatentRGB:
        """The linear latent-to-RGB map of this VAE, or a clear refusal naming the known ones."""
        channels, scaling, shift = key = vae_key(self.vae.config)
        if key not in LATENT_RGB:
            raise DiffexpError(
                f"preview=latent has no latent-to-RGB map for this VAE ({channels} latent channels, scaling_factor "
                f"{scaling}, shift_factor {shift}); diffexp knows {known_previews()}. Use preview=vae (the exact "
                "decode)."
            )
        return LATENT_RGB[key]

    def preview(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> an RGB approximation in [-1, 1] without the decoder, upsampled to the image size."""
        rgb = self.preview_map()(latents)
        return F.interpolate(rgb, scale_factor=self.scale, mode="nearest").clamp(-1, 1)

    def encode(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        """Text embeddings of ``prompts``, with the pipeline's own ``encode_prompt`` (tokenizer, CLIP encoder)."""
        embeds, _ = self.pipeline.encode_prompt(prompts, device, 1, False)
        return embeds


def load_latent(
    source: str,
    revision: str | None,
    class_name: str,
    device: torch.device,
    dtype: torch.dtype,
    components: dict[str, Any] | None = None,
) -> Any:
    """The latent pipeline ``source`` holds, on ``device`` in ``dtype``; the safety checker is not loaded;
    ``components``: parts given instead of loaded (None: left out, as SD3's T5 may be)."""
    import diffusers

    if class_name in NOT_SUPPORTED:
        raise DiffexpError(f"'{source}' is a {class_name}; diffexp leaves it out: {NOT_SUPPORTED[class_name]}.")
    kind = LATENT_PIPELINES[class_name]
    extra: dict[str, Any] = dict(components or {})
    if kind == "text":
        check_text_parts(source, class_name)
        import transformers  # noqa: F401  (a dependency only text models need; fail here, clearly, if missing)
    extra |= LOAD_OPTIONS.get(class_name, {})
    try:
        with quiet_loading():
            pipe = getattr(diffusers, class_name).from_pretrained(
                source, revision=revision, **extra, **loading_options(dtype)
            )
    except Exception as err:  # the Hub client and the loaders raise many types; all mean "could not load"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DiffexpError(f"Could not load the {class_name} '{source}': {reason[:300]}.") from None
    if kind == "text" and (getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None):
        raise DiffexpError(f"The {class_name} '{source}' has no text encoder or tokenizer, which prompts need.")
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    if class_name == "StableDiffusionXLPipeline" and dtype == torch.float16 and pipe.vae.config.force_upcast:
        pipe.vae.to(torch.float32)  # the SDXL VAE overflows in fp16: it decodes in fp32, as the pipeline does
    for part in pipe.components.values():
        if isinstance(part, torch.nn.Module):
            part.eval().requires_grad_(False)
    return pipe


def loading_options(dtype: torch.dtype) -> dict[str, Any]:
    """``from_pretrained``'s options: load in ``dtype`` (``dtype=`` since diffusers 0.42, ``torch_dtype=`` before),
    and ``low_cpu_mem_usage`` as accelerate allows, so diffusers does not advise installing it on every load."""
    import diffusers
    from diffusers.utils import is_accelerate_available
    from packaging.version import Version

    key = "dtype" if Version(diffusers.__version__) >= Version("0.42") else "torch_dtype"
    return {key: dtype, "low_cpu_mem_usage": is_accelerate_available()}


@contextmanager
def quiet_loading() -> Iterator[None]:
    """diffusers' "Loading pipeline components" progress bar off while a pipeline loads: a run prints only
    diffexp's own lines."""
    from diffusers.utils import logging as diffusers_logging

    bars = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            diffusers_logging.enable_progress_bar()


def set_vae_modes(latent: LatentModel | None, model: str, tiling: bool, slicing: bool) -> None:
    """``vae_tiling`` and ``vae_slicing`` on a latent model's VAE (AutoencoderKL's enable_tiling / enable_slicing),
    set on and off every run; refused on a pixel model, which has no VAE to decode with."""
    if latent is None:
        if tiling or slicing:
            key = "vae_tiling" if tiling else "vae_slicing"
            raise DiffexpError(
                f"{key}=true applies to latent models, whose VAE decodes the samples; {model} is a pixel-space model "
                "and has no VAE. Leave vae_tiling and vae_slicing false."
            )
        return
    vae = latent.vae
    modes = ((tiling, "enable_tiling", "disable_tiling"), (slicing, "enable_slicing", "disable_slicing"))
    for on, enable, disable in modes:
        if not hasattr(vae, enable):
            if on:
                raise DiffexpError(f"{type(vae).__name__} of {model} has no {enable}: leave it false.")
            continue
        getattr(vae, enable if on else disable)()
