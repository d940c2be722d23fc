"""The speed keys on the CPU: precision, channels_last, compile and attention recorded, refused where the device
cannot do them; a run that starts with only what it uses and prints only diffexp's own lines."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, bf16_matches_fp32, cli_env, compose, run_cli

import diffexp
from diffexp.errors import DiffexpError
from diffexp.sampling import speed
from diffexp.sampling.loop import sample

HEAVY = ("wandb", "matplotlib", "torchmetrics", "diffexp.report", "torch_fidelity")


def final(*overrides: str) -> torch.Tensor:
    return sample(diffexp.prepare(compose(*overrides)).steps()).x


def test_bf16_outputs_are_within_1e_2_of_fp32_on_the_same_noise() -> None:
    bf16_matches_fp32("cpu")


def test_the_gpu_benchmark_runs_on_the_cpu_in_smoke_mode(tmp_path: Path) -> None:
    from diffusers import UNet2DModel

    out = tmp_path / "gpu.json"
    result = run_cli(["--smoke", "--out", str(out)], cwd=tmp_path, script="benchmarks/gpu.py")
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["device_name"] == "cpu" and data["batches"] == [2, 4] and data["steps"] == 3
    bench = runpy.run_path(str(ROOT / "benchmarks" / "gpu.py"), run_name="gpu")  # its constants, not its main
    unet = UNet2DModel.from_config(json.loads(bench["CONFIG"].read_text()) | bench["SMOKE"])
    assert data["params_m"] == pytest.approx(sum(p.numel() for p in unet.parameters()) / 1e6, rel=1e-9)
    assert set(data["variants"]) == {"fp32", "bf16", "bf16 channels_last", "bf16 channels_last cudnn_benchmark"}
    lines = result.stdout.splitlines()
    for name, row in data["variants"].items():
        assert row["keys"] == bench["VARIANTS"][name]
        assert row["large_img_s"] == pytest.approx(4 / row["forward_large_ms"] * 1e3)  # batch 4 over its forward
        assert all(row[k] > 0 for k in ("forward_small_ms", "forward_large_ms", "loop_small_s"))
        cells = [f"{row[k]:.3g}" for k in ("forward_small_ms", "forward_large_ms", "large_img_s", "loop_small_s")]
        assert f"| {name} | {' | '.join(cells)} | - |" in lines  # the printed table is the JSON's
    assert data["gflop_per_image"] > 0 and f"{data['gflop_per_image']:.4g} GFLOP per image" in result.stdout
    # the large part: SDXL- and Flux-sized networks from their published configs, scaled down by SMOKE
    large = runpy.run_path(str(ROOT / "benchmarks" / "large.py"), run_name="large")
    models = data["large"]["models"]
    classes = {name: row["class"] for name, row in models.items()}
    assert classes == {"sdxl": "UNet2DConditionModel", "flux": "FluxTransformer2DModel"}
    for name, row in models.items():
        network = large["build"](name, True, torch.device("cpu"))
        assert row["params_m"] == pytest.approx(sum(p.numel() for p in network.parameters()) / 1e6, rel=1e-9)
        assert next(network.parameters()).dtype == torch.bfloat16
        assert all(row[k] > 0 for k in ("call_b1_s", "call_b4_s", "peak_mem_b1_mb", "run_3_steps_b1_s_per_step"))
        assert row["finite"] and f"| {name} ({row['class']}) | {row['params_m']:.4g} |" in result.stdout
    assert models["flux"]["latent_shape"] == [16, 64]  # 64 px: 8x8 latents packed 2x2 into 16 tokens of 4 x 16


def test_the_overhead_benchmark_prints_its_ratios(tmp_path: Path) -> None:
    args = ["--repeats", "1", "--steps", "2", "--no-processes"]
    result = run_cli(args, cwd=tmp_path, script="benchmarks/overhead.py")
    assert result.returncode == 0, result.stderr
    rows = {
        cells[0]: [float(c) for c in (cells[1], cells[2], cells[4])]
        for line in result.stdout.splitlines()
        if line.startswith(("| runner", "| bare loop"))
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }  # arm: median s, ratio, seconds outside the network
    assert list(rows) == ["bare loop, 2 steps", "runner, logger=none, 2 steps", "runner, W&B offline, 2 steps"]
    bare = rows["bare loop, 2 steps"][0]
    assert rows["bare loop, 2 steps"][1] == 1.0  # the baseline against itself
    for seconds, ratio, outside in rows.values():
        assert ratio == pytest.approx(seconds / bare, rel=0.03, abs=2e-3)  # one round: the ratio of the times
        assert 0 < outside < seconds  # the network's own time is part of each arm's
    wandb, none = rows["runner, W&B offline, 2 steps"][0], rows["runner, logger=none, 2 steps"][0]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("W&B offline over logger=none: ")]
    over, extra = line.split()[4:6]
    assert float(over) == pytest.approx(wandb / none, rel=0.03, abs=2e-3)
    assert float(extra.lstrip("(")) == pytest.approx(wandb - none, abs=0.006)  # seconds, 2 decimals
    assert float(result.stdout.split("W&B media: ")[1].split()[0]) > 0  # the W&B arm logged its grids


def test_channels_last_gives_the_same_samples_and_is_recorded(tmp_path: Path) -> None:
    base = ("model=tiny", "scheduler=dpmsolver", "steps=6", "batch_size=2")
    exp = diffexp.prepare(compose(*base, "channels_last=true"))
    weight = next(p for p in exp.loaded.model.parameters() if p.dim() == 4)
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert torch.allclose(sample(exp.steps()).x, final(*base), atol=1e-4)
    metrics = diffexp.run(compose(*base, "channels_last=true"), tmp_path / "run")
    assert metrics["channels_last"] is True and metrics["compile"] is None and "compile_s" not in metrics
    assert metrics["precision"] == "fp32" and metrics["attention"] == ["AttnProcessor2_0"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["channels_last"] is True


def test_attention_runs_through_sdpa() -> None:
    from diffusers.models.attention_processor import Attention, AttnProcessor

    model = diffexp.prepare(compose("model=tiny", "steps=2")).loaded.model
    attention = next(m for m in model.modules() if isinstance(m, Attention))
    attention.set_processor(AttnProcessor())  # the non-SDPA processor, as some configs choose
    assert speed.use_sdpa(model) == ["AttnProcessor2_0"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["precision=tf32"], "precision=tf32 needs a CUDA GPU"),
        (["precision=fp16"], "precision=fp16 is not supported on the CPU"),
        (["compile=reduce-overhead"], "compile=reduce-overhead records CUDA graphs, which need a CUDA device"),
        (["compile=fast"], "compile=fast is not allowed"),
    ],
)
def test_what_the_cpu_cannot_do_is_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(DiffexpError, match=message):
        diffexp.prepare(compose("model=tiny", "device=cpu", *overrides))


def test_a_bad_compile_value_fails_before_torch_loads(tmp_path: Path) -> None:
    result = run_cli(["compile=fast", "logger=none"], cwd=tmp_path, timeout=60)
    assert result.returncode == 2 and "compile=fast is not allowed" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_collector_waits_for_start_up_only_where_a_command_asks() -> None:
    code = """import gc
