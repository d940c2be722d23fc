"""Training lowers the loss; checkpoints sample as model=local and resume exactly; digits-unet loads offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose, read_wandb, run_main, train_cfg
from PIL import Image
from safetensors.torch import load_file

import diffexp
from diffexp.config import WEIGHTS_DIR
from diffexp.errors import DiffexpError
from diffexp.sampling import models
from diffexp.training.data import batch_of
from diffexp.training.loop import train
from diffexp.training.objective import drop_labels, snr_weights
from diffexp.training.trainer import checkpoints, new_trainer, resume_trainer


def test_training_steps_lower_the_loss_on_a_fixed_batch() -> None:
    trainer = new_trainer(train_cfg("lr=0.003", "lr_schedule=constant"), torch.device("cpu"))
    batch = diffexp.sampling.ideal.digits_images(16)[:32]
    state = torch.Generator().manual_seed(123).get_state()

    def fixed_loss() -> float:
        trainer.generator.set_state(state)  # the same timesteps and noise every time
        with torch.no_grad():
            return trainer.loss(batch).item()

    before = fixed_loss()
    trainer.generator.manual_seed(0)
    for _ in range(15):
        trainer.train_step()
    assert trainer.step == 15
    assert fixed_loss() < 0.7 * before


def test_min_snr_weights_are_min_snr_gamma_over_snr() -> None:
    trainer = new_trainer(train_cfg("snr_gamma=5"), torch.device("cpu"))
    abar = trainer.noise_scheduler.alphas_cumprod
    t = torch.tensor([0, 50, 200, 600, 999])
    snr = abar[t] / (1 - abar[t])
    expected = torch.minimum(snr, torch.tensor(5.0)) / snr
    torch.testing.assert_close(snr_weights(trainer.noise_scheduler, t, 5.0), expected)
    assert expected[0] < 0.01 and expected[-1] == 1  # low-noise steps count less, high-noise ones fully


@pytest.mark.parametrize("gamma", ["null", "5"])
def test_snr_gamma_weights_the_per_sample_loss(gamma: str) -> None:
    trainer = new_trainer(train_cfg(f"snr_gamma={gamma}"), torch.device("cpu"))
    batch = diffexp.sampling.ideal.digits_images(16)[:32]
    trainer.generator.manual_seed(7)
    with torch.no_grad():
        loss = trainer.loss(batch)
        trainer.generator.manual_seed(7)  # the same t and noise, by hand
        t = torch.randint(0, 1000, (32,), generator=trainer.generator)
        eps = torch.randn(batch.shape, generator=trainer.generator)
        err = (trainer.network(trainer.noise_scheduler.add_noise(batch, eps, t), t).sample - eps).pow(2).mean((1, 2, 3))
    weights = torch.ones(32) if gamma == "null" else snr_weights(trainer.noise_scheduler, t, 5.0)
    torch.testing.assert_close(loss, (weights * err).mean())
    assert gamma == "null" or (weights.min() < 0.5 and loss < err.mean())  # low-noise samples weigh less


def test_label_dropout_replaces_about_p_of_the_labels_by_the_null_class() -> None:
    labels = torch.arange(20000) % 10
    dropped = drop_labels(labels, 0.1, 10, torch.Generator().manual_seed(0))
    null = dropped == 10
    assert 0.09 < null.float().mean() < 0.11
    assert torch.equal(dropped[~null], labels[~null])  # the others keep their label
    assert torch.equal(drop_labels(labels, 0.0, 10, torch.Generator()), labels)


def test_class_conditional_loss_passes_the_dropped_labels_to_the_unet(monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = new_trainer(train_cfg("num_classes=10", "label_dropout=0.5"), torch.device("cpu"))
    assert trainer.network.config.num_class_embeds == 11
    seen: list[torch.Tensor] = []
    forward = trainer.network.forward

    def recording(x, t, class_labels=None, **kwargs):
        seen.append(class_labels)
        return forward(x, t, class_labels=class_labels, **kwargs)

    monkeypatch.setattr(trainer.network, "forward", recording)
    images, labels = batch_of(trainer.data, torch.arange(0, 1797, 7))
    assert labels is not None and torch.equal(labels, diffexp.sampling.ideal.digits_labels()[::7])
    with torch.no_grad():
        trainer.loss(images, labels)
    null = seen[0] == 10
    assert 0.3 < null.float().mean() < 0.7 and torch.equal(seen[0][~null], labels[~null])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("gamma", ["null", "5"])
def test_loss_target_follows_the_prediction_type(prediction_type: str, gamma: str) -> None:
    trainer = new_trainer(train_cfg(f"prediction_type={prediction_type}", f"snr_gamma={gamma}"), torch.device("cpu"))
    assert trainer.noise_scheduler.config.prediction_type == prediction_type
    batch = diffexp.sampling.ideal.digits_images(16)[:32]
    trainer.generator.manual_seed(3)
    with torch.no_grad():
        loss = trainer.loss(batch)
        trainer.generator.manual_seed(3)  # the same t and noise, by hand
        t = torch.randint(0, 1000, (32,), generator=trainer.generator)
        eps = torch.randn(batch.shape, generator=trainer.generator)
        abar = trainer.noise_scheduler.alphas_cumprod[t][:, None, None, None]
        xt = abar.sqrt() * batch + (1 - abar).sqrt() * eps
        target = {"epsilon": eps, "v_prediction": abar.sqrt() * eps - (1 - abar).sqrt() * batch, "sample": batch}
        err = (trainer.network(xt, t).sample - target[prediction_type]).pow(2).mean((1, 2, 3))
    snr = abar.flatten() / (1 - abar.flatten())
    clipped = snr.clamp(max=5.0)
    weights = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[prediction_type]
    if gamma == "null":
        weights = torch.ones(32)
    else:
        torch.testing.assert_close(snr_weights(trainer.noise_scheduler, t, 5.0, prediction_type), weights)
    torch.testing.assert_close(loss, (weights * err).mean(), rtol=1e-4, atol=1e-6)


def test_class_conditional_run_saves_its_classes_and_prediction_type_and_resumes(tmp_path: Path) -> None:
    cond = ("num_classes=10", "label_dropout=0.1", "prediction_type=v_prediction", "lr_schedule=constant",
            "checkpoint_every=2", "keep_checkpoints=5")  # fmt: skip
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(train_cfg("steps=4", *cond, "sample_every=4", "sample_batch=12", "sample_steps=2"), straight)
    train(train_cfg("steps=2", *cond), split)
    summary = train(train_cfg("steps=4", *cond), split)  # resumes from step 2
    assert summary["steps"] == 4 and summary["steps_this_session"] == 2
    records = [json.loads(line) for line in (straight / "train.jsonl").read_text().splitlines()]
    assert Path(records[-1]["samples"]).is_file()  # the guided-free sample grid, labels k mod 10

    unet, scheduler_config = models.load_pretrained(str(split / "model"))
    assert unet.config.num_class_embeds == 11 and scheduler_config["prediction_type"] == "v_prediction"
    saved = json.loads((split / "model/scheduler/scheduler_config.json").read_text())
    assert saved["prediction_type"] == "v_prediction"
    ema_a = load_file(straight / "model/unet/diffusion_pytorch_model.safetensors")
    ema_b = load_file(split / "model/unet/diffusion_pytorch_model.safetensors")
    assert ema_a.keys() == ema_b.keys() and all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert "class_embedding.weight" in ema_a and ema_a["class_embedding.weight"].shape[0] == 11

    # a resumed trainer is class-conditional again, and samples with class labels
    trainer = resume_trainer(train_cfg("steps=4", *cond), torch.device("cpu"), split / "checkpoints/step-000004")
    assert trainer.step == 4 and trainer.num_classes == 10 and trainer.prediction_type == "v_prediction"
    x = trainer.samples(3, 2)
    assert x.shape == (3, 1, 16, 16) and torch.isfinite(x).all()
    with pytest.raises(DiffexpError, match="num_class_embeds"):
        resume_trainer(train_cfg("steps=4"), torch.device("cpu"), split / "checkpoints/step-000004")
    with pytest.raises(DiffexpError, match="prediction_type"):
        resume_trainer(train_cfg("steps=4", "num_classes=10"), torch.device("cpu"), split / "checkpoints/step-000004")


def test_checkpoint_loads_as_model_local_and_resumes_exactly(tmp_path: Path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ("lr_schedule=constant", "checkpoint_every=2", "keep_checkpoints=5")
    train(train_cfg("steps=4", *common, "sample_every=4", "sample_batch=2", "sample_steps=2"), straight)
    train(train_cfg("steps=2", *common), split)
    summary = train(train_cfg("steps=4", *common), split)  # resumes from step 2
    assert summary["steps"] == 4 and summary["steps_this_session"] == 2
    assert [p.name for p in checkpoints(split)] == ["step-000002", "step-000004"]
    assert json.loads((split / "status.json").read_text())["status"] == "finished"
    records = [json.loads(line) for line in (straight / "train.jsonl").read_text().splitlines()]
    assert Path(records[-1]["samples"]).is_file()  # the sample grid went through the logger

    # the resumed run is the uninterrupted one: same step, weights, EMA weights and optimizer state
    a, b = (
        resume_trainer(train_cfg("steps=4", *common), torch.device("cpu"), d / "checkpoints/step-000004")
        for d in (straight, split)
    )
    assert a.step == b.step == 4
    for key, value in a.network.state_dict().items():
        torch.testing.assert_close(b.network.state_dict()[key], value, rtol=0, atol=0)
    ema_a = load_file(straight / "model/unet/diffusion_pytorch_model.safetensors")
    ema_b = load_file(split / "model/unet/diffusion_pytorch_model.safetensors")
    assert ema_a.keys() == ema_b.keys() and all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    opt_a, opt_b = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for i, s in opt_a["state"].items():
        assert s["step"] == opt_b["state"][i]["step"] == 4
        assert torch.equal(s["exp_avg"], opt_b["state"][i]["exp_avg"])
        assert torch.equal(s["exp_avg_sq"], opt_b["state"][i]["exp_avg_sq"])
    assert a.ema.optimization_step == b.ema.optimization_step == 4

    # a checkpoint is a pipeline folder that model=local samples, with the EMA weights
    exp = diffexp.prepare(compose("model=local", f"model.path={split / 'checkpoints/step-000004'}", "steps=3"))
    final = diffexp.sample(diffexp.iter_steps(exp.model, exp.built.scheduler, exp.noise, 3, exp.generators))
    assert final.x.shape == (4, 1, 16, 16) and torch.isfinite(final.x).all()
    weights = load_file(split / "checkpoints/step-000004/unet/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(v, weights[k]) for k, v in exp.loaded.model.state_dict().items())


def test_training_and_sampling_share_one_loading_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train(train_cfg("steps=2", "checkpoint_every=2"), tmp_path)
    checkpoint = tmp_path / "checkpoints/step-000002"
    loaded: list[str] = []
    real = models.load_pretrained

    def recording(source: str, revision: str | None = None, **options: object):
        loaded.append(source)
        return real(source, revision, **options)

    monkeypatch.setattr(models, "load_pretrained", recording)
    resume_trainer(train_cfg("steps=2"), torch.device("cpu"), checkpoint)
    models.load_model(compose("model=local", f"model.path={checkpoint}").model, torch.device("cpu"))
    models.load_model(compose("model=digits-unet").model, torch.device("cpu"))
    assert loaded == [str(checkpoint), str(checkpoint), str(models.WEIGHTS_DIR / "digits-unet")]


def test_digits_unet_samples_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    args = [
        "model=digits-unet",
        "scheduler=dpmsolver",
        "steps=4",
        "batch_size=2",
        "logger=none",
        f"hydra.run.dir={out}",
    ]
    result = run_main("scripts/run.py", args, tmp_path, monkeypatch)
    assert result.returncode == 0, result.stderr
    samples = np.load(out / "samples.npy")
    assert samples.shape == (2, 1, 32, 32) and np.isfinite(samples).all()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == {"name": "digits-unet", "id": "diffexp/weights/digits-unet", "revision": None}


def test_shipped_weights_are_small_safetensors_with_a_card() -> None:
    folder = models.WEIGHTS_DIR / "digits-unet"
    weights = folder / "unet/diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size <= 10 * 2**20
    assert (folder / "scheduler/scheduler_config.json").is_file() and (folder / "README.md").is_file()
    config = json.loads((folder / "scheduler/scheduler_config.json").read_text())
    for key, value in diffexp.sampling.ideal.DDPM_SCHEDULER_CONFIG.items():
        if key != "_class_name":
            assert config[key] == value, key  # the noise schedule of digits-ideal


def test_shipped_digits_cond_is_class_conditional_with_a_null_class() -> None:
    folder = WEIGHTS_DIR / "digits-cond"
    assert (folder / "unet/diffusion_pytorch_model.safetensors").stat().st_size <= 10 * 2**20
    assert (folder / "README.md").is_file()
    unet, scheduler_config = models.load_pretrained(str(folder))
    assert unet.config.num_class_embeds == 11 and scheduler_config["prediction_type"] == "sample"  # x0 (its card)
    x, t = torch.zeros(2, 1, 32, 32), torch.tensor([500, 500])
    with torch.no_grad():
        out = unet(x, t, class_labels=torch.tensor([3, 10])).sample  # a digit and the null class
    assert out.shape == x.shape and torch.isfinite(out).all() and not torch.equal(out[0], out[1])


def test_folder_dataset_trains(tmp_path: Path) -> None:
    images = tmp_path / "images" / "nested"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(images / f"{i}.png")
    summary = train(train_cfg("dataset=folder", f"dataset.path={tmp_path / 'images'}", "steps=2"), tmp_path / "out")
    assert summary["steps"] == 2
    unet, _ = models.load_pretrained(str(tmp_path / "out/model"))
    assert unet.config.in_channels == 3 and unet.config.sample_size == 16


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["dataset=folder"], "dataset.path"),
        (["dataset=folder", "dataset.path=/nonexistent"], "not a folder"),
        (["+unet.not_an_option=1"], "not a UNet2DModel option"),
        (["steps=0"], "steps=0"),
        (["snr_gamma=0"], "snr_gamma=0"),
        (["lr_schedule=wobbly"], "lr_schedule=wobbly"),
        (["prediction_type=x0"], "prediction_type=x0"),
        (["num_classes=10", "label_dropout=1.0"], "label_dropout=1.0"),
        (["num_classes=10", "label_dropout=-0.1"], "label_dropout=-0.1"),
        (["label_dropout=0.1"], "needs class-conditional"),
        (["num_classes=0"], "num_classes=0"),
        (["+unet.num_class_embeds=11"], "num_classes"),
        (["num_classes=10", "dataset=folder", "dataset.path=."], "no class labels"),
    ],
)
def test_bad_training_config_is_a_clear_error(tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(DiffexpError, match=message):
        train(train_cfg(*overrides), tmp_path)


def test_cli_error_exits_without_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["dataset=folder", f"hydra.run.dir={tmp_path / 'out'}"]
    result = run_main("scripts/train.py", args, tmp_path, monkeypatch)
    assert result.returncode == 2
    assert "dataset.path" in result.stderr and "Traceback" not in result.stderr


def test_digits_quality_tells_digits_from_noise_and_copies() -> None:
    from diffexp.metrics.digits_quality import digits_quality

    real = diffexp.sampling.ideal.digits_images(32)[::28][:64]
    q = digits_quality(real)
    assert q["classes_present"] == 10 and q["nn_distance_median"] == 0.0  # copies sit at distance 0
    noise = digits_quality(torch.randn(64, 1, 32, 32).clamp(-1, 1))
    assert noise["nn_distance_median"] > 3 * noise["training_spacing_median"]
    assert noise["recognisable_fraction"] < 0.1 < q["recognisable_fraction"]


def test_training_logs_loss_and_samples_to_wandb_through_the_logger_config(tmp_path: Path) -> None:
    cfg = train_cfg("steps=4", "log_every=2", "sample_every=4", "sample_batch=2", "sample_steps=2",
                    "logger=wandb", "logger.mode=offline")  # fmt: skip
    train(cfg, tmp_path)
    run = read_wandb(tmp_path / "wandb")  # W&B writes its file asynchronously
    assert run.run.job_type == "train" and run.exit_code == 0 and run.config["steps"] == 4
    assert [row["_step"] for row in run.history] == [2, 4]
    assert all(row["loss"] > 0 for row in run.history) and "samples" in run.history[-1]


def test_init_from_starts_from_a_trained_folder_with_a_fresh_optimiser(tmp_path: Path) -> None:
    train(train_cfg("steps=2", "num_classes=10"), tmp_path / "first")
    start = load_file(tmp_path / "first/model/unet/diffusion_pytorch_model.safetensors")
    trainer = new_trainer(train_cfg("num_classes=10", f"init_from={tmp_path / 'first/model'}"), torch.device("cpu"))
    online = trainer.network.state_dict()
    assert trainer.step == 0 and all(torch.equal(online[k], v) for k, v in start.items())
    assert not trainer.optimizer.state  # Adam's moments start afresh
    fresh = new_trainer(train_cfg("num_classes=10"), torch.device("cpu")).network.state_dict()
    assert not all(torch.equal(fresh[k], v) for k, v in start.items())  # seed-initialised weights differ
    init = f"init_from={tmp_path / 'first/model'}"
    with pytest.raises(DiffexpError, match="prediction_type=v_prediction"):
        new_trainer(train_cfg("num_classes=10", "prediction_type=v_prediction", init), torch.device("cpu"))
    with pytest.raises(DiffexpError, match="not the network"):
        new_trainer(train_cfg(init), torch.device("cpu"))  # no class embedding


def test_init_from_an_unconditional_folder_starts_a_conditional_network(tmp_path: Path) -> None:
    train(train_cfg("steps=2"), tmp_path / "uncond")
    start = load_file(tmp_path / "uncond/model/unet/diffusion_pytorch_model.safetensors")
    init = f"init_from={tmp_path / 'uncond/model'}"
    network = new_trainer(train_cfg("num_classes=10", init), torch.device("cpu")).network.state_dict()
    fresh = new_trainer(train_cfg("num_classes=10"), torch.device("cpu")).network.state_dict()
    assert all(torch.equal(network[k], v) for k, v in start.items())  # every weight it has
    assert torch.equal(network["class_embedding.weight"], fresh["class_embedding.weight"])  # the seeded one
    with pytest.raises(DiffexpError, match="not the network"):  # other layers must still match
        new_trainer(train_cfg("num_classes=10", init, "unet.block_out_channels=[4,8]"), torch.device("cpu"))
