"""The sampling loop: one contract for every diffusers scheduler.

``iter_steps`` is the book's loop made right for every scheduler (fresh ``set_timesteps``, ``init_noise_sigma``,
``scale_model_input``, several model calls per step, stochastic steps) and yields a ``StepState`` after each
model call. ``sample`` runs it to the end and hands each state to a callback, so logging never touches the maths.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import PNDMScheduler
from diffusers.utils.torch_utils import randn_tensor

from diffexp.errors import NonFiniteError
from diffexp.sampling.device import synchronize
from diffexp.sampling.noise import log_sigmas, sigma_at
from diffexp.sampling.parameterisation import x0_from_output


@dataclass
class StepState:
    """What the loop knows after one model call; x and x0 are the loop's own tensors, never to be modified."""

    nfe: int  # model calls so far
    net_evals: int  # network evaluations per sample so far: a guided call counts two
    step: int  # full steps completed (a second-order step counts once)
    num_steps: int
    timestep: float  # the timestep the model was called at
    sigma: float  # its noise level, sqrt((1 - alpha_bar) / alpha_bar)
    x: torch.Tensor  # the sample after this call
    x0: torch.Tensor  # the predicted clean image at this call
    full_step: bool  # a full step ended here
    snapshot: bool  # a full step on the log_every grid, or the last call
    last: bool
    elapsed_s: float  # sampling time so far, callbacks excluded; exact at snapshots (the device synchronised)
    call_s: float  # this call's host time; at a snapshot, the mean time per call since the previous snapshot
    # x and x0 as images at a snapshot of a latent model (decoded or previewed; set by the runner, which times it)
    x_image: torch.Tensor | None = None
    x0_image: torch.Tensor | None = None

    @property
    def x_pixels(self) -> torch.Tensor:
        """x as an image: x itself for a pixel model, its decoded latents for a latent model."""
        return self.x if self.x_image is None else self.x_image

    @property
    def x0_pixels(self) -> torch.Tensor:
        return self.x0 if self.x0_image is None else self.x0_image


