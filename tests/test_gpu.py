"""On a CUDA GPU (skipped without one; ``pytest -m gpu``): the loop never waits for the device between
snapshots, compiled CUDA graphs sample what eager does, bf16 stays within 1e-2 of fp32, TF32 is recorded."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from conftest import bf16_matches_fp32, compose

import diffexp
from diffexp.sampling.loop import sample
from diffexp.sampling.network import Network

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_the_loop_does_not_synchronise_between_snapshots() -> None:
    # one snapshot, the last call: every call before it must queue work without waiting for the device
    exp = diffexp.prepare(compose("model=tiny", "device=cuda", "scheduler=ddim", "steps=8", "log_every=100"))
    states = exp.steps()
    next(states)  # the first call: the schedule is read once here
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            between = [next(states) for _ in range(6)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    waits = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert not waits, waits
    assert not any(s.snapshot for s in between)
    final = list(states)[-1]
    assert final.snapshot and final.nfe == 8 and torch.isfinite(final.x).all()


def test_non_finite_values_are_caught_on_the_device_with_their_call() -> None:
    exp = diffexp.prepare(compose("model=tiny", "device=cuda", "scheduler=ddim", "steps=6", "log_every=100"))
    network = exp.model.module
    calls = []

    def poisoned(x: torch.Tensor, t: torch.Tensor, **condition: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        out = network(x, t, **condition).sample
        return out * float("nan") if len(calls) == 3 else out

    exp = dataclasses.replace(exp, model=exp.model.with_network(Network(network, poisoned)))
    with pytest.raises(diffexp.NonFiniteError, match="at step 3 \\(model call 3\\)"):
        sample(exp.steps())


def test_compile_reduce_overhead_samples_what_eager_does() -> None:
    base = ("model=tiny", "device=cuda", "scheduler=dpmsolver", "steps=8", "batch_size=2")
    eager = sample(diffexp.prepare(compose(*base)).steps()).x
    exp = diffexp.prepare(compose(*base, "compile=reduce-overhead", "channels_last=true"))
    assert exp.speed.compile == "reduce-overhead" and exp.speed.compile_s > 0
    compiled = sample(exp.steps()).x
    assert torch.allclose(compiled, eager, atol=1e-3), (compiled - eager).abs().max()
    again = sample(exp.steps()).x  # CUDA graphs replayed: outputs copied before the next replay
    assert torch.allclose(again, compiled, atol=1e-5)


def test_bf16_outputs_are_within_1e_2_of_fp32_on_the_gpu() -> None:
    bf16_matches_fp32("cuda")


def test_tf32_is_set_per_run_and_recorded() -> None:
    exp = diffexp.prepare(compose("model=tiny", "device=cuda", "precision=tf32", "steps=4"))
    assert exp.speed.precision == "tf32" and exp.dtype == torch.float32
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert torch.isfinite(sample(exp.steps()).x).all()
    diffexp.prepare(compose("model=tiny", "device=cuda", "precision=fp32", "steps=4"))  # the next run of a sweep
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
