"""Bad input refused before anything runs: config-named callables, huge or non-finite requests, damaged chunks."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose

from diffexp.errors import DiffexpError
from diffexp.folders import read_status


def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim.txt"
    path.write_text("data\n")
    return path


@pytest.mark.parametrize(
    "extra",
    [
        ["+observers.x._target_=builtins.open"],  # a function, not an Observer class
        ["+observers.x._target_=diffexp.runner.progress.ProgressBar", "+observers.x.y._target_=builtins.open"],
        ["+observers.x._target_=diffexp.runner.progress.ProgressBar", "+observers.x._partial_=true"],
    ],
)
def test_an_observer_target_is_checked_before_anything_is_called(tmp_path: Path, extra: list[str]) -> None:
    from diffexp.runner.run import run

    path = victim(tmp_path)
    file = [f"+observers.x.{k}={v}" for k, v in (("file", path), ("mode", "w"))] if "open" in extra[-1] else []
    cfg = compose("model=digits-ideal", "steps=3", *extra, *file)
    with pytest.raises(DiffexpError, match=r"observers\.x") as err:
        run(cfg, tmp_path / "run")
    assert "nothing was built or called" in str(err.value)
    assert path.read_text() == "data\n"
    assert read_status(tmp_path / "run") == "failed"


def test_a_hydra_callback_target_is_checked_before_hydra_builds_it(tmp_path: Path) -> None:
    from hydra._internal.callbacks import Callbacks
    from omegaconf import OmegaConf

    from diffexp.targets import guard_hydra

    guard_hydra()  # as the commands do

    path = victim(tmp_path)
    node = {"_target_": "builtins.open", "file": str(path), "mode": "w"}
    cfg = OmegaConf.create({"hydra": {"callbacks": {"x": node}}})
    with pytest.raises(SystemExit) as stop:
        Callbacks(cfg)
    assert stop.value.code == 2
    assert path.read_text() == "data\n"
    ok = OmegaConf.create({"hydra": {"callbacks": {"f": {"_target_": "diffexp.sweep.callbacks.OutputFolder"}}}})
    assert len(Callbacks(ok).callbacks) == 1


@pytest.mark.parametrize(
    "override",
    [
        "guidance_scale=inf",
        "guidance_scale=nan",
        "guidance_rescale=-inf",
        "guidance_interval=[0.1,inf]",
        "scheduler=ddim scheduler.eta=nan",
        "model.std=inf",
        "metrics.hit_tol=nan",
        "scheduler=euler scheduler.s_noise=inf",
    ],
)
def test_a_non_finite_float_is_refused_by_name(override: str) -> None:
    from diffexp.settings import read_settings

    cfg = compose("model=digits-ideal", *override.split())
    key = override.split()[-1].split("=")[0].replace("[", "").replace("]", "")
    with pytest.raises(DiffexpError, match="must be finite") as err:
        read_settings(cfg)
    assert key.split(".")[0] in str(err.value)


def test_an_infinity_that_means_no_bound_is_kept() -> None:
    from diffexp.settings import read_settings

    read_settings(compose("model=digits-ideal", "scheduler=euler"))  # s_tmax: .inf


@pytest.mark.parametrize("override", ["height=0", "width=-8"])
def test_a_size_of_zero_is_refused_not_replaced(override: str) -> None:
    from diffexp.settings import read_settings

    with pytest.raises(DiffexpError, match=override.split("=")[0] + ".*positive"):
        read_settings(compose("model=digits-ideal", override))


def test_chunks_are_computed_on_demand() -> None:
    from diffexp.samples import Chunks

    chunks = Chunks(10**12, 1)
    assert len(chunks) == 10**12 and chunks[-1] == range(10**12 - 1, 10**12)
    assert list(Chunks(10, 4)) == [range(0, 4), range(4, 8), range(8, 10)]
    with pytest.raises(IndexError):
        Chunks(10, 4)[3]


def test_a_run_above_the_cap_is_refused_before_sampling(tmp_path: Path) -> None:
    from diffexp.runner.run import run

    cfg = compose("model=digits-ideal", "steps=3", "num_samples=1000000000000", "batch_size=1")
    with pytest.raises(DiffexpError, match="above the cap") as err:
        run(cfg, tmp_path / "run")
    assert "GiB" in str(err.value) and "model calls" in str(err.value)
    assert read_status(tmp_path / "run") == "failed"
    assert not (tmp_path / "run" / "chunks").exists()


def test_a_run_that_cannot_fit_on_disk_is_refused_before_sampling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from diffexp.runner import budget
    from diffexp.runner.run import run

    real = shutil.disk_usage(tmp_path)  # the disk's free space cannot be set: this one reports 100 kB free
    monkeypatch.setattr(budget.shutil, "disk_usage", lambda _p: real._replace(free=100_000))
    cfg = compose("model=digits-ideal", "steps=3", "num_samples=1000", "batch_size=100")
    with pytest.raises(DiffexpError, match="GiB free") as err:
        run(cfg, tmp_path / "run")
    assert "1,000 samples" in str(err.value)
    assert read_status(tmp_path / "run") == "failed"


@pytest.fixture(scope="module")
def chunked_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffexp.runner.run import run

    folder = tmp_path_factory.mktemp("chunked") / "run"
    run(compose("model=digits-ideal", "steps=2", "num_samples=12", "batch_size=4"), folder)
    return folder


def copy_run(run: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, tmp_path / "run"))


@pytest.mark.parametrize("damage", ["truncate", "delete", "flip"])
def test_a_damaged_chunk_of_a_finished_run_is_named_and_resampled(
    chunked_run: Path, tmp_path: Path, damage: str
) -> None:
    import os

    from diffexp.runner.run import run
    from diffexp.samples import load_samples

    folder = copy_run(chunked_run, tmp_path)
    before = load_samples(folder)
    chunk = folder / "chunks" / "chunk-000001.npz"
    good = folder / "chunks" / "chunk-000002.npz"
    os.utime(good, (1, 1))  # a good chunk is kept, never written again
    data = chunk.read_bytes()
    if damage == "truncate":
        chunk.write_bytes(data[: len(data) // 2])
    elif damage == "delete":
        chunk.unlink()
    else:
        chunk.write_bytes(data[:-100] + bytes(100))  # same size: only the hash tells
    with pytest.raises(DiffexpError, match=r"chunk-000001\.npz") as err:
        load_samples(folder)
    assert "Start the run again" in str(err.value)
    metrics = run(compose("model=digits-ideal", "steps=2", "num_samples=12", "batch_size=4"), folder)
    assert metrics["num_samples"] == 12 and read_status(folder) == "finished"
    assert good.stat().st_mtime == 1
    assert (load_samples(folder) == before).all()


def test_a_truncated_chunk_without_a_manifest_names_its_file(chunked_run: Path, tmp_path: Path) -> None:
    from diffexp.samples import load_samples

    folder = copy_run(chunked_run, tmp_path)
    (folder / "chunks.json").unlink()  # a run written before chunk files were recorded
    chunk = folder / "chunks" / "chunk-000000.npz"
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(DiffexpError, match=r"chunk-000000\.npz.*damaged"):
        load_samples(folder)


def test_export_names_a_damaged_chunk_and_an_npz_path_it_cannot_write(
    chunked_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import runpy

    from conftest import ROOT

    export = runpy.run_path(str(ROOT / "scripts" / "export.py"))["main"]
    folder = copy_run(chunked_run, tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert export([str(folder), "--no-png", "--npz", str(blocker / "x.npz")]) == 2
    assert f"Could not write {blocker / 'x.npz'}" in capsys.readouterr().err
    assert export([str(folder), "--no-png", "--npz", str(tmp_path / "ok.npz")]) == 0
    chunk = folder / "chunks" / "chunk-000002.npz"
    chunk.write_bytes(chunk.read_bytes()[:-10])
    assert export([str(folder), "--no-png", "--npz", str(tmp_path / "ok.npz")]) == 2
    assert "chunk-000002.npz" in capsys.readouterr().err
    assert (tmp_path / "ok.npz").stat().st_size > 0  # the earlier export is kept


def fid_stats_main() -> object:
    import runpy

    from conftest import ROOT

    return runpy.run_path(str(ROOT / "scripts" / "fid_stats.py"))["main"]


@pytest.mark.parametrize("files", [1, 3])
def test_fid_stats_on_files_that_are_not_images_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], files: int
) -> None:
    folder = tmp_path / "real"
    folder.mkdir()
    for k in range(files):
        (folder / f"{k}.png").write_text("not an image")
    assert fid_stats_main()([str(folder), str(tmp_path / "x.npz")]) == 2  # type: ignore[operator]
    err = capsys.readouterr().err
    assert "0.png is not an image" in err and "Traceback" not in err
    assert "metrics.fid.real" not in err and "1 images" not in err
    assert not (tmp_path / "x.npz").exists()


def test_fid_stats_names_its_own_argument_and_refuses_size_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main = fid_stats_main()
    assert main([str(tmp_path / "missing"), str(tmp_path / "x.npz")]) == 2  # type: ignore[operator]
    err = capsys.readouterr().err
    assert "REAL=" in err and "metrics.fid.real" not in err
    with pytest.raises(SystemExit) as stop:
        main(["digits", str(tmp_path / "x.npz"), "--size", "0"])  # type: ignore[operator]
    assert stop.value.code == 2 and "not a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


@pytest.mark.parametrize("subdir", ["../../../../x", "${hydra.job.num}/../../x", "/tmp/x"])
def test_a_sweep_subdir_that_leaves_the_sweep_folder_is_refused(
    tmp_path: Path, subdir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from diffexp.sweep.callbacks import OutputFolder

    sweep = tmp_path / "outputs" / "sweeps" / "s"
    hydra = {"sweep": {"dir": str(sweep), "subdir": subdir}, "mode": RunMode.MULTIRUN}
    config = OmegaConf.create({"hydra": hydra})
    with pytest.raises(SystemExit) as stop:
        OutputFolder().on_multirun_start(config)
    assert stop.value.code == 2 and "hydra.sweep.subdir" in capsys.readouterr().err
    job = OmegaConf.create({"hydra": {**hydra, "runtime": {"output_dir": str(tmp_path / "x")}}})
    with pytest.raises(SystemExit):
        OutputFolder().on_job_start(job)
    fine = OmegaConf.create({"hydra": {**hydra, "subdir": "0-a", "runtime": {"output_dir": str(sweep / "0-a")}}})
    fine.hydra.sweep.subdir = "0-a"
    OutputFolder().on_job_start(fine)


def test_an_interrupt_while_a_sweep_writes_its_report_says_only_the_report_was_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal

    from omegaconf import OmegaConf

    from diffexp.folders import RunStatus, record_job_folder, write_json, write_plan, write_status
    from diffexp.report import write
    from diffexp.signals import Terminated, interrupt_message
    from diffexp.sweep.callbacks import SweepReport

    sweep = tmp_path / "sweep"
    write_plan(sweep, [["steps=2"]])
    job = sweep / "0-job"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "hydra.yaml").write_text("{}\n")  # Hydra's record: a job of the sweep
    write_json(job / "metrics.json", {"label": "ddim-2"})
    write_status(job, RunStatus.finished)
    record_job_folder(sweep, 0, job)

    def signalled(_sweep_dir: Path) -> None:  # where SIGTERM lands: while the report is written
        raise Terminated(signal.SIGTERM)

    monkeypatch.setattr(write, "write_report", signalled)
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}, "runtime": {"choices": {}}}, "logger": None})
    with pytest.raises(KeyboardInterrupt) as stop:
        SweepReport().on_multirun_end(config)
    message = interrupt_message(stop.value, "each run folder records it (status interrupted)")
    assert "SIGTERM" in message and f"python scripts/compare.py {sweep} rebuilds it" in message
    assert "1 finished" in message and "status interrupted" not in message
    assert interrupt_message(Terminated(signal.SIGTERM), "X") == "stopped by SIGTERM; X"


def test_digits_features_on_colour_samples_are_refused_before_sampling(tmp_path: Path) -> None:
    from diffexp.runner.run import run

    cfg = compose("model=tiny", "steps=2", "metrics=fid", "batch_size=4")
    with pytest.raises(DiffexpError, match="features=digits does not fit this model's 3x16x16 samples"):
        run(cfg, tmp_path / "run")
    assert read_status(tmp_path / "run") == "failed"
    assert not (tmp_path / "run" / "samples.npy").exists()


@pytest.mark.parametrize(
    "conf",
    [
        {"handlers": {"x": {"class": "io.FileIO", "file": "VICTIM", "mode": "w"}}},
        {"handlers": {"x": {"()": "io.FileIO", "file": "VICTIM", "mode": "w"}}},
        {"formatters": {"x": {"class": "io.FileIO"}}},
        {"handlers": {"x": {"class": "logging.StreamHandler", "stream": {"()": "io.FileIO", "file": "VICTIM"}}}},
        {"loggers": {"a": {"x": {"()": "io.FileIO", "file": "VICTIM"}}}},
    ],
)
def test_a_logging_config_names_only_logging_classes(
    tmp_path: Path, conf: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from hydra._internal import logging_config

    from diffexp.targets import guard_hydra

    guard_hydra()  # as the commands do

    path = victim(tmp_path)
    full = {"version": 1, "root": {"handlers": []}, **json.loads(json.dumps(conf).replace("VICTIM", str(path)))}
    with pytest.raises(SystemExit) as stop:
        logging_config.configure_logging(full)
    assert stop.value.code == 2 and "nothing was built or called" in capsys.readouterr().err
    assert path.read_text() == "data\n"


def test_hydras_own_logging_configs_pass_the_check() -> None:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from diffexp.config import config_dir
    from diffexp.targets import check_logging

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name="run", overrides=[], return_hydra_config=True)
    for key in ("job_logging", "hydra_logging"):
        node = OmegaConf.to_container(cfg.hydra[key], resolve=False)  # paths need a run
        assert node["handlers"]
        check_logging(node, key)


def test_a_packaged_model_without_weights_names_the_shipped_ones_and_its_recipe() -> None:
    import torch

    from diffexp.config import WEIGHTS_DIR, config_dir
    from diffexp.sampling.models import load_model

    with pytest.raises(DiffexpError) as err:
        load_model(compose("model=digits-unet", "model.path=digits-nothing").model, torch.device("cpu"))
    assert "digits-unet" in str(err.value) and "model_index.json" not in str(err.value)
    assert "train.py" not in str(err.value)  # no recipe of that name
    recipe_only = [p.stem[len("train-") :] for p in (config_dir() / ".").glob("train-digits-*.yaml")]
    unshipped = [name for name in recipe_only if not (WEIGHTS_DIR / name / "model_index.json").is_file()]
    for name in unshipped:  # a recipe whose weights are not in the package: the message says how to train them
        with pytest.raises(DiffexpError, match=f"--config-name train-{name}"):
            load_model(compose("model=digits-unet", f"model.path={name}").model, torch.device("cpu"))
