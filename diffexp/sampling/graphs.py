"""``graph=step``: each step of the loop, the network's call and diffusers' own ``scheduler.step``, captured as one
CUDA graph (``torch.cuda.CUDAGraph``) and replayed.

A graph bakes in the host-side values of its recording (the timestep, DDIM's alphas), so each step has its own graph.
The steps are captured in order into one memory pool, where a step's intermediate tensors reuse the previous
step's memory; they are replayed in the same order, which is torch's rule for sharing a pool. Only what a step hands
on stays allocated: its model output, x0 and x, which the next step reads. The steps are captured once per chunk
(its batch shape and condition) and replayed by every run of it; ``capture_s`` records the time, apart from
sampling. Between replays the loop's own bookkeeping runs as in ``iter_steps`` (``Watch``: the clock, the
non-finite sums); x and x0 are copied out of the graph's memory before they are yielded, since the next run's
replay overwrites it.

Which runs can be captured is decided with the settings (``diffexp.graph_settings``). Off CUDA the key is refused;
``capture(..., graphs=False)`` replays the same steps eagerly, so the bookkeeping is tested on the CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from diffexp.errors import DiffexpError
from diffexp.sampling.loop import StepState, Watch, completed_full_step, predicted_x0, scale_model_input, set_schedule

Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # a step's model output, x0 and x


@dataclass(frozen=True, eq=False)
class CapturedStep:
    """One step: its graph (None: replayed eagerly), what it computes, its static outputs and the loop's records."""

    graph: torch.cuda.CUDAGraph | None
    run: Callable[[], Outputs]
    outputs: Outputs
    timestep: float
    sigma: float
    full: bool  # a full step ends here
    calls: int  # the adapter's counts after this step
    net_evals: int

    def replay(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        for static, value in zip(self.outputs, self.run(), strict=True):
            static.copy_(value)


@dataclass(eq=False)
class StepGraphs:
    """The captured steps of one chunk: replayed from the static input ``start`` (the scaled noise)."""

    model: Any  # the adapter they were captured for
    start: torch.Tensor
    init_noise_sigma: Any
    timesteps: torch.Tensor
    steps: list[CapturedStep]
    capture_s: float

    def states(self, noise: torch.Tensor, num_steps: int, log_every: int) -> Iterator[StepState]:
        """The loop's states, as ``iter_steps`` yields them, from a replay of every step."""
        self.start.copy_(noise * self.init_noise_sigma)
        watch, counter, step = Watch(noise.device, self.timesteps), self.model.counter, 0
        for i, captured in enumerate(self.steps):
            watch.start()
            captured.replay()
            counter.calls, counter.net_evals = captured.calls, captured.net_evals
            output, x0, x = captured.outputs
            x, x0 = x.clone(), x0.clone()  # out of the graph's memory, which the next run overwrites
            last = i == len(self.steps) - 1
            step += int(captured.full)
            snapshot = last or (captured.full and step % log_every == 0)
            elapsed_s, call_s = watch.end(x, x0, output, step if captured.full else step + 1, snapshot)
            yield StepState(
                nfe=captured.calls,
                net_evals=captured.net_evals,
                step=step,
                num_steps=num_steps,
                timestep=captured.timestep,
                sigma=captured.sigma,
                x=x,
                x0=x0,
                full_step=captured.full,
                snapshot=snapshot,
                last=last,
                elapsed_s=elapsed_s,
                call_s=call_s,
            )


def capture(
    model: Any,
    scheduler: Any,
    noise: torch.Tensor,
    num_steps: int,
    step_kwargs: dict[str, Any] | None = None,
    timesteps_kwargs: dict[str, Any] | None = None,
    graphs: bool = True,
) -> StepGraphs:
    """Every step of a run of ``model`` (an adapter) and ``scheduler`` from noise shaped like ``noise``, captured as
    CUDA graphs (``graphs=False``: kept as functions, replayed eagerly)."""
    device = noise.device
    timesteps, sigmas = set_schedule(scheduler, num_steps, device, timesteps_kwargs)
    init = getattr(scheduler, "init_noise_sigma", 1.0)
    start, kwargs = noise * init, dict(step_kwargs or {})
    prediction_type = getattr(model, "prediction_type", "epsilon")

    def step_of(x: torch.Tensor, t: torch.Tensor) -> Callable[[], Outputs]:
        t_device = t.to(device)  # the network's timestep, on the device before capture (no copy inside a graph)

        def run() -> Outputs:
            # 1. the model's output at t; 2. diffusers' step towards t_prev
            output = model(scale_model_input(scheduler, x, t), t_device)
            out = scheduler.step(output, t, x, **kwargs)
            return output, predicted_x0(scheduler, out, x, output, t, prediction_type), out.prev_sample

        return run

    began = time.perf_counter()
    if graphs:
        warm_up(step_of(start, timesteps[0]))
    model.counter.reset()
    pool = torch.cuda.graph_pool_handle() if graphs else None
    steps, x = [], start
    for i, t in enumerate(timesteps):
        run = step_of(x, t)
        graph = torch.cuda.CUDAGraph() if graphs else None
        try:
            if graph is not None:
                with torch.cuda.graph(graph, pool=pool):
                    outputs = run()
            else:
                outputs = run()
        except Exception as err:
            raise DiffexpError(
                f"graph=step could not capture step {i + 1} of {type(model.module).__name__} as a CUDA graph "
                f"({type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}). "
                "Use graph=none."
            ) from None
        full = completed_full_step(scheduler) or i == len(timesteps) - 1
        counts = (model.counter.calls, model.counter.net_evals)
        steps.append(CapturedStep(graph, run, outputs, float(t), sigmas[i], full, *counts))
        x = outputs[2]
    if graphs:
        torch.cuda.synchronize(device)
    return StepGraphs(model, start, init, timesteps, steps, time.perf_counter() - began)


def warm_up(run: Callable[[], Outputs]) -> None:
    """One step on a side stream before capturing (torch's rule: libraries set up their handles and workspaces,
    cuDNN autotunes, outside the graph)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)


@dataclass(eq=False)
class GraphCache:
    """The captured steps of the chunk sampled last, kept between its runs (an experiment's, shared by the
    experiments of its other chunks, which capture their own)."""

    captured: list[StepGraphs] = field(default_factory=list)

    def states(
        self, model: Any, built: Any, noise: torch.Tensor, num_steps: int, log_every: int, record: Any
    ) -> Iterator[StepState]:
        held = self.captured[0] if self.captured else None
        if held is None or held.model is not model or held.start.shape != noise.shape:
            self.captured.clear()  # the earlier chunk's graphs and memory, freed first
            held = capture(model, built.scheduler, noise, num_steps, built.step_kwargs, built.timesteps_kwargs)
            self.captured.append(held)
            record.capture_s = (record.capture_s or 0.0) + held.capture_s
        yield from held.states(noise, num_steps, log_every)
