"""SDXL- and Flux-sized networks at 1024 px, random weights, no download: the part ``large`` of benchmarks/gpu.py.

Each network is built from its published config (``sdxl-base-unet.json``: SDXL base 1.0's UNet2DConditionModel;
``flux-dev-transformer.json``: FLUX.1-dev's FluxTransformer2DModel) directly on the device in bf16, and called with
random condition tensors of the pipelines' shapes (SDXL: 77 text tokens of width 2048, pooled text embeddings and the
six size ids of its text_time conditioning; Flux: 512 T5 tokens, pooled CLIP embeddings, the position ids of its
packed 2x2 latents and the guidance embedding). For each: seconds per network call and peak memory
(``torch.cuda.max_memory_allocated``) at batch 1 and 4, and seconds per step of a 28-step batch-1 run through
diffexp's loop (``iter_steps``) with the pipeline's diffusers scheduler (SDXL: Euler; Flux: FlowMatch Euler with its
resolution shift). ``--smoke`` scales the configs down (``SMOKE``) and runs the same code on the CPU.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
CONFIGS = {"sdxl": HERE / "sdxl-base-unet.json", "flux": HERE / "flux-dev-transformer.json"}
TEXT_TOKENS = {"sdxl": 77, "flux": 512}
PIXELS = 1024
SMOKE = {
    "sdxl": {
        "block_out_channels": [32, 64, 64],
        "attention_head_dim": [2, 4, 4],
        "transformer_layers_per_block": [1, 1, 1],
        "norm_num_groups": 8,
        "cross_attention_dim": 32,
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 32 + 6 * 8,
        "sample_size": 8,
    },
    "flux": {
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,
        "pooled_projection_dim": 32,
        "axes_dims_rope": [4, 4, 8],
    },
}
SMOKE_PIXELS, SMOKE_TOKENS = 64, 8


def build(name: str, smoke: bool, device: torch.device) -> torch.nn.Module:
    """The network of ``name`` with random weights (seed 0), made on ``device`` in bf16 (no float32 copy)."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    cls = UNet2DConditionModel if name == "sdxl" else FluxTransformer2DModel
    config = json.loads(CONFIGS[name].read_text()) | (SMOKE[name] if smoke else {})
    default = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(torch.bfloat16)
        with torch.device(device):
            network = cls.from_config(config)
    finally:
        torch.set_default_dtype(default)
    return network.eval().requires_grad_(False)


