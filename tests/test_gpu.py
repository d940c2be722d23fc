"""On a CUDA GPU (skipped without one; ``pytest -m gpu``): the loop never waits for the device between
snapshots, compiled CUDA graphs and graph=step sample what eager does, cudnn_benchmark changes nothing beyond float32
rounding, bf16 stays within 1e-2 of fp32, TF32 is recorded. Each test takes seconds on a tiny model (max-autotune:
its compilation, under 30 s)."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

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


GRAPHED = ("model=tiny", "device=cuda", "scheduler=ddim", "steps=8", "batch_size=2", "log_every=4")


def test_graph_step_samples_what_eager_does_in_fp32() -> None:
    eager = diffexp.prepare(compose(*GRAPHED))
    reference = [s.x for s in eager.steps()]
    exp = diffexp.prepare(compose(*GRAPHED, "graph=step"))
    states = list(exp.steps())
    assert exp.speed.graph == "step" and exp.speed.capture_s > 0 and len(exp.graphs.captured) == 1
    assert [s.nfe for s in states] == list(range(1, 9)) and states[-1].net_evals == 8 and states[-1].snapshot
    for a, b in zip(states, reference, strict=True):  # the same kernels replayed: exact, or to float32 rounding
        assert (a.x - b).abs().max().item() <= 1e-6
    captured = exp.graphs.captured[0]
    again = list(exp.steps())[-1].x  # replayed, not captured again; the yielded x was a copy
    assert exp.graphs.captured[0] is captured and torch.equal(again, states[-1].x)
    other = exp.for_samples(range(2, 4))  # another chunk: its own noise, captured for it
    chunk, eager_chunk = sample(other.steps()).x, sample(eager.for_samples(range(2, 4)).steps()).x
    assert (chunk - eager_chunk).abs().max().item() <= 1e-6
    assert exp.graphs.captured[0] is not captured


def test_graph_step_runs_through_the_runner_and_is_recorded(tmp_path: Path) -> None:
    metrics = diffexp.run(compose(*GRAPHED, "graph=step", "num_samples=3"), tmp_path / "run")
    assert metrics["graph"] == "step" and metrics["capture_s"] > 0 and metrics["nfe"] == 8
    plain = diffexp.run(compose(*GRAPHED, "num_samples=3"), tmp_path / "plain")
    assert "capture_s" not in plain
    a, b = diffexp.load_samples(tmp_path / "run"), diffexp.load_samples(tmp_path / "plain")
    assert torch.allclose(torch.as_tensor(a), torch.as_tensor(b), atol=1e-6, rtol=0)


def test_cudnn_benchmark_samples_what_it_does_off_in_fp32() -> None:
    base = ("model=tiny", "device=cuda", "scheduler=ddim", "steps=8", "batch_size=2")
    off = sample(diffexp.prepare(compose(*base)).steps()).x
    exp = diffexp.prepare(compose(*base, "cudnn_benchmark=true"))
    assert torch.backends.cudnn.benchmark
    on = sample(exp.steps()).x
    # another convolution algorithm may sum in another order: float32 rounding, no more
    assert (on - off).abs().max().item() <= 1e-4
    diffexp.prepare(compose(*base))
    assert not torch.backends.cudnn.benchmark  # set every run


@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 1e-3), ("bf16", 2e-2)])
def test_compile_max_autotune_samples_what_eager_does(precision: str, tolerance: float) -> None:
    # fp32: max abs difference, as for reduce-overhead (fused kernels reorder sums); bf16: the mean, as bf16 vs fp32
    base = ("model=tiny", "device=cuda", "scheduler=ddim", "steps=6", "batch_size=2", f"precision={precision}")
    eager = sample(diffexp.prepare(compose(*base)).steps()).x
    exp = diffexp.prepare(compose(*base, "compile=max-autotune"))
    assert exp.speed.compile == "max-autotune" and exp.speed.compile_s > 0
    compiled = sample(exp.steps()).x
    diff = (compiled - eager).abs()
    assert (diff.max() if precision == "fp32" else diff.mean()).item() <= tolerance, diff.max()
    assert torch.equal(sample(exp.steps()).x, compiled)  # its CUDA graphs replayed: the same again
