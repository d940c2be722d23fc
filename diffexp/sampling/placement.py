"""A schedule placed on a model and a sampler: the noise levels a run actually uses.

``schedule_sigmas`` turns a ``ScheduleConfig`` into decreasing noise levels on the model's own sigma scale (its
range, its discrete table, a published table or the values given), ending in 0. ``diffusers_timesteps`` hands
them to a diffusers scheduler the way its file declares (``takes: sigmas | timesteps``), or refuses a scheduler
that takes neither: a schedule is never ignored silently.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import TYPE_CHECKING, Any

import torch

from diffexp.catalog import SchedulerSpec
from diffexp.config import RunConfig, ScheduleConfig
from diffexp.errors import DiffexpError
from diffexp.sampling import schedules
from diffexp.sampling.flow import flow_warnings, is_flow
from diffexp.sampling.ksampler import RANGE_ONLY, KSampler, check_options
from diffexp.sampling.noise import NoiseSchedule
from diffexp.sampling.schedulers import BuiltScheduler, build_scheduler
from diffexp.schedule_config import AYS_NAMES

if TYPE_CHECKING:
    from diffexp.sampling.models import LoadedModel
    from diffexp.settings import RunSettings


def schedule_sigmas(
    plan: ScheduleConfig, steps: int, noise: NoiseSchedule, model_name: str, model_ays: str | None
) -> torch.Tensor:
    """The noise levels of ``plan`` at ``steps`` steps for a model with discrete schedule ``noise``: float64,
    decreasing, ending in 0."""
    table = schedules.model_table(noise.alphas_cumprod)
    lo = plan.sigma_min if plan.sigma_min is not None else float(table[0])
    hi = plan.sigma_max if plan.sigma_max is not None else float(table[-1])
    name = plan.name
    if name == "karras":
        return schedules.karras(steps, lo, hi, plan.rho)
    if name == "exponential":
        return schedules.exponential(steps, lo, hi)
    if name == "polyexponential":
        return schedules.polyexponential(steps, lo, hi, plan.rho)
    if name == "kl_optimal":
        return schedules.kl_optimal(steps, lo, hi)
    if name == "linear_quadratic":
        return schedules.linear_quadratic(steps, hi, plan.threshold_noise, plan.linear_steps)
    if name in ("simple", "sgm_uniform", "ddim_uniform", "normal"):
        return getattr(schedules, name)(steps, table)
    if name == "beta":
        return schedules.beta(steps, table, plan.alpha, plan.beta)
    if name == "ays":
        chosen = plan.table or model_ays
        if chosen is None:
            published = ", ".join(f"{k} ({v})" for k, v in AYS_NAMES.items())
            raise DiffexpError(
                f"schedule=ays: Align Your Steps has no published table for {model_name}; tables exist for "
                f"{published}. Set schedule.table=<name> to use one knowingly, or choose another schedule."
            )
        return schedules.ays(steps, chosen)
    if name == "custom":
        return custom_sigmas(plan, noise)
    raise DiffexpError(f"schedule={name} has no noise levels of its own here.")


def custom_sigmas(plan: ScheduleConfig, noise: NoiseSchedule) -> torch.Tensor:
    """schedule.sigmas with a final 0, or schedule.timesteps read on the model's table (checked against its range)."""
    if plan.sigmas is not None:
        values = torch.tensor([float(v) for v in plan.sigmas], dtype=torch.float64)
        return values if float(values[-1]) == 0 else torch.cat([values, values.new_zeros(1)])
    assert plan.timesteps is not None
    top = len(noise.alphas_cumprod) - 1
    if max(plan.timesteps) > top or min(plan.timesteps) < 0:
        raise DiffexpError(
            f"schedule.timesteps={list(plan.timesteps)} leave the model's range: its training timesteps are 0..{top}."
        )
    values = noise.sigma_at(torch.tensor([float(t) for t in plan.timesteps], dtype=torch.float64))
    return torch.cat([values.double(), torch.zeros(1, dtype=torch.float64)])