from diffexp.startup import defer_collection, end_startup
end_startup()
print(gc.isenabled(), gc.get_freeze_count())  # a library user: untouched
defer_collection()
import torch
print(gc.isenabled())
end_startup()
print(gc.isenabled(), gc.get_freeze_count() > 10_000)
"""

    result = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["True", "0", "False", "True", "True"], result.stderr


# prints the heavy modules a default run imported, and the garbage collector's state, after it ends
PROBE = """import atexit, gc, runpy, sys
atexit.register(lambda: print("imported:", sorted(m for m in {heavy!r} if m in sys.modules)))
atexit.register(lambda: print("collector:", gc.isenabled(), gc.get_freeze_count() > 100_000))
sys.argv = ["run.py", "logger=none", "progress=false", "hydra.run.dir={out}"]
runpy.run_path({script!r}, run_name="__main__")
"""


def test_a_default_run_imports_only_what_it_uses_and_prints_only_its_own_lines(tmp_path: Path) -> None:

    probe = tmp_path / "probe.py"
    probe.write_text(PROBE.format(heavy=HEAVY, out=tmp_path / "run", script=str(ROOT / "scripts" / "run.py")))
    result = run_cli([], cwd=tmp_path, script=str(probe))
    assert result.returncode == 0, result.stderr
    assert "imported: []" in result.stdout, result.stdout
    # start-up's objects (torch, diffusers) were frozen out of the collector's reach, which then ran again
    assert "collector: True True" in result.stdout, result.stdout
    output = result.stdout + result.stderr
    for noise in ("Loading pipeline components", "Casting directly with `to()`", "accelerate", "deprecat"):
        assert noise not in output, output
    lines = [line for line in output.splitlines() if line.strip() and not line.startswith(("imported:", "collector:"))]
    assert lines and all("][diffexp][" in line for line in lines), output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0 < metrics["startup_s"] < 300 and metrics["compile"] is None


@pytest.mark.slow
def test_compile_matches_eager_and_a_second_run_reuses_it() -> None:
    base = ("model=tiny", "scheduler=ddim", "steps=4", "batch_size=2")
    eager = final(*base)
    first = diffexp.prepare(compose(*base, "compile=default"))
    assert first.speed.compile == "default" and first.speed.compile_s > 0 and not first.speed.compile_reused
    assert torch.allclose(sample(first.steps()).x, eager, atol=1e-4)
    again = diffexp.prepare(compose(*base, "compile=default"))  # a sweep's next job: the same network, no compile
    assert (
        again.speed.compile_reused
        and again.speed.compile_s == 0.0
        and again.model.network.compiled is first.model.network.compiled
    )
    assert torch.allclose(sample(again.steps()).x, eager, atol=1e-4)


@pytest.mark.slow
def test_a_compiler_that_does_not_work_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._dynamo
    import torch._inductor.config

    torch._dynamo.reset()
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("/nonexistent/c++",))
    with pytest.raises(DiffexpError, match=r"compile=default cannot run here: torch\.compile failed"):
        speed.probe_compiler("default", torch.device("cpu"))
    torch._dynamo.reset()


def test_the_cache_benchmark_times_each_cache_against_its_own_uncached_turns(tmp_path: Path) -> None:
    out = tmp_path / "cache.json"
    result = run_cli(["--smoke", "--out", str(out)], cwd=tmp_path, script="benchmarks/cache.py")
    assert result.returncode == 0, result.stderr
    settings = json.loads(out.read_text())["settings"]
    bench = runpy.run_path(str(ROOT / "benchmarks" / "cache.py"), run_name="cache")
    assert list(settings) == list(bench["SETTINGS"])
    for name, row in settings.items():
        assert row["speedup"] == pytest.approx(row["uncached_seconds"] / row["seconds"])
        cells = f"{row['seconds']:.3g} | {row['uncached_seconds']:.3g} | {row['speedup']:.2f}"
        assert f"| {name} | {cells} |" in result.stdout  # the printed table is the JSON's
    assert settings["none"]["ref_rmse"] == 0.0 and "passes_ran" not in settings["none"]
    strict, loose = settings["first-block 0.05"], settings["first-block 0.2"]  # the cached turn's counts
    assert loose["passes_ran"] < loose["passes_nominal"] == 6 and loose["share"] < 1
    assert loose["passes_ran"] <= strict["passes_ran"] and loose["ref_rmse"] > 0
