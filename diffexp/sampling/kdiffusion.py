"""k-diffusion's samplers on every model family, through the adapter's ``denoise(x, sigma)``.

The samplers are k-diffusion's own (``k_diffusion.sampling.sample_*``, loaded by ``diffexp.sampling.kload``); this
module only feeds them: the noise levels (``sigmas``, from the schedule group; karras on the model's range by
default), x = noise * sigma_0, and noise that keeps the seed contract: sample k's ancestral noise comes from its own
generator (seed + k), and the Brownian-tree samplers (DPM++ SDE, 2M SDE, 3M SDE) get one tree per sample, seeded
seed + k (k-diffusion's ``BrownianTreeNoiseSampler`` with a list of seeds).

The loop yields the same ``StepState`` as ``iter_steps``: the sampler runs in a worker thread, and its callback
hands each step to the consumer and waits until the consumer asks for the next (a handshake), so observers and the
progress bar see each step as it happens, never two at once, and sampling time excludes the consumer's. A callback
reports x at sigma_i and D(x, sigma_i); a state is yielded when the next callback (or the end) gives the x after
the step. NFE and network evaluations come from the adapter's counters.

The sampler sees only ``denoise(x, sigma)`` and the noise levels, so a flow model's adapter (sigma in [0, 1],
x = (1 - sigma) x0 + sigma eps, ComfyUI's CONST) plugs in with its own range and ``initial_scale``.
"""

from __future__ import annotations

import inspect
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from diffexp.sampling.kload import k_sampling
from diffexp.sampling.ksampler import BROWNIAN, RANGE_ONLY, KSampler
from diffexp.sampling.loop import StepState, Watch

if TYPE_CHECKING:
    from diffexp.sampling.adapters import Adapter


def noise_sampler(function: str, x: torch.Tensor, sigmas: torch.Tensor, generators: list[torch.Generator]) -> Any:
    """Noise for sample k from its own generator, or its own Brownian tree seeded seed + k."""
    if function in BROWNIAN:
        positive = sigmas[sigmas > 0]
        seeds = [g.initial_seed() for g in generators]
        return k_sampling().BrownianTreeNoiseSampler(x, positive.min(), positive.max(), seed=seeds)

    def draw(_sigma: torch.Tensor, _sigma_next: torch.Tensor) -> torch.Tensor:
        cpu = randn_tensor(tuple(x.shape), generator=generators, device=torch.device("cpu"), dtype=torch.float32)
        return cpu.to(x.device, x.dtype)

    return draw


