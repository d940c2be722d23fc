"""Metrics: known cases, the reference cache, and exact figures on the known-truth model (digits-ideal)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import compose
from safetensors.torch import load_file, save_file

import diffexp
from diffexp.errors import DiffexpError
from diffexp.metrics.agreement import STOCHASTIC, psnr, rmse, ssim
from diffexp.metrics.features import feature_net
from diffexp.metrics.fid import fid_kid
from diffexp.metrics.landing import landing, nearest
from diffexp.metrics.reference import solve_reference
from diffexp.runner.observers import Observer
from diffexp.runner.run import run
from diffexp.sampling.ideal import digits_images
from diffexp.sampling.loop import StepState
from diffexp.sampling.models import load_model

HEUN = {"name": "heun", "timestep_spacing": "linspace"}


# --- metric implementations on known cases ---------------------------------------------------------------


def test_identical_images_give_zero_rmse_and_infinite_psnr() -> None:
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    assert rmse(x, x.clone()) == 0.0
    assert psnr(x, x.clone()) == math.inf
    assert ssim(x, x.clone()) == pytest.approx(1.0)


def test_a_known_offset_gives_the_known_psnr() -> None:
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    assert rmse(x + 0.1, x) == pytest.approx(0.1, rel=1e-6)
    # data range 2 for [-1, 1]: 20 log10(2 / 0.1) = 26.0206 dB
    assert psnr(x + 0.1, x) == pytest.approx(20 * math.log10(2 / 0.1), abs=1e-4)
    assert ssim(x + 0.5 * torch.randn_like(x), x) < 0.9


def test_fid_of_a_set_against_itself_is_about_zero(tmp_path: Path) -> None:
    net = feature_net(compose().metrics.fid, torch.device("cpu"), tmp_path)
    digits = digits_images(32)
    same = fid_kid(net.features(digits), net, "digits", (1, 32, 32), tmp_path, kid_subset_size=100, kid_subsets=20)
    assert abs(same["fid"]) < 1e-2
    assert abs(same["kid_mean"]) < 0.1
    assert same["fid_n"] == len(digits) and same["fid_features"].startswith("digits-cnn@")
    # the real statistics were cached; a reload gives the same value, and noise is far from digits
    assert len(list((tmp_path / "fid").glob("*.safetensors"))) == 1
    assert fid_kid(net.features(digits), net, "digits", (1, 32, 32), tmp_path, 100, 20)["fid"] == pytest.approx(
        same["fid"], abs=1e-9
    )
    noise = fid_kid(
        net.features(torch.randn(200, 1, 32, 32).clamp(-1, 1)), net, "digits", (1, 32, 32), tmp_path, 100, 20
    )
    assert noise["fid"] > 100 * max(abs(same["fid"]), 1e-3) and noise["kid_mean"] > 0.5


def test_the_shipped_feature_network_knows_digits() -> None:
    from diffexp.metrics.features import load_digits_features
    from diffexp.sampling.ideal import digits_labels

    net, metadata = load_digits_features()
    digits = digits_images(32)
    accuracy = (net.classify(digits).argmax(1) == digits_labels()).float().mean().item()
    assert accuracy > 0.9
    assert json.loads(metadata["info"])["val_accuracy"] > 0.9
    features = net(digits)  # standardised on the real digits
    assert features.mean(0).abs().max() < 1e-3 and (features.std(0) - 1).abs().max() < 1e-3


# --- the reference cache ---------------------------------------------------------------------------------


def _solve(cache: Path, std: float = 0.3, seed: int = 0, batch: int = 2, size: int = 32, **over: Any):
    loaded = load_model(compose("model=digits-ideal", f"model.std={std}", f"model.sample_size={size}").model, "cpu")
    noise, _ = diffexp.initial_noise(loaded.sample_shape, seed, batch, torch.device("cpu"))
    spec = {**HEUN, **over.pop("options", {})}
    return solve_reference(spec, over.pop("steps", 4), loaded, noise, seed, over.pop("precision", "fp32"), cache)


def test_the_reference_cache_is_reused_when_the_key_is_unchanged_and_recomputed_when_it_changes(
    tmp_path: Path,
) -> None:
    first = _solve(tmp_path)
    assert not first.cached and first.path.exists() and first.nfe == 7  # heun: 2N - 1 calls
    again = _solve(tmp_path)
    assert again.cached and again.key == first.key and torch.equal(again.x, first.x)
    # the cached file is what is used: altered on disk, the alteration comes back
    stored = load_file(str(first.path))
    save_file({"x": stored["x"] + 1, "nfe": stored["nfe"]}, str(first.path))
    assert torch.equal(_solve(tmp_path).x, first.x + 1)
    changes = {
        "seed": dict(seed=1),
        "batch": dict(batch=3),
        "model": dict(std=0.2),
        "resolution": dict(size=16),
        "solver steps": dict(steps=5),
        "solver option": dict(options={"timestep_spacing": "trailing"}),
        "precision": dict(precision="bf16"),
    }
    keys = {first.key}
    for what, change in changes.items():
        other = _solve(tmp_path, **change)
        assert not other.cached and other.key not in keys, what
        keys.add(other.key)
    assert len(list((tmp_path / "reference").glob("*.safetensors"))) == len(changes) + 1


def test_the_reference_must_be_deterministic_and_unclipped(tmp_path: Path) -> None:
    with pytest.raises(DiffexpError, match="deterministic"):
        _solve(tmp_path, options={"name": "ddpm"})
    with pytest.raises(DiffexpError, match="true probability-flow ODE"):
        _solve(tmp_path, options={"clip_sample": True})
    # heun inherits clip_sample=True from the model's config; the reference switches it off
    assert _solve(tmp_path, steps=2).solver["options"]["clip_sample"] is False


# --- exact figures on digits-ideal -------------------------------------------------------------------------


def _run(tmp_path: Path, name: str, *overrides: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    out = tmp_path / name
    metrics = run(compose("model=digits-ideal", f"metrics.cache_dir={tmp_path / 'cache'}", *overrides), out)
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    return metrics, steps


@pytest.fixture(scope="module")
def smooth(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], tuple[dict, list]]:
    """DDIM and DPM-Solver++ at 10, 20, 40 steps on digits-ideal with std 0.3, clipping off, same seeds."""
    tmp = tmp_path_factory.mktemp("smooth")
    common = ["model.std=0.3", "batch_size=4", "metrics=reference", "metrics.reference.steps=100", "log_every=5"]
    runs = {}
    for name, extra in (("ddim", ["scheduler.clip_sample=false"]), ("dpmsolver", [])):
        for steps in (10, 20, 40):
            runs[name, steps] = _run(tmp, f"{name}-{steps}", *common, f"scheduler={name}", f"steps={steps}", *extra)
    return runs


@pytest.mark.parametrize("name", ["ddim", "dpmsolver"])
def test_ref_rmse_falls_as_steps_grow_at_std_0_3_without_clipping(smooth: dict, name: str) -> None:
    errors = [smooth[name, steps][0]["ref_rmse"] for steps in (10, 20, 40)]
    assert errors[0] > errors[1] > errors[2], errors
    metrics, steps = smooth[name, 40]
    assert metrics["ref_kind"] == "deterministic" and metrics["clip_sample"] is False
    assert metrics["reference"]["cached"] and metrics["ref_psnr"] > 20 * math.log10(2 / errors[1])
    # steps.jsonl: the x0 of each snapshot against the reference's final samples, converging to it
    curve = [s["x0_ref_rmse"] for s in steps]
    assert len(curve) == 40 // 5 and curve[0] > curve[-1]
    assert curve[-1] == pytest.approx(metrics["ref_rmse"], abs=1e-4)


def test_at_equal_nfe_dpmsolver_is_closer_to_the_reference_than_ddim(smooth: dict) -> None:
    ddim, dpm = smooth["ddim", 10][0], smooth["dpmsolver", 10][0]
    assert ddim["nfe"] == dpm["nfe"] == 10
    assert dpm["ref_rmse"] < ddim["ref_rmse"]


def test_at_std_0_a_deterministic_solver_lands_almost_every_sample_on_a_training_image(tmp_path: Path) -> None:
    common = ["scheduler=dpmsolver", "steps=30", "batch_size=8"]
    metrics, _ = _run(tmp_path, "s0", "model.std=0", *common, "metrics=reference", "metrics.reference.steps=60")
    assert metrics["ideal_std"] == 0 and metrics["hit_rate"] >= 7 / 8
    assert metrics["nn_dist"] < metrics["hit_tol"]
    assert metrics["basin_mismatch"] <= 1 / 8  # lands where the reference lands
    assert 0 <= metrics["class_hist_distance"] <= 1 and sum(metrics["landed_classes"]) >= 7
    # control: with std 0.3 the data is spread around the images, and no sample sits on one
    smooth, _ = _run(tmp_path, "s03", "model.std=0.3", *common, "metrics.landing=true")
    assert smooth["basin_mismatch"] is None  # no reference in this run
    assert smooth["hit_rate"] == 0 and smooth["nn_dist"] > 0.1 and smooth["class_hist_distance"] is None


def test_landing_figures_on_known_cases() -> None:
    images = digits_images(8).flatten(1)
    labels = torch.arange(len(images)) % 10
    x = images[:4].reshape(4, 1, 8, 8).clone()
    x[3] += 0.05  # near image 3, but not within the tolerance
    ref = images[[0, 1, 5, 3]].reshape(4, 1, 8, 8)
    dist, index = nearest(x, images)
    out = landing(dist, index, labels, hit_tol=0.02, ref_index=nearest(ref, images)[1])
    assert out["hit_rate"] == 0.75 and out["nn_dist_max"] > 0.02
    assert out["basin_mismatch"] == 0.25  # sample 2 landed on image 2, the reference on image 5
    assert out["landed_classes"] == [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert out["class_hist_distance"] == pytest.approx(0.5 * (3 * abs(1 / 3 - 0.1) + 7 * 0.1), abs=1e-3)


# --- labels and settings ------------------------------------------------------------------------------


def test_stochastic_samplers_are_labelled_and_clipping_is_recorded(tmp_path: Path) -> None:
    common = ["steps=10", "batch_size=2", "metrics=reference", "metrics.reference.steps=20"]
    ddpm, _ = _run(tmp_path, "ddpm", "scheduler=ddpm", *common)
    assert ddpm["ref_kind"] == STOCHASTIC and ddpm["stochastic"] is True
    ddim, _ = _run(tmp_path, "ddim", "scheduler=ddim", *common)
    assert ddim["ref_kind"] == "deterministic" and ddim["reference"]["cached"]
    # DDIM inherits clip_sample=True from the model's config: recorded, and warned about
    assert ddim["clip_sample"] is True and ddim["thresholding"] is False
    assert any("clip_sample" in w for w in ddim["warnings"])
    euler, _ = _run(tmp_path, "euler", "scheduler=euler", *common)
    assert euler["clip_sample"] is False and not euler["warnings"]


@pytest.mark.parametrize(
    "name,options",
    [(name, {}) for name in diffexp.SCHEDULERS]
    + [("ddim", {"eta": 1.0}), ("euler", {"s_churn": 1.0}), ("dpmsolver", {"algorithm_type": "sde-dpmsolver++"})]
    + [("flow-euler", {"stochastic_sampling": True})],
)
def test_the_stochastic_label_matches_what_the_scheduler_does(name: str, options: dict[str, Any]) -> None:
    from diffexp.sampling.ideal import DDPM_SCHEDULER_CONFIG, FLOW_SCHEDULER_CONFIG

    flow = name.startswith("flow-")  # the flow schedulers sample the flow path of a flow model
    parameterisation = "flow" if flow else "vp"
    model_config = compose("model=digits-ideal", "model.sample_size=8", f"model.parameterisation={parameterisation}")
    loaded = load_model(model_config.model, torch.device("cpu"))
    model = diffexp.pixel_adapter(loaded.model, loaded.prediction_type)
    noise, _ = diffexp.initial_noise((1, 8, 8), 0, 2, torch.device("cpu"))
    finals = []
    for seed in (0, 1):  # the same initial noise; only the noise drawn during sampling differs
        config = FLOW_SCHEDULER_CONFIG if flow else DDPM_SCHEDULER_CONFIG
        built = diffexp.build_scheduler(name, config, options, seed=seed)
        other = [torch.Generator().manual_seed(100 * seed + k) for k in range(2)]
        finals.append(diffexp.sample(diffexp.iter_steps(model, built.scheduler, noise, 8, other, built.step_kwargs)).x)
    assert built.stochastic == (not torch.allclose(finals[0], finals[1])), name


def test_the_default_metrics_are_cheap(tmp_path: Path) -> None:
    metrics, steps = _run(tmp_path, "default", "steps=5", "batch_size=2")
    assert "ref_rmse" not in metrics and "fid" not in metrics and "x0_ref_rmse" not in steps[-1]
    assert "hit_rate" not in metrics and "clip_sample" in metrics and "wall_s" in metrics
    assert not (tmp_path / "cache").exists()


def test_fid_and_kid_are_reported_with_their_sample_count(tmp_path: Path) -> None:
    metrics, _ = _run(tmp_path, "fid", "metrics=fid", "steps=10", "batch_size=8", "metrics.fid.n=6")
    assert metrics["fid_n"] == 6 and metrics["fid_features"].startswith("digits-cnn@")
    assert metrics["fid"] > 0 and metrics["kid_subset_size"] == 6 and "kid_std" in metrics


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["metrics=fid", "metrics.fid.n=9"], "between 2 and num_samples"),
        (["metrics=fid", "metrics.fid.real=/nonexistent"], "neither 'digits', a folder"),
        (["metrics=fid", "metrics.fid.features=inception", "metrics.fid.inception_weights=BAD"], "not a plain"),
        (["metrics=reference", "metrics.reference.scheduler.name=ddpm"], "deterministic"),
    ],
)
def test_bad_metric_settings_fail_before_sampling(tmp_path: Path, overrides: list[str], message: str) -> None:
    (tmp_path / "BAD").write_bytes(b"not weights")
    overrides = [o.replace("=BAD", f"={tmp_path / 'BAD'}") for o in overrides]
    with pytest.raises(DiffexpError, match=message):
        _run(tmp_path, "bad", "batch_size=4", *overrides)
    assert json.loads((tmp_path / "bad" / "status.json").read_text())["status"] == "failed"
    assert not (tmp_path / "bad" / "steps.jsonl").exists()


# --- cost ------------------------------------------------------------------------------------------------


class Slow(Observer):
    """An observer that takes its time at every model call."""

    def __init__(self, pause: float) -> None:
        self.pause, self.calls = pause, 0

    def call(self, state: StepState) -> None:
        self.calls += 1
        time.sleep(self.pause)


def test_the_cost_is_recorded_and_observer_time_is_not_counted(tmp_path: Path) -> None:
    slow = Slow(0.2)  # 1.8 s of sleep in all: far more than the sampling itself, even on a loaded machine
    cfg = compose("model=digits-ideal", "scheduler=heun", "steps=5", "batch_size=2", "log_every=2")
    metrics = run(cfg, tmp_path / "run", [slow])
    assert metrics["nfe"] == slow.calls == 9  # heun: 2N - 1 model calls
    assert 0 < metrics["wall_s"] < slow.calls * 0.2  # sampling only: the observer's sleep is not in it
    assert metrics["images_per_s"] == pytest.approx(2 / metrics["wall_s"])
    assert metrics["load_s"] > 0 and metrics["peak_mem_mb"] > 0
    steps = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [2, 4, 5] and all(s["step_s"] > 0 for s in steps)
    assert steps[-1]["elapsed_s"] == pytest.approx(metrics["wall_s"])