def initial_noise(
    shape: Sequence[int], seed: int, batch_size: int, device: torch.device, first: int = 0
) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Sample k's noise comes from its own CPU generator seeded ``seed + k``: the same whatever the batch, chunk,
    process or device. Samples ``first .. first + batch_size - 1``.

    Returns the noise on ``device`` and the generators, which then drive every stochastic step.
    """
    generators = [torch.Generator("cpu").manual_seed(seed + k) for k in range(first, first + batch_size)]
    noise = randn_tensor((batch_size, *shape), generator=generators, device=torch.device("cpu"), dtype=torch.float32)
    return noise.to(device), generators


def predicted_x0(
    scheduler: Any, out: Any, x: torch.Tensor, output: torch.Tensor, t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """x0 as the scheduler sees it: its own ``pred_original_sample``, else derived from the model output in the
    scheduler's own variables, for the model's prediction type."""
    x0 = getattr(out, "pred_original_sample", None)
    if x0 is not None:
        return x0
    if is_flow_matching(scheduler):  # FlowMatch Euler, Heun: the call's sigma is t / num_train_timesteps
        return x0_from_output(output, x, None, t / scheduler.config.num_train_timesteps, prediction_type)
    if hasattr(scheduler, "_sigma_to_alpha_sigma_t"):
        # DPM-Solver, DEIS, UniPC, SA-Solver: VP space, alpha_t = 1/sqrt(1+sigma^2); step_index has advanced
        alpha_t, sigma_t = scheduler._sigma_to_alpha_sigma_t(scheduler.sigmas[scheduler.step_index - 1])
    elif isinstance(scheduler, PNDMScheduler):
        # integer timesteps: alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)
        abar = scheduler.alphas_cumprod[int(t)]
        alpha_t, sigma_t = abar.sqrt(), (1 - abar).sqrt()
    else:
        raise NotImplementedError(f"no x0 rule for {type(scheduler).__name__}")
    # CPU scalars: they scale device tensors without a copy, so without waiting for the device
    return x0_from_output(output, x, alpha_t, sigma_t, prediction_type)


def completed_full_step(scheduler: Any) -> bool:
    """Whether the call just made ended a full step (Heun, KDPM2, PNDM make several calls per step)."""
    if hasattr(scheduler, "state_in_first_order"):  # second order: the correction call ends the step
        return bool(scheduler.state_in_first_order)
    if isinstance(scheduler, PNDMScheduler):
        if scheduler.config.skip_prk_steps:
            return scheduler.counter != 1  # call 0 is a provisional Euler step, call 1 redoes it
        warmup = len(scheduler.prk_timesteps)  # Runge-Kutta warm-up: four calls per step
        return scheduler.counter > warmup or scheduler.counter % 4 == 0
    return True


def set_schedule(
    scheduler: Any, num_steps: int, device: torch.device, timesteps_kwargs: dict[str, Any] | None = None
) -> tuple[torch.Tensor, list[float]]:
    """Fresh timesteps and internal state for a run: an explicit schedule, or the steps (and a flow model's mu).
    Returns the schedule on the host, read once per run (the scheduler and the model get CPU timesteps: no device
    reads), and the noise level of every timestep on the model's own schedule."""
    kwargs = dict(timesteps_kwargs or {})
    if "timesteps" in kwargs or "sigmas" in kwargs:
        scheduler.set_timesteps(device=device, **kwargs)
    else:
        scheduler.set_timesteps(num_steps, device=device, **kwargs)
    timesteps = scheduler.timesteps.cpu()
    sigmas = call_sigmas(scheduler, timesteps)
    set_begin_index(scheduler, timesteps)
    return timesteps, sigmas


def iter_steps(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler: Any,
    noise: torch.Tensor,
    num_steps: int,
    generators: list[torch.Generator] | None = None,
    step_kwargs: dict[str, Any] | None = None,
    log_every: int = 10,
    timesteps_kwargs: dict[str, Any] | None = None,
) -> Iterator[StepState]:
    """Sample from ``noise`` (unit variance) with ``num_steps`` steps, yielding after every model call.

    ``model(x, t)`` returns the model's output in its ``prediction_type`` (epsilon, v or sample; default
    epsilon): an adapter (``diffexp.sampling.adapters``) binds a network's condition and guidance, and counts
    calls and network evaluations. ``t`` is the schedule's timestep as a CPU scalar tensor, as the scheduler gets
    it; an adapter moves it to the device without waiting.

    The loop never waits for the device between snapshots (``Watch``). Time spent by the consumer between yields
    is not counted. ``timesteps_kwargs``: an explicit schedule (``sigmas=`` or ``timesteps=``) instead of
    ``num_steps``'s own.
    """
    device = noise.device
    timesteps, sigmas = set_schedule(scheduler, num_steps, device, timesteps_kwargs)
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)  # read after set_timesteps: it depends on the sigmas
    kwargs = dict(step_kwargs or {})
    if generators is not None and "generator" in inspect.signature(scheduler.step).parameters:
        kwargs["generator"] = generators  # one generator per sample, as for the initial noise
    if generators is not None and hasattr(scheduler, "noise_sampler_seed"):
        scheduler.noise_sampler_seed = [g.initial_seed() for g in generators]  # DPMSolverSDE: a Brownian tree each
    prediction_type = getattr(model, "prediction_type", "epsilon")
    watch = Watch(device, timesteps)
    step = 0
    for i, (t, t_value) in enumerate(zip(timesteps, timesteps.tolist(), strict=True)):
        watch.start()
        # 1. the model predicts noise, v or x0 from the scaled input (Euler-family: x / sqrt(sigma^2 + 1))
        output = model(scale_model_input(scheduler, x, t), t)
        # 2. the scheduler moves x towards t_prev
        out = scheduler.step(output, t, x, **kwargs)
        x0 = predicted_x0(scheduler, out, x, output, t, prediction_type)
        x = out.prev_sample
        # 3. where the call stands: a full step ends here (second-order schedulers: after the correction)
        last = i == len(timesteps) - 1
        full = completed_full_step(scheduler) or last
        step += int(full)
        snapshot = last or (full and step % log_every == 0)
        elapsed_s, call_s = watch.end(x, x0, output, step if full else step + 1, snapshot)
        yield StepState(
            nfe=i + 1,
            step=step,
            num_steps=num_steps,
            timestep=t_value,
            sigma=sigmas[i],
            x=x,
            x0=x0,
            full_step=full,
            snapshot=snapshot,
            net_evals=getattr(model, "net_evals", i + 1),
            last=last,
            elapsed_s=elapsed_s,
            call_s=call_s,
        )