def refuse_untaken(spec: SchedulerSpec, plan: ScheduleConfig) -> None:
    """A schedule other than the scheduler's own on a scheduler that takes none: refused, with the reason."""
    if not plan.is_default and spec.takes is None:
        what = f"{spec.diffusers_class}.set_timesteps" if not spec.is_k else f"k-diffusion's {spec.function}"
        raise DiffexpError(
            f"schedule={plan.name} cannot apply to scheduler '{spec.name}': {what} takes no explicit noise levels "
            f"or timesteps (configs/scheduler/{spec.name}.yaml, takes: null), and diffexp never ignores a schedule. "
            "Schedulers that take one declare takes: sigmas or timesteps (euler, heun, ddpm, dpmsolver, "
            "dpmsolver-single and the k-* samplers but k-dpm-fast and k-dpm-adaptive)."
        )


def diffusers_timesteps(
    spec: SchedulerSpec, plan: ScheduleConfig, sigmas: torch.Tensor, noise: NoiseSchedule
) -> dict[str, Any]:
    """The ``set_timesteps`` arguments that place ``sigmas`` on a diffusers scheduler, as its file declares:
    the noise levels themselves, or the training timesteps nearest them (a repeat refused)."""
    refuse_untaken(spec, plan)
    if spec.takes == "sigmas":
        return {"sigmas": sigmas.tolist()}
    if plan.name == "custom" and plan.timesteps is not None:
        given = [float(t) for t in plan.timesteps]
        if any(t != round(t) for t in given):
            raise DiffexpError(f"schedule.timesteps={given}: {spec.diffusers_class} takes whole training timesteps.")
        return {"timesteps": [int(t) for t in given]}
    positive = sigmas[sigmas > 0]
    timesteps = [round(float(noise.timestep_at(float(s)))) for s in positive]
    repeats = sorted({t for t, u in itertools.pairwise(timesteps) if t == u})
    if repeats:
        raise DiffexpError(
            f"schedule={plan.name} at {len(positive)} steps on {spec.diffusers_class}, which takes whole training "
            f"timesteps: several noise levels fall on timestep(s) {repeats}. Use fewer steps, or a scheduler that "
            "takes noise levels (euler, the k-* samplers)."
        )
    return {"timesteps": timesteps}


def build_for(run: RunSettings, loaded: LoadedModel) -> BuiltScheduler:
    """The run's scheduler (diffusers') or sampler (k-diffusion's) with its schedule placed, or a refusal."""
    spec, plan = run.scheduler, run.schedule
    node = dataclasses.asdict(plan)
    if spec.is_k:
        return build_k(run, loaded)
    flow = is_flow(loaded.scheduler_config)
    built = build_scheduler(spec, loaded.scheduler_config, seed=run.seed, sample_shape=loaded.sample_shape)
    built.schedule = node
    if flow and not plan.is_default:
        raise DiffexpError(
            f"schedule={plan.name} places noise levels on a variance-preserving schedule; {loaded.name} is a "
            "flow-matching model, whose noise levels its scheduler's shift sets (scheduler.shift, "
            "scheduler.use_dynamic_shifting). Leave schedule at default."
        )
    if loaded.latent is not None:  # the noise levels the model's pipeline passes (Flux's)
        built.timesteps_kwargs |= loaded.latent.timesteps_kwargs(built.scheduler, run.steps)
    if not plan.is_default:
        noise = NoiseSchedule(built.scheduler.alphas_cumprod.cpu())
        sigmas = schedule_sigmas(plan, run.steps, noise, loaded.name, run.model.ays)
        built.timesteps_kwargs = diffusers_timesteps(spec, plan, sigmas, noise)
    try:
        built.set_timesteps(run.steps, device="cpu")  # checks the step count (and the schedule) before any output
    except (ValueError, IndexError) as err:
        raise DiffexpError(
            f"Scheduler '{spec.name}' cannot run {run.steps} steps ({plan.name} schedule): {err}"
        ) from None
    if flow:
        built.warnings.extend(flow_warnings(built.scheduler))
    return built


