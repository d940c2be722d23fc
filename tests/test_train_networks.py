"""The rectified-flow objective and the pixel-space DiT: their loss follows diffusers' paths, a few steps train, the
saved folders load in diffexp and sample (flow schedulers; DiT with guidance), and bad recipes are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, compose
from diffusers import DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler
from diffusers.models.embeddings import LabelEmbedding
from omegaconf import DictConfig

import diffexp
from diffexp.config import WEIGHTS_DIR
from diffexp.errors import DiffexpError
from diffexp.sampling import models
from diffexp.sampling.adapters import DiTAdapter
from diffexp.sampling.flow import is_flow
from diffexp.training.loop import train
from diffexp.training.networks import build_network
from diffexp.training.trainer import Trainer, new_trainer, resume_trainer

CPU = torch.device("cpu")
# a DiT small enough to train a few steps in a second: 16x16 digits in 4x4 patches, two blocks of width 16
TINY_DIT = ["dit.num_layers=2", "dit.num_attention_heads=2", "dit.attention_head_dim=8"]


def flow_cfg(*overrides: str) -> DictConfig:
    return diffexp.compose([*TINY, *overrides], config_name="train-digits-flow")


def dit_cfg(*overrides: str) -> DictConfig:
    return diffexp.compose([*TINY, *TINY_DIT, *overrides], config_name="train-digits-dit")


def fixed_batch_improves(trainer: Trainer, labels: torch.Tensor | None = None, steps: int = 15) -> tuple[float, float]:
    """The loss on one fixed batch (same sigma, noise and dropout) before and after ``steps`` training steps."""
    batch = diffexp.sampling.ideal.digits_images(16)[:32]
    state = torch.Generator().manual_seed(123).get_state()

    def fixed_loss() -> float:
        trainer.generator.set_state(state)
        with torch.no_grad():
            return trainer.loss(batch, labels).item()

    before = fixed_loss()
    trainer.generator.manual_seed(0)
    for _ in range(steps):
        trainer.train_step()
    return before, fixed_loss()


def test_flow_loss_is_flow_match_eulers_path_and_velocity() -> None:
    trainer = new_trainer(flow_cfg(), CPU)
    assert isinstance(trainer.noise_scheduler, FlowMatchEulerDiscreteScheduler)
    assert trainer.prediction_type == "flow_prediction"
    x0 = diffexp.sampling.ideal.digits_images(16)[:8]
    seen = {}
    forward = trainer.network.forward

    def recording(sample, timestep, **kwargs):
        seen["x"], seen["t"] = sample.clone(), timestep.clone()
        return forward(sample, timestep, **kwargs)

    trainer.network.forward = recording
    trainer.generator.manual_seed(5)
    with torch.no_grad():
        loss = trainer.loss(x0)
        trainer.generator.manual_seed(5)  # the same sigma and noise, through diffusers' own scheduler
        t, sigma = trainer.draw_timesteps(8)
        eps = torch.randn(x0.shape, generator=trainer.generator)
        reference = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        xt = reference.scale_noise(x0, t, eps)
        torch.testing.assert_close(seen["x"], xt)
        torch.testing.assert_close(seen["t"], sigma * 1000)  # the timestep FlowMatchEuler passes the network
        out = forward(xt, t).sample
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(out, eps - x0))
    assert float(sigma.min()) > 0 and float(sigma.max()) <= 1


def test_logit_normal_draws_the_middle_sigmas_more_than_uniform() -> None:
    uniform = new_trainer(flow_cfg(), CPU).draw_timesteps(4000)[1]
    logit = new_trainer(flow_cfg("timestep_sampling=logit_normal"), CPU).draw_timesteps(4000)[1]
    assert abs(float(uniform.mean()) - 0.5) < 0.02 and abs(float(uniform.std()) - 12**-0.5) < 0.01
    middle = (logit - 0.5).abs() < 0.25
    assert abs(float(logit.mean()) - 0.5) < 0.02 and float(middle.float().mean()) > 0.6  # uniform: 0.5


def test_flow_training_lowers_the_loss_and_its_folder_samples_with_flow_schedulers(tmp_path: Path) -> None:
    trainer = new_trainer(flow_cfg("lr=0.003", "lr_schedule=constant"), CPU)
    before, after = fixed_batch_improves(trainer)
    assert after < 0.8 * before

    train(flow_cfg("steps=3", "sample_every=3", "sample_batch=2", "sample_steps=2"), tmp_path)
    saved = json.loads((tmp_path / "model/scheduler/scheduler_config.json").read_text())
    assert saved["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert saved["shift"] == 1.0 and saved["use_dynamic_shifting"] is False and "beta_start" not in saved
    for scheduler in ("flow-euler", "flow-heun", "dpmsolver", "unipc"):
        exp = diffexp.prepare(compose("model=local", f"model.path={tmp_path / 'model'}", f"scheduler={scheduler}",
                                      "steps=4", "num_samples=2", "batch_size=2"))  # fmt: skip
        assert is_flow(exp.loaded.scheduler_config) and exp.loaded.prediction_type == "flow_prediction"
        final = diffexp.sample(diffexp.iter_steps(exp.model, exp.built.scheduler, exp.noise, 4, exp.generators))
        assert final.x.shape == (2, 1, 16, 16) and torch.isfinite(final.x).all(), scheduler
    with pytest.raises(DiffexpError, match="cannot sample a model that predicts flow_prediction"):
        diffexp.prepare(compose("model=local", f"model.path={tmp_path / 'model'}", "scheduler=ddim", "steps=2"))


def test_dit_trains_with_label_dropout_once_per_sample() -> None:
    trainer = new_trainer(dit_cfg("lr=0.003", "lr_schedule=constant"), CPU)
    dit = trainer.network
    assert isinstance(dit, DiTTransformer2DModel) and dit.config.out_channels == dit.config.in_channels == 1
    assert dit.config.num_embeds_ada_norm == 10 and dit.config.patch_size == 4
    tables = [m for m in dit.modules() if isinstance(m, LabelEmbedding)]
    assert tables and all(m.dropout_prob == 0 and m.embedding_table.num_embeddings == 11 for m in tables)
    labels = diffexp.sampling.ideal.digits_labels()[:32]
    before, after = fixed_batch_improves(trainer, labels)
    assert after < 0.8 * before


def test_dit_folder_loads_as_a_pixel_dit_and_samples_with_guidance(tmp_path: Path) -> None:
    train(dit_cfg("steps=2", "checkpoint_every=2", "sample_every=2", "sample_batch=2", "sample_steps=2"), tmp_path)
    index = json.loads((tmp_path / "model/model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline" and index["vae"] == [None, None]
    assert not (tmp_path / "model/vae").exists() and (tmp_path / "model/transformer").is_dir()

    exp = diffexp.prepare(compose("model=local", f"model.path={tmp_path / 'model'}", "scheduler=dpmsolver", "steps=3",
                                  "labels=all", "guidance_scale=3", "num_samples=4", "batch_size=4"))  # fmt: skip
    loaded = exp.loaded
    assert loaded.kind == "class" and loaded.latent is None and (loaded.num_classes, loaded.null_class) == (10, 10)
    assert isinstance(exp.model, DiTAdapter) and exp.model.kept_channels is None
    final = diffexp.sample(diffexp.iter_steps(exp.model, exp.built.scheduler, exp.noise, 3, exp.generators))
    assert final.x.shape == (4, 1, 16, 16) and torch.isfinite(final.x).all()
    assert exp.model.net_evals == 2 * 3  # guided: both halves at every step

    trainer = resume_trainer(dit_cfg("steps=4"), CPU, tmp_path / "checkpoints/step-000002")
    assert trainer.step == 2 and isinstance(trainer.network, DiTTransformer2DModel)
    assert all(m.dropout_prob == 0 for m in trainer.network.modules() if isinstance(m, LabelEmbedding))
    with pytest.raises(DiffexpError, match="network=dit, not network=unet"):
        resume_trainer(flow_cfg("steps=4", "network=unet"), CPU, tmp_path / "checkpoints/step-000002")


@pytest.mark.parametrize("recipe", ["train-digits-flow", "train-digits-dit"])
def test_the_recipes_build_networks_of_at_most_10_mb(recipe: str) -> None:
    cfg = diffexp.compose(["logger=none", "device=cpu"], config_name=recipe)
    size = sum(p.numel() * p.element_size() for p in build_network(cfg).parameters())
    assert size <= 10 * 10**6 and cfg.dataset.sample_size == 32


@pytest.mark.parametrize(
    ("recipe", "overrides", "message"),
    [
        ("train", ["prediction_type=flow_prediction"], "trains on a FlowMatchEulerDiscreteScheduler"),
        ("train-digits-flow", ["prediction_type=v_prediction"], "does not fit noise_schedule"),
        ("train-digits-flow", ["snr_gamma=5"], "snr_gamma=5"),
        ("train-digits-flow", ["noise_schedule.use_dynamic_shifting=true"], "use_dynamic_shifting"),
        ("train-digits-flow", ["timestep_sampling=mode"], "timestep_sampling=mode"),
        ("train-digits-flow", ["logit_std=0"], "logit_std=0"),
        ("train-digits-flow", ["noise_schedule._class_name=EulerDiscreteScheduler"], "EulerDiscreteScheduler"),
        ("train", ["network=vit"], "network=vit"),
        ("train-digits-dit", ["num_classes=null", "label_dropout=0"], "set num_classes"),
        ("train-digits-dit", ["dit.patch_size=5"], "dit.patch_size=5"),
        ("train-digits-dit", ["dit.patch_size=32"], "dit.patch_size=32"),
        ("train-digits-dit", ["dit.num_layers=0"], "dit.num_layers=0"),
        ("train-digits-dit", ["+dit.in_channels=3"], "not a DiTTransformer2DModel option"),
        ("train-digits-dit", ["+dit.norm_type=layer_norm"], "not a DiTTransformer2DModel option"),
    ],
)
def test_bad_flow_or_dit_recipe_is_a_clear_error(tmp_path: Path, recipe: str, overrides: list[str], message: str):
    cfg = diffexp.compose([*TINY, *overrides], config_name=recipe)
    with pytest.raises(DiffexpError, match=message):
        train(cfg, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_pixel_dit_detection_reads_only_a_dit_pipeline_without_vae(tmp_path: Path) -> None:
    train(dit_cfg("steps=1", "checkpoint_every=1"), tmp_path / "dit")
    train(flow_cfg("steps=1", "checkpoint_every=1"), tmp_path / "flow")
    assert models.is_pixel_dit(str(tmp_path / "dit/model"))
    assert not models.is_pixel_dit(str(tmp_path / "flow/model")) and not models.is_pixel_dit(str(tmp_path))


def shipped(name: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        not (WEIGHTS_DIR / name / "model_index.json").is_file(), reason=f"diffexp/weights/{name} is not there yet"
    )


@shipped("digits-flow")
def test_shipped_digits_flow_is_a_small_flow_model() -> None:
    loaded = models.load_model(compose("model=digits-flow").model, CPU)
    assert loaded.prediction_type == "flow_prediction" and loaded.num_classes is None
    assert loaded.scheduler_config["shift"] == 1.0 and not loaded.scheduler_config.get("use_dynamic_shifting")
    weights = WEIGHTS_DIR / "digits-flow/unet/diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size <= 10 * 10**6 and loaded.sample_shape == (1, 32, 32)


@shipped("digits-dit")
def test_shipped_digits_dit_is_a_small_pixel_dit_with_a_null_class() -> None:
    loaded = models.load_model(compose("model=digits-dit").model, CPU)
    assert isinstance(loaded.model, DiTTransformer2DModel) and loaded.latent is None
    assert (loaded.num_classes, loaded.null_class) == (10, 10) and loaded.sample_shape == (1, 32, 32)
    weights = WEIGHTS_DIR / "digits-dit/transformer/diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size <= 10 * 10**6
