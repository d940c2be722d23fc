"""Training-free caches (diffusers' hooks) as a run's axis, on a tiny random DiT: applied, reset per chunk, counted,
named in the run label, compared with the uncached run from the same noise, and refused where they cannot act."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import compose
from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel
from tiny_latent import DIT_CONFIG, tiny_vae

import diffexp
from diffexp.errors import DiffexpError
from diffexp.sampling.loop import sample


@pytest.fixture(scope="module")
def dit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DiTPipeline with six transformer blocks (first-block cache needs a head, a middle and a tail)."""
    folder = tmp_path_factory.mktemp("cache-dit")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = DiTTransformer2DModel(**(DIT_CONFIG | {"num_layers": 6}))
        vae = tiny_vae()
    scheduler = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False)
    DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler).save_pretrained(folder)
    return folder


def run(dit: Path, *overrides: str) -> diffexp.Experiment:
    base = ("model=local", f"model.path={dit}", "labels=[3,7]", "scheduler=ddim", "steps=10", "batch_size=2")
    return diffexp.prepare(compose(*base, *overrides))


def test_first_block_cache_skips_passes_and_counts_only_those_that_ran(dit: Path) -> None:
    plain = sample(run(dit).steps())
    exp = run(dit, "cache=first-block", "cache.threshold=0.5")
    assert exp.label == "ddim-10-first-block0.5"
    final = sample(exp.steps())
    count = exp.model.cache.count
    assert count.nominal == 10 and 1 <= count.ran < 10  # the first pass always runs; some were skipped
    assert final.nfe == 10 and final.net_evals == count.ran
    assert 0 < count.share < 1 and not torch.equal(final.x, plain.x)
    again = sample(exp.steps())  # the hooks' state reset: the same samples, the same count
    assert torch.equal(again.x, final.x) and exp.model.cache.count.ran == count.ran


def test_a_threshold_of_zero_reuses_nothing_and_samples_what_no_cache_does(dit: Path) -> None:
    plain = sample(run(dit).steps()).x
    exp = run(dit, "cache=first-block", "cache.threshold=0.0")
    final = sample(exp.steps())
    assert final.net_evals == 10 and exp.model.cache.count.share == pytest.approx(1.0)
    assert torch.allclose(final.x, plain, atol=1e-5)


@pytest.mark.parametrize(
    ("cache", "options"),
    [("taylorseer", ["cache.cache_interval=3", "cache.disable_cache_before_step=1"]), ("pab", []), ("faster", [])],
)
def test_partial_caches_run_every_pass_and_reuse_part_of_it(dit: Path, cache: str, options: list[str]) -> None:
    exp = run(dit, f"cache={cache}", *options)
    final = sample(exp.steps())
    count = exp.model.cache.count
    assert final.net_evals == count.ran == count.nominal == 10  # no pass is skipped whole
    assert count.share < 1 and torch.isfinite(final.x).all()


def test_guided_passes_are_cached_apart_and_counted_per_sample(dit: Path) -> None:
    exp = run(dit, "cache=first-block", "cache.threshold=0.5", "guidance_scale=2")
    final = sample(exp.steps())
    assert exp.model.cache.count.nominal == 20 and final.net_evals == exp.model.cache.count.ran


def test_the_uncached_reference_is_the_same_run_without_its_cache(dit: Path, tmp_path: Path) -> None:
    overrides = ["model=local", f"model.path={dit}", "labels=[3,7]", "scheduler=ddim", "steps=10", "batch_size=2"]
    plain = diffexp.run(compose(*overrides, "metrics=uncached"), tmp_path / "plain")
    assert plain["ref_rmse"] == 0.0  # no cache: the reference is the run itself
    metrics = diffexp.run(
        compose(*overrides, "metrics=uncached", "cache=first-block", "cache.threshold=0.5"), tmp_path / "cached"
    )
    assert metrics["ref_rmse"] > 0 and metrics["reference"]["against"] == "uncached"
    assert metrics["net_evals"] < metrics["net_evals_nominal"] == 10
    assert metrics["cache"]["name"] == "first-block" and metrics["cache_name"] == "first-block0.5"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=tiny", "cache=first-block"], "cannot apply to tiny \\(UNet2DModel\\).*a UNet does not have"),
        (["model=tiny", "cache=first-block", "cache.threshold=1.5"], "cache.threshold=1.5 is outside \\[0.0, 1.0\\]"),
        (["model=tiny", "cache=pab", "cache.spatial_attention_block_skip_range=0"], "is outside \\[1, 100\\]"),
        (["model=tiny", "cache.name=nope"], "cache=nope is unknown"),
    ],
)
def test_bad_caches_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(DiffexpError, match=message):
        diffexp.prepare(compose(*overrides))