class Watch:
    """The loop's bookkeeping, kept out of its maths: the clock, and the non-finite check.

    Each call's x, x0 and model output are summed on the device (a sum is finite exactly when every value is);
    the sums are read, with one synchronisation, at each snapshot and at the end, so a non-finite value is still
    traced to its first call without waiting for the device in between. ``elapsed_s`` is exact at snapshots; a
    call's ``call_s`` is the host's time for it, and at a snapshot the mean time per call since the previous one.
    """

    def __init__(self, device: torch.device, timesteps: torch.Tensor) -> None:
        self.device, self.timesteps = device, timesteps
        self.total = finite_sum_dtype(device)
        self.sums: list[torch.Tensor] = []  # x, x0 and the output of each call since the last check, summed
        self.reported_steps: list[int] = []  # the step each call belongs to, for the error message
        self.calls, self.since, self.elapsed, self.at_snapshot = 0, 0, 0.0, 0.0
        self.started = 0.0

    def start(self) -> None:
        self.started = time.perf_counter()

    def end(
        self, x: torch.Tensor, x0: torch.Tensor, output: torch.Tensor, step: int, snapshot: bool
    ) -> tuple[float, float]:
        """Record a call; at a snapshot, wait for the device and check the sums. Returns (elapsed_s, call_s)."""
        self.sums += (x.sum(dtype=self.total), x0.sum(dtype=self.total), output.sum(dtype=self.total))
        self.reported_steps.append(step)
        self.calls += 1
        self.since += 1
        if snapshot:  # the one synchronisation between snapshots: the sums and the clock
            synchronize(self.device)
            sums = torch.stack(self.sums).view(-1, 3).cpu()
            check_finite(sums, self.calls - self.since, self.reported_steps, self.timesteps)
            self.sums.clear()
        call_s = time.perf_counter() - self.started
        self.elapsed += call_s
        if snapshot:
            call_s, self.at_snapshot = (self.elapsed - self.at_snapshot) / self.since, self.elapsed
            self.since = 0
        return self.elapsed, call_s


def is_flow_matching(scheduler: Any) -> bool:
    return type(scheduler).__name__.startswith("FlowMatch")


def scale_model_input(scheduler: Any, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The model's input: the scheduler's scaling where it has one (the flow-matching schedulers have none)."""
    return scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x


def call_sigmas(scheduler: Any, timesteps: torch.Tensor) -> list[float]:
    """The noise level of each model call: a flow scheduler's sigma (t / num_train_timesteps, or its own sigmas in
    flow mode, whose network timesteps are rounded), else sqrt((1 - abar) / abar) on the model's schedule."""
    if is_flow_matching(scheduler):
        return (timesteps.double() / scheduler.config.num_train_timesteps).tolist()
    if scheduler.config.get("use_flow_sigmas"):
        return scheduler.sigmas[: len(timesteps)].double().tolist()
    return sigma_at(log_sigmas(scheduler.alphas_cumprod), timesteps).tolist()


def set_begin_index(scheduler: Any, timesteps: torch.Tensor) -> None:
    """Index-based schedulers find their first step in the schedule on the host, as ``_init_step_index`` would
    on the device (a read that waits for it)."""
    if hasattr(scheduler, "set_begin_index") and hasattr(scheduler, "index_for_timestep"):
        scheduler.set_begin_index(scheduler.index_for_timestep(timesteps[0], timesteps))


def finite_sum_dtype(device: torch.device) -> torch.dtype:
    """Sums in float64 cannot overflow from finite float32 (or narrower) values, so they are non-finite exactly
    where a value is; MPS has no float64, and sums there in float32 (values beyond about 1e34 read as overflow)."""
    return torch.float32 if device.type == "mps" else torch.float64


def check_finite(sums: torch.Tensor, first: int, reported_steps: list[int], timesteps: torch.Tensor) -> None:
    """``sums``: x, x0 and the model's output summed, one row per call from call index ``first``. The first bad
    call's input is the last finite x, so a non-finite output there (at a finite time) is the model's fault."""
    bad = ~torch.isfinite(sums)
    if bad[:, :2].any():  # x or x0 (a non-finite output that the step discards is no error)
        row = int(bad[:, :2].any(dim=1).nonzero()[0])
        call = first + row
        what = "sample x" if bad[row, 0] else "predicted x0"
        by_model = bool(bad[row, 2]) and math.isfinite(float(timesteps[call]))
        raise NonFiniteError(reported_steps[call], call + 1, what, by_model)


def sample(states: Iterable[StepState], callback: Callable[[StepState], None] | None = None) -> StepState:
    """Run a loop, ``sample(iter_steps(model, scheduler, noise, steps, ...))``, to its end, handing every state to
    ``callback``; returns the last state."""
    state = None
    for state in states:
        if callback is not None:
            callback(state)
    if state is None:
        raise ValueError("the scheduler produced no timesteps")
    return state
