"""What a run records: the scalars of each snapshot and the summary of a finished run (metrics.json)."""

from __future__ import annotations

import platform
from dataclasses import asdict
from typing import Any

import diffusers
import torch

from diffexp.metrics.base import Key
from diffexp.sampling.device import device_name, peak_memory_mb
from diffexp.sampling.experiment import Experiment
from diffexp.sampling.loop import StepState

STEP_AXES = ("step", "nfe", "net_evals")  # the x-axes of per-snapshot charts: sampling step and model calls

# Every scalar of a snapshot's record (steps.jsonl, W&B history), in order; a direction marks a convergence curve.
SNAPSHOT_KEYS: tuple[Key, ...] = (
    *(Key(n, when="snapshot") for n in ("index", "step", "num_steps", "nfe", "net_evals", "timestep", "sigma")),
    Key("elapsed_s", when="snapshot"),
    *(Key(f"{v}_{stat}", when="snapshot") for v in ("x", "x0") for stat in ("mean", "std", "min", "max")),
    Key("x0_change", "lower", "snapshot"),  # RMS change of x0 since the previous snapshot: lower is converged
    Key("step_s", when="snapshot"),
)

# The cost in metrics.json (and the W&B summary): what quality is plotted against (``COST_AXES``), and the rest.
COST_AXES: tuple[Key, ...] = (Key("nfe", "lower"), Key("wall_s", "lower"), Key("net_evals", "lower"))
COST_KEYS: tuple[Key, ...] = (
    Key("images_per_s", "higher"),
    Key("peak_mem_mb", "lower"),
    Key("load_s", "lower"),
    Key("compile_s", "lower"),  # only from runs that compile the model
    Key("startup_s", "lower"),  # process start to the first model call (the first run of a process)
    Key("decode_s", "lower"),  # only from runs that decode latents
)


def snapshot_record(state: StepState, previous: StepState | None, index: int) -> dict[str, Any]:
    """The scalars of one snapshot (``SNAPSHOT_KEYS``, in that order), computed once for every observer."""
    record: dict[str, Any] = {
        "index": index,
        "step": state.step,
        "num_steps": state.num_steps,
        "nfe": state.nfe,
        "net_evals": state.net_evals,
        "timestep": state.timestep,
        "sigma": state.sigma,
        "elapsed_s": state.elapsed_s,
    }
    for name, v in (("x", state.x), ("x0", state.x0)):
        v = v.float()
        record |= {
            f"{name}_mean": v.mean().item(),
            f"{name}_std": v.std().item(),
            f"{name}_min": v.min().item(),
            f"{name}_max": v.max().item(),
        }
    if previous is not None:
        record["x0_change"] = (state.x0.float() - previous.x0.float()).pow(2).mean().sqrt().item()
        record["step_s"] = (state.elapsed_s - previous.elapsed_s) / max(state.step - previous.step, 1)
    else:
        record["x0_change"] = None
        record["step_s"] = state.elapsed_s / max(state.step, 1)
    return {k.name: record[k.name] for k in SNAPSHOT_KEYS}


def environment(device: torch.device) -> dict[str, Any]:
    return {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }


def latent_record(exp: Experiment) -> dict[str, Any] | None:
    """A latent model's prompts, size, VAE and preview; None for a pixel model."""
    latent = exp.loaded.latent
    if latent is None:
        return None
    vae = latent.vae.config
    ids = getattr(exp.model, "time_ids", None)  # SDXL: original size, crop corner, target size
    return {
        **({} if ids is None else {"time_ids": [int(v) for v in ids[0].tolist()]}),
        "kind": latent.kind,
        "prompts": exp.prompts,
        "negative_prompt": exp.run.config["negative_prompt"],
        "height": latent.size[0] * latent.scale,
        "width": latent.size[1] * latent.scale,
        "latent_shape": list(exp.loaded.sample_shape),
        "vae": {"class": type(latent.vae).__name__, "scaling_factor": vae.scaling_factor},
        "vae_shift_factor": getattr(vae, "shift_factor", None),
        "preview": exp.run.preview.value,
    }


def speed_record(exp: Experiment) -> dict[str, Any]:
    """channels_last, compile (mode or None), the attention processors; compile_s and compile_reused only from
    runs that compile."""
    record = asdict(exp.speed)
    record.pop("precision")
    if exp.speed.compile is None:
        del record["compile_s"], record["compile_reused"]
    if exp.speed.graph == "none":
        del record["capture_s"]
    return record


def run_summary(exp: Experiment, cost: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    """Cost, settings and versions of a finished run; the metrics add their values to it. ``cost`` sums every
    chunk's: ``wall_s`` is sampling time (over all processes), a latent model's ``decode_s`` its decodes, apart."""
    run = exp.run
    decode_s = cost["decode_s"]
    decoding = {  # latent models only: decoding cost, as a share of sampling + decoding
        "decode_s": decode_s,
        "decode_share": decode_s / (cost["sampling_s"] + decode_s) if decode_s else 0.0,
        "latent": latent_record(exp),
    }
    cached = exp.model.cache
    caching = {"net_evals_nominal": cost.get("net_evals_nominal"), "cache": cached.record} if cached else {}
    return {
        **(decoding if exp.loaded.latent is not None else {}),
        **caching,
        "status": "finished",
        "label": exp.label,
        "steps": run.steps,
        "nfe": cost["nfe"],
        "net_evals": cost["net_evals"],  # network evaluations per sample: a guided call counts two
        "wall_s": cost["sampling_s"],
        "images_per_s": exp.num_samples / cost["sampling_s"],  # per process
        "load_s": exp.loaded.load_s,
        "peak_mem_mb": peak_memory_mb(exp.device),
        "batch_size": run.batch_size,
        "num_samples": exp.num_samples,
        "chunks": len(exp.chunks()),
        "world_size": cost["world_size"],
        "run_s": cost["run_s"],  # from the first chunk to the last, all processes together
        "seed": run.seed,
        "precision": run.precision.value,
        **speed_record(exp),
        "model": {"name": exp.loaded.name, "id": exp.loaded.id, "revision": exp.loaded.revision},
        "scheduler": exp.built.effective_config(),
        "scheduler_name": exp.built.name,
        "scheduler_options": exp.built.options,
        "prediction_type": exp.loaded.prediction_type,
        "labels": exp.labels,  # the first chunk's
        "guidance": run.guidance.record,
        "cache_name": run.cache.label,
        "warnings": exp.built.warnings,
        **env,
    }