def run_k_sampler(
    sampler: KSampler,
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    generators: list[torch.Generator],
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> torch.Tensor:
    """Run the k-diffusion function on ``noise`` (unit variance) with ``denoise(x, sigma)``; returns the final x."""
    fn = getattr(k_sampling(), sampler.function)
    sigmas = sampler.sigmas.to(noise.device, torch.float32)
    positive = sigmas[sigmas > 0]
    x = noise * sigmas[0]
    kwargs: dict[str, Any] = {"callback": callback, "disable": True, **sampler.options}
    params = inspect.signature(fn).parameters
    if "noise_sampler" in params:
        kwargs["noise_sampler"] = noise_sampler(sampler.function, x, sigmas, generators)
    if sampler.function in RANGE_ONLY:
        lo, hi = float(positive.min()), float(positive.max())
        if sampler.function == "sample_dpm_fast":
            kwargs["n"] = sampler.steps
        return fn(denoise, x, lo, hi, **kwargs)
    return fn(denoise, x, sigmas, **kwargs)


def iter_k_steps(
    sampler: KSampler, model: Adapter, noise: torch.Tensor, generators: list[torch.Generator], log_every: int = 10
) -> Iterator[StepState]:
    """Sample with a k-diffusion sampler, yielding a ``StepState`` after each of its steps."""
    if sampler.function == "sample_dpm_adaptive" and len(noise) > 1:
        yield from _each_alone(sampler, model, noise, generators, log_every)
        return
    before = [0, 0]  # the adapter's counters before the latest model call

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        before[:] = [model.calls, model.net_evals]
        return model.denoise(x, sigma.reshape(-1)[0])

    lag = sampler.function != "sample_dpm_adaptive"  # its callback's x is already the x after the step
    timesteps: list[float] = []
    watch = Watch(noise.device, timesteps)  # type: ignore[arg-type]
    pending: tuple[dict[str, Any], int, int] | None = None
    step = 0
    stream = _threaded(lambda cb: run_k_sampler(sampler, denoise, noise, generators, cb))
    watch.start()
    for info, final in stream:
        if pending is not None:
            prev, nfe, evals = pending
            last = info is None
            if last:
                nfe, evals = model.calls, model.net_evals
            elif lag:  # this callback's denoised came from one more call
                nfe, evals = before
            x = final if last else (info["x"] if lag else prev["x"])
            step += 1
            sigma = float(prev["sigma"])
            timesteps.append(float(model.schedule.timestep_at(sigma)))
            snapshot = last or step % log_every == 0
            elapsed_s, call_s = watch.end(x, prev["denoised"], prev["denoised"], step, snapshot)
            yield StepState(
                nfe=nfe, net_evals=evals, step=step, num_steps=sampler.steps, timestep=timesteps[-1], sigma=sigma,
                x=x, x0=prev["denoised"], full_step=True, snapshot=snapshot, last=last, elapsed_s=elapsed_s,
                call_s=call_s,
            )  # fmt: skip
            watch.start()
        if info is not None:
            pending = (info, model.calls, model.net_evals)


_STOP = object()


class _Stopped(Exception):
    """The consumer closed the loop early: the worker stops at its next callback."""


def _threaded(run: Callable[[Callable[[dict[str, Any]], None]], torch.Tensor]) -> Iterator[tuple[dict | None, Any]]:
    """Run ``run(callback)`` in a worker thread; yield (callback info, None) for each callback, the worker paused
    until the next item is asked for, then (None, result)."""
    to_consumer: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=1)
    to_worker: queue.Queue[object] = queue.Queue(maxsize=1)

    def callback(info: dict[str, Any]) -> None:
        to_consumer.put(("step", info))
        if to_worker.get() is _STOP:
            raise _Stopped

    def work() -> None:
        try:
            with torch.inference_mode():
                to_consumer.put(("done", run(callback)))
        except _Stopped:
            pass
        except BaseException as err:  # handed to the consumer, raised there
            to_consumer.put(("error", err))

    worker = threading.Thread(target=work, name="k-diffusion", daemon=True)
    worker.start()
    finished = False
    try:
        while True:
            kind, value = to_consumer.get()
            if kind == "error":
                finished = True
                raise value
            if kind == "done":
                finished = True
                yield None, value
                return
            yield value, None
            to_worker.put(True)
    finally:
        if not finished:
            to_worker.put(_STOP)
        worker.join()


def _each_alone(
    sampler: KSampler, model: Adapter, noise: torch.Tensor, generators: list[torch.Generator], log_every: int
) -> Iterator[StepState]:
    """dpm-adaptive sets its step sizes from an error norm over the whole batch, so each sample runs alone (the
    seed contract). Its trajectories are collected, then yielded step by step; a sample that has finished holds
    its final x. Its NFE is the largest of the samples'."""
    runs = []
    started = time.perf_counter()
    for k in range(len(noise)):
        one = model.with_samples(range(model.samples.start + k, model.samples.start + k + 1))
        runs.append(list(iter_k_steps(sampler, one, noise[k : k + 1], generators[k : k + 1], log_every=1)))
    elapsed = time.perf_counter() - started
    length = max(len(r) for r in runs)
    for i in range(length):
        states = [r[min(i, len(r) - 1)] for r in runs]
        last = i == length - 1
        step_elapsed = elapsed * (i + 1) / length
        yield StepState(
            nfe=max(s.nfe for s in states), net_evals=max(s.net_evals for s in states), step=i + 1, num_steps=length,
            timestep=states[0].timestep, sigma=states[0].sigma, x=torch.cat([s.x for s in states]),
            x0=torch.cat([s.x0 for s in states]), full_step=True, snapshot=last or (i + 1) % log_every == 0,
            last=last, elapsed_s=step_elapsed, call_s=elapsed / max(sum(r[-1].nfe for r in runs), 1),
        )  # fmt: skip
