"""graph=step on the CPU: the captured steps' bookkeeping, replayed eagerly, samples exactly what the loop does;
what a CUDA graph cannot capture is refused, with the reason and a non-zero exit. The graphs themselves run in
tests/test_gpu.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import compose, run_main

import diffexp
from diffexp.errors import DiffexpError
from diffexp.sampling.graphs import capture
from diffexp.sampling.loop import iter_steps, sample


def test_replayed_steps_give_the_loops_states_exactly() -> None:
    exp = diffexp.prepare(compose("model=tiny", "device=cpu", "scheduler=ddim", "steps=6", "log_every=2"))
    built, model = exp.built, exp.model
    eager = list(exp.steps())
    steps = capture(model, built.scheduler, exp.noise, 6, built.step_kwargs, built.timesteps_kwargs, graphs=False)
    for _ in range(2):  # a second replay starts again from the static input
        replayed = list(steps.states(exp.noise, 6, 2))
        assert len(replayed) == len(eager) == 6
        for a, b in zip(replayed, eager, strict=True):
            assert torch.equal(a.x, b.x) and torch.equal(a.x0, b.x0)
            assert (a.nfe, a.net_evals, a.step, a.timestep, a.snapshot) == (b.nfe, b.net_evals, b.step, b.timestep,
                                                                         b.snapshot)  # fmt: skip
            assert a.sigma == pytest.approx(b.sigma)
        assert model.calls == 6 and model.net_evals == 6
    other = exp.for_samples(range(4, 8))  # other noise through the same static input
    ref = sample(iter_steps(other.model, built.scheduler, other.noise, 6, None, built.step_kwargs)).x
    assert torch.equal(list(steps.states(other.noise, 6, 2))[-1].x, ref)
    assert not torch.equal(ref, eager[-1].x)


def test_yielded_samples_are_copies_that_the_next_replay_leaves_alone() -> None:
    exp = diffexp.prepare(compose("model=tiny", "device=cpu", "scheduler=ddim", "steps=3"))
    built = exp.built
    steps = capture(exp.model, built.scheduler, exp.noise, 3, built.step_kwargs, graphs=False)
    first = list(steps.states(exp.noise, 3, 10))[-1].x
    kept = first.clone()
    list(steps.states(exp.noise * 0.5, 3, 10))
    assert torch.equal(first, kept)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["scheduler=ddpm"], "graph=step cannot capture scheduler=ddpm: it is stochastic"),
        (["scheduler=ddim", "scheduler.eta=1"], "graph=step cannot capture scheduler=ddim: it is stochastic"),
        (["scheduler=dpmsolver"], "keeps state on the host between steps"),
        (["scheduler=k-euler"], "a k-diffusion sampler runs its whole loop"),
        (["scheduler=ddim", "model=digits-cond", "labels=all", "guidance_scale=2"], "cannot capture guided calls"),
        (["scheduler=ddim", "compile=reduce-overhead"], "graphs cannot nest"),
        (["scheduler=ddim", "device=cpu"], "graph=step captures each step as a CUDA graph, which needs a CUDA"),
    ],
)
def test_what_a_graph_cannot_capture_is_refused_with_a_non_zero_exit(
    args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run_main("scripts/run.py", ["model=tiny", "logger=none", "graph=step", *args], tmp_path, monkeypatch)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_bad_graph_value_and_a_cache_are_refused_with_the_settings() -> None:
    with pytest.raises(DiffexpError, match="graph=all is not allowed: use none or step"):
        diffexp.read_settings(compose("graph=all"))
    with pytest.raises(DiffexpError, match="cannot combine with cache=first-block"):
        diffexp.read_settings(compose("scheduler=ddim", "graph=step", "cache=first-block"))
    assert diffexp.read_settings(compose("scheduler=ddim", "graph=step")).graph == "step"
