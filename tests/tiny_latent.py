"""Tiny random latent pipelines, built offline from configs and saved with save_pretrained: Stable Diffusion
(UNet2DConditionModel, AutoencoderKL, CLIPTextModel with a tiny CLIPTokenizer whose files are written here) and DiT
(DiTTransformer2DModel, AutoencoderKL)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)

SD_SCHEDULER = {  # Stable Diffusion 1.x's scheduler config: PLMS, leading spacing, steps_offset 1
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}

# a tiny CLIP text encoder over the tokenizer's 60 tokens, 12 positions
TEXT_CONFIG = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1, "hidden_size": 16, "intermediate_size": 24}
TEXT_CONFIG |= {"num_attention_heads": 2, "num_hidden_layers": 2, "vocab_size": 64, "max_position_embeddings": 12}
# a tiny DiT on 8x8x4 latents: patch 2, learned sigma (8 output channels), DiT's 1000 classes (+ the null class)
DIT_CONFIG = {"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 8, "num_layers": 2}
DIT_CONFIG |= {"sample_size": 8, "patch_size": 2, "num_embeds_ada_norm": 1000}


def tiny_vae(scaling_factor: float = 0.18215) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        scaling_factor=scaling_factor,
    )


def tiny_tokenizer(folder: Path, max_length: int = 12):
    """A CLIPTokenizer over single characters (no merges): vocab.json and merges.txt written into ``folder``."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>", "!", ","] + [c for c in "abcdefghijklmnopqrstuvwxyz"]
    tokens += [c + "</w>" for c in "abcdefghijklmnopqrstuvwxyz!,"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def save_tiny_sd(folder: Path, prediction_type: str = "epsilon", scaling_factor: float = 0.18215) -> Path:
    """A tiny StableDiffusionPipeline (16x16 pixels, 8x8 latents) saved into ``folder``."""
    from transformers import CLIPTextConfig, CLIPTextModel

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
            cross_attention_dim=16,
            attention_head_dim=4,
            norm_num_groups=4,
        )
        vae = tiny_vae(scaling_factor)
        text = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    tokenizer = tiny_tokenizer(folder / "_tokenizer_files")
    scheduler = PNDMScheduler(**SD_SCHEDULER, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    path = folder / "scheduler" / "scheduler_config.json"  # SD 1.x's config also carries clip_sample: false
    path.write_text(json.dumps({**json.loads(path.read_text()), "clip_sample": False}, indent=2))
    return folder


def save_tiny_dit(folder: Path) -> Path:
    """A tiny DiTPipeline (16x16 pixels, 8x8 latents, learned sigma, 1000 classes + null) saved into ``folder``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = DiTTransformer2DModel(**DIT_CONFIG)
        vae = tiny_vae()
    scheduler = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False)
    DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler).save_pretrained(folder)
    return folder
