"""Tiny random SD3 and Flux pipelines, built offline from configs and saved with save_pretrained: MMDiT
transformers (SD3Transformer2DModel, FluxTransformer2DModel), an AutoencoderKL with 16 latent channels, CLIP text
encoders and a T5 encoder, with a byte-level CLIP BPE tokenizer and a T5 tokenizer written here (no download, no
sentencepiece)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)

WORDS = ("a", "cat", "dog", "red", "blurry", "photo")
CLIP_LENGTH = 12  # the CLIP tokenizers' model_max_length (77 in the real models)
T5_LENGTH = 64  # the T5 tokenizer's model_max_length (512 in the real models)
# the published scheduler configs: SD3.5 (a static shift of 3) and Flux.1 (dynamic shifting)
SD3_SCHEDULER = {"shift": 3.0}
FLUX_SCHEDULER = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}
FLUX_SCHEDULER |= {"base_image_seq_len": 256, "max_image_seq_len": 4096}


def clip_tokenizer(max_length: int = CLIP_LENGTH):
    """A byte-level BPE CLIPTokenizer: the 256 byte characters, each also word-final (</w>), merges that spell the
    test words, and the two special tokens (transformers 5 takes the merges as tuples)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": len(chars) + i for i, c in enumerate(chars)}
    merges: list[tuple[str, str]] = []
    for word in WORDS:  # left to right: c, ca, cat</w>
        for end in range(2, len(word) + 1):
            left, right = word[: end - 1], word[end - 1] + ("</w>" if end == len(word) else "")
            if (left, right) not in merges:
                merges.append((left, right))
                vocab.setdefault(left + right, len(vocab))
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def t5_tokenizer(max_length: int = T5_LENGTH):
    """A T5 tokenizer (Unigram, built by the tokenizers library) from (piece, score) pairs: the special tokens, the
    test words and single letters."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [("▁" + w, -1.0) for w in WORDS] + [(c, -2.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def clip_config(vocab_size: int, projection: bool):
    from transformers import CLIPTextConfig

    ids = {"bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1, "pad_token_id": vocab_size - 1}
    size = {"hidden_size": 16, "intermediate_size": 24, "num_attention_heads": 2, "num_hidden_layers": 2}
    return CLIPTextConfig(
        vocab_size=vocab_size,
        max_position_embeddings=CLIP_LENGTH,
        projection_dim=16 if projection else 512,
        **ids,
        **size,
    )


def t5_encoder(vocab_size: int, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4)
    return T5EncoderModel(config)


def vae(scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """A 16-channel VAE, downsampling by 2, without quant convs, as SD3's and Flux's."""
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=16,
        norm_num_groups=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )


def save_tiny_sd3(folder: Path, t5: bool = True) -> Path:
    """A tiny StableDiffusion3Pipeline (16x16 pixels, 8x8x16 latents, patch 2) saved into ``folder``; without
    ``t5``, text_encoder_3 and tokenizer_3 are None, as the pipeline allows."""
    from transformers import CLIPTextModelWithProjection

    tokenizer, tokenizer_3 = clip_tokenizer(), t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=32,
            caption_projection_dim=16,
            pooled_projection_dim=32,
            pos_embed_max_size=16,
        )
        text = CLIPTextModelWithProjection(clip_config(len(tokenizer), True))
        text_2 = CLIPTextModelWithProjection(clip_config(len(tokenizer), True))
        text_3 = t5_encoder(len(tokenizer_3)) if t5 else None
        autoencoder = vae(1.5305, 0.0609)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
        vae=autoencoder,
        text_encoder=text,
        tokenizer=tokenizer,
        text_encoder_2=text_2,
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=text_3,
        tokenizer_3=tokenizer_3 if t5 else None,
    )
    pipe.save_pretrained(folder)
    return folder


def save_tiny_flux(folder: Path, guidance_embeds: bool = True) -> Path:
    """A tiny FluxPipeline (latents 16 channels, packed 2x2 into 64) saved into ``folder``: like Flux.1-dev with
    ``guidance_embeds``, like Flux.1-schnell without."""
    from transformers import CLIPTextModel

    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=16,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 4, 8),
        )
        text = CLIPTextModel(clip_config(len(tokenizer), False))
        text_2 = t5_encoder(len(tokenizer_2))
        autoencoder = vae(0.3611, 0.1159)
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=autoencoder,
        text_encoder=text,
        tokenizer=tokenizer,
        text_encoder_2=text_2,
        tokenizer_2=tokenizer_2,
    )
    pipe.save_pretrained(folder)
    return folder