def call_for(name: str, network: torch.nn.Module, batch: int, pixels: int, tokens: int, device: torch.device) -> tuple[
    tuple[int, ...], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
]:  # fmt: skip
    """The latent shape of one call and ``model(x, t)`` with a random condition of the pipeline's shapes bound."""
    config, latent = network.config, pixels // 8
    g = torch.Generator(device).manual_seed(1)
    dtype = torch.bfloat16

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g, device=device, dtype=dtype)

    if name == "sdxl":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        time_ids = torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]] * batch, device=device, dtype=dtype)
        cond = {
            "encoder_hidden_states": rand(batch, tokens, config.cross_attention_dim),
            "added_cond_kwargs": {"text_embeds": rand(batch, pooled), "time_ids": time_ids},
        }

        def sdxl(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return network(x.to(dtype), t.to(device), **cond).sample.float()

        return (config.in_channels, latent, latent), sdxl
    side = latent // 2  # Flux packs 2x2 latent patches into one token
    ids = torch.zeros(side, side, 3)
    ids[..., 1], ids[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None, :]
    cond = {
        "encoder_hidden_states": rand(batch, tokens, config.joint_attention_dim),
        "pooled_projections": rand(batch, config.pooled_projection_dim),
        "img_ids": ids.reshape(-1, 3).to(device, dtype),
        "txt_ids": torch.zeros(tokens, 3, device=device, dtype=dtype),
        "guidance": torch.full((batch,), 3.5, device=device, dtype=torch.float32),
    }

    def flux(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        timestep = (t.to(device, torch.float32) / 1000).expand(x.shape[0])  # FluxPipeline's timestep / 1000
        return network(x.to(dtype), timestep=timestep, **cond).sample.float()

    flux.prediction_type = "flow_prediction"  # type: ignore[attr-defined]
    return (side * side, config.in_channels), flux


def scheduler_for(name: str, tokens: int) -> tuple[Any, dict[str, Any]]:
    """The pipeline's scheduler and its set_timesteps arguments (Flux: the resolution shift mu)."""
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    if name == "sdxl":
        config = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
        return EulerDiscreteScheduler(**config, timestep_spacing="leading"), {}
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    c = scheduler.config  # mu: FluxPipeline's calculate_shift, linear in the image's token count
    slope = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
    return scheduler, {"mu": c.base_shift + slope * (tokens - c.base_image_seq_len)}


def forward(model: Callable[..., torch.Tensor], x: torch.Tensor, device: torch.device, repeats: int) -> float:
    from diffexp.sampling.device import synchronize

    t = torch.tensor(500)
    with torch.inference_mode():
        model(x, t)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            model(x, t)
        synchronize(device)
    return (time.perf_counter() - start) / repeats


def measure_model(name: str, smoke: bool, device: torch.device, repeats: int, steps: int) -> dict[str, Any]:
    """Seconds per call and peak memory at batch 1 and 4, and seconds per step of a batch-1 run of ``steps``."""
    from diffexp.sampling.device import peak_memory_mb, reset_peak_memory, synchronize
    from diffexp.sampling.loop import iter_steps, sample

    start = time.perf_counter()
    network = build(name, smoke, device)
    synchronize(device)
    row: dict[str, Any] = {"class": type(network).__name__, "build_s": time.perf_counter() - start}
    row["params_m"] = sum(p.numel() for p in network.parameters()) / 1e6
    pixels, tokens = (SMOKE_PIXELS, SMOKE_TOKENS) if smoke else (PIXELS, TEXT_TOKENS[name])
    row |= {"pixels": pixels, "text_tokens": tokens, "precision": "bf16"}
    for batch in (1, 4):
        shape, model = call_for(name, network, batch, pixels, tokens, device)
        x = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(0)).to(device)
        reset_peak_memory(device)
        row[f"call_b{batch}_s"] = forward(model, x, device, repeats)
        row[f"peak_mem_b{batch}_mb"] = peak_memory_mb(device)
        row["latent_shape"] = list(shape)
    shape, model = call_for(name, network, 1, pixels, tokens, device)
    scheduler, kwargs = scheduler_for(name, shape[0] if name == "flux" else 0)
    noise = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        final = sample(iter_steps(model, scheduler, noise, steps, log_every=steps, timesteps_kwargs=kwargs))
    row[f"run_{steps}_steps_b1_s_per_step"] = final.elapsed_s / final.nfe
    row["finite"] = bool(torch.isfinite(final.x).all())
    del network, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def measure_large(smoke: bool, device: torch.device, budget_s: float, out: Callable[[dict[str, Any]], None]) -> dict[
    str, Any
]:  # fmt: skip
    """Both networks, each started only while the part's time budget lasts; ``out`` writes after each."""
    result: dict[str, Any] = {"budget_s": budget_s, "models": {}}
    began = time.perf_counter()
    for name in CONFIGS:
        if time.perf_counter() - began > budget_s:
            result["models"][name] = {"skipped": f"the part's time budget ({budget_s:g} s) was spent"}
            continue
        result["models"][name] = measure_model(name, smoke, device, 1 if smoke else 3, 3 if smoke else 28)
        out(result)
    return result


def table(result: dict[str, Any]) -> str:
    lines = ["| network | params M | call b1 s | call b4 s | peak b1 GiB | peak b4 GiB | run b1 s/step |"]
    lines.append("|---|---|---|---|---|---|---|")
    for name, row in result["models"].items():
        if "skipped" in row:
            lines.append(f"| {name} | {row['skipped']} |||||")
            continue
        per_step = next(v for k, v in row.items() if k.startswith("run_"))
        cells = [row["params_m"], row["call_b1_s"], row["call_b4_s"], row["peak_mem_b1_mb"] / 1024]
        cells += [row["peak_mem_b4_mb"] / 1024, per_step]
        lines.append(f"| {name} ({row['class']}) | " + " | ".join(f"{v:.4g}" for v in cells) + " |")
    return "\n".join(lines)