def build_k(run: RunSettings, loaded: LoadedModel) -> BuiltScheduler:
    """A k-diffusion sampler: karras on the model's range unless the schedule group says otherwise; the carrier
    scheduler (diffusers' Euler on the same noise levels) holds the model's table and timesteps."""
    spec, plan = run.scheduler, run.schedule
    assert spec.function is not None
    if spec.function == "sample_dpm_adaptive" and run.steps != RunConfig.steps:
        raise DiffexpError(
            f"scheduler={spec.name} chooses its own steps (rtol, atol), so steps={run.steps} cannot apply; leave "
            f"steps unset (its default, {RunConfig.steps}, counts as unset) and read its NFE from the run."
        )
    if spec.function in RANGE_ONLY:
        refuse_untaken(spec, plan)
    options = check_options(spec.name, spec.function, dict(spec.options))
    if spec.prediction_types and loaded.prediction_type not in spec.prediction_types:
        raise DiffexpError(f"Scheduler '{spec.name}' cannot sample a model that predicts {loaded.prediction_type}.")
    if is_flow(loaded.scheduler_config):
        return build_k_flow(run, loaded, options)
    carrier = build_scheduler("euler", loaded.scheduler_config, seed=run.seed)
    noise = NoiseSchedule(carrier.scheduler.alphas_cumprod.cpu())
    karras = ScheduleConfig("karras", plan.sigma_min, plan.sigma_max)
    chosen = karras if plan.is_default or spec.function in RANGE_ONLY else plan
    sigmas = schedule_sigmas(chosen, run.steps, noise, loaded.name, run.model.ays)
    steps = int((sigmas > 0).sum())
    carrier.timesteps_kwargs = {"sigmas": sigmas.tolist()}
    carrier.set_timesteps(steps, device="cpu")
    carrier.schedule = dataclasses.asdict(chosen) | {"requested": plan.name}
    carrier.spec = spec
    carrier.step_kwargs = {}
    carrier.warnings = []
    carrier.sampler = KSampler(spec.function, options, sigmas, steps, spec.stochastic)
    return carrier


def build_k_flow(run: RunSettings, loaded: LoadedModel, options: dict[str, Any]) -> BuiltScheduler:
    """A k-diffusion sampler on a flow model: sigma in [0, 1] on the flow path (ComfyUI's CONST), the noise levels
    of flow-euler (the model's shift, dynamic where its config says). Deterministic samplers only: k-diffusion's
    ancestral and SDE steps add noise as x0 + sigma eps, which leaves the flow path (ComfyUI rewrites them)."""
    spec, plan = run.scheduler, run.schedule
    if spec.stochastic or spec.function in RANGE_ONLY:
        raise DiffexpError(
            f"scheduler={spec.name} cannot sample the flow model {loaded.name}: k-diffusion's "
            + ("ancestral and SDE steps add noise as x0 + sigma eps (variance exploding), which leaves the flow "
               "path x = (1 - sigma) x0 + sigma eps" if spec.stochastic else
               "adaptive and fast DPM samplers take a variance-exploding sigma range")
            + ". Use k-euler, k-heun, k-dpm2, k-lms or k-dpmpp-2m, or a flow scheduler (flow-euler, flow-heun)."
        )  # fmt: skip
    if not plan.is_default:
        raise DiffexpError(
            f"schedule={plan.name} places noise levels on a variance-preserving schedule; {loaded.name} is a "
            "flow-matching model, whose noise levels the shift sets. Leave schedule at default."
        )
    carrier = build_scheduler("flow-euler", loaded.scheduler_config, seed=run.seed, sample_shape=loaded.sample_shape)
    carrier.set_timesteps(run.steps, device="cpu")
    sigmas = carrier.scheduler.sigmas.double().cpu()
    carrier.schedule = {"name": "flow-shift", "requested": plan.name}
    carrier.spec = spec
    carrier.step_kwargs = {}
    carrier.warnings = []
    carrier.sampler = KSampler(spec.function, options, sigmas, run.steps, spec.stochastic)
    return carrier
