"""A tiny random StableDiffusionXLPipeline, built offline from configs and saved with save_pretrained: a
UNet2DConditionModel with SDXL's added conditioning (``addition_embed_type="text_time"``), a CLIPTextModel and a
CLIPTextModelWithProjection over the tiny CLIP tokenizer, a tiny AutoencoderKL with SDXL's scaling factor, and
SDXL base's scheduler config (Euler, leading spacing, steps_offset 1)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from tiny_latent import TEXT_CONFIG, tiny_tokenizer, tiny_vae

SDXL_SCHEDULER = {  # stabilityai/stable-diffusion-xl-base-1.0's scheduler config
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
}
SDXL_SCALING = 0.13025  # the SDXL VAE's scaling_factor
PROJECTION = 8  # the second text encoder's pooled projection
TIME_EMBED = 8  # per time id: 6 ids (original size, crop corner, target size)


def save_tiny_sdxl(folder: Path, force_zeros_for_empty_prompt: bool = True) -> Path:
    """A tiny StableDiffusionXLPipeline (16x16 pixels, 8x8 latents) saved into ``folder``."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            block_out_channels=(8, 16),
            layers_per_block=1,
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=2 * TEXT_CONFIG["hidden_size"],  # the two encoders' embeddings, concatenated
            attention_head_dim=4,
            norm_num_groups=4,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=TIME_EMBED,
            projection_class_embeddings_input_dim=PROJECTION + 6 * TIME_EMBED,
        )
        vae = tiny_vae(SDXL_SCALING)
        text = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_CONFIG, projection_dim=PROJECTION))
    tokenizer = tiny_tokenizer(folder / "_tokenizer_files")
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text,
        text_encoder_2=text_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        add_watermarker=False,
    )
    pipe.save_pretrained(folder)
    return folder