def test_mag_cache_without_ratios_and_faster_cache_over_the_first_step_are_refused(dit: Path) -> None:
    with pytest.raises(DiffexpError, match="cache=mag needs the magnitude ratios"):
        run(dit, "cache=mag")
    with pytest.raises(DiffexpError, match="skip the attention at the first step"):
        run(dit, "cache=faster", "cache.spatial_attention_timestep_skip_range=[-1,1000]")
    exp = run(dit, "cache=mag", f"cache.mag_ratios=[{','.join(['1.0'] * 10)}]", "cache.threshold=0.5")
    assert torch.isfinite(sample(exp.steps()).x).all() and exp.model.cache.count.nominal == 10


def test_vae_keys_set_the_decoder_and_are_refused_on_a_pixel_model(dit: Path) -> None:
    exp = run(dit, "vae_tiling=true", "vae_slicing=true", "steps=2")
    vae = exp.loaded.latent.vae
    assert vae.use_tiling and vae.use_slicing
    assert not run(dit, "steps=2").loaded.latent.vae.use_tiling  # set every run, off again
    with pytest.raises(DiffexpError, match=r"vae_tiling=true applies to latent models.*pixel-space model"):
        diffexp.prepare(compose("model=tiny", "vae_tiling=true"))


def test_cudnn_benchmark_off_cuda_is_a_no_op_said_once(caplog: pytest.LogCaptureFixture) -> None:
    from diffexp.sampling import speed

    speed._WARNED.clear()
    with caplog.at_level("WARNING", logger="diffexp"):
        for _ in range(2):
            diffexp.prepare(compose("model=tiny", "device=cpu", "cudnn_benchmark=true", "steps=2"))
    said = [r for r in caplog.records if "cudnn_benchmark=true is a no-op on cpu" in r.getMessage()]
    assert len(said) == 1 and not torch.backends.cudnn.benchmark


def test_a_cache_with_compile_is_refused(dit: Path) -> None:
    with pytest.raises(DiffexpError, match="cannot combine with compile=default"):
        run(dit, "cache=first-block", "compile=default")


def test_first_block_cache_decides_per_batch_and_mag_cache_per_step(dit: Path) -> None:
    # a known limit: first-block cache compares the whole batch's residual change with the threshold, so sample 0
    # drawn alone and sample 0 drawn beside sample 1 skip different passes; without a cache they agree
    def first(cache: list[str], batch: int) -> tuple[torch.Tensor, int]:
        exp = run(dit, f"batch_size={batch}", *cache)
        final = sample(exp.steps())
        return final.x[0], final.net_evals

    alone, together = first([], 1)[0], first([], 2)[0]
    assert torch.allclose(alone, together, atol=1e-5)
    cached = ["cache=first-block", "cache.threshold=0.3"]
    (alone, ran_alone), (together, ran_together) = first(cached, 1), first(cached, 2)
    assert ran_alone != ran_together and (alone - together).abs().max().item() > 1e-3
    # MagCache decides from the checkpoint's magnitude ratios and the step alone: the same passes for any batch
    mag = ["cache=mag", f"cache.mag_ratios=[{','.join(['1.1'] * 10)}]", "cache.threshold=0.5"]
    (alone, ran_alone), (together, ran_together) = first(mag, 1), first(mag, 2)
    assert ran_alone == ran_together < 10 and torch.allclose(alone, together, atol=1e-5)
