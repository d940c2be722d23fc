"""scripts/export.py: a finished run's samples as PNGs and as guided-diffusion's .npz, on a real tiny run."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import compose, run_main, shared_folder
from PIL import Image

import diffexp
from diffexp.folders import RunStatus, write_status
from diffexp.runner.export import export_run
from diffexp.runner.run import run


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits-unet, 3 steps, 5 samples (1x32x32), run once per session."""
    make = lambda root: run(compose("model=digits-unet", "steps=3", "batch_size=5"), root / "run")  # noqa: E731
    return shared_folder(tmp_path_factory, "export-run", make) / "run"


def test_export_writes_one_png_per_sample_and_a_uint8_nhwc_npz(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = Path(shutil.copytree(run_dir, tmp_path / "run"))  # the export goes into the run folder
    done = run_main("scripts/export.py", [str(run_dir)], tmp_path, monkeypatch)
    assert done.returncode == 0, done.stderr
    samples = diffexp.load_samples(run_dir)
    pngs = sorted((run_dir / "export" / "png").iterdir())
    assert [p.name for p in pngs] == [f"{k:06d}.png" for k in range(len(samples))] and len(samples) == 5
    with np.load(run_dir / "export" / "samples.npz") as f:
        assert f.files == ["arr_0"]
        arr = f["arr_0"]
    assert arr.shape == (5, 32, 32, 3) and arr.dtype == np.uint8
    assert (arr == arr[..., :1]).all()  # grey repeated to RGB
    # the pixels round-trip to the samples within half a grey level (1/255 in [-1, 1] units)
    back = arr[..., 0].astype(np.float64) / 127.5 - 1
    assert np.abs(back - np.clip(samples[:, 0], -1, 1)).max() <= 1 / 255 + 1e-6
    for k, p in enumerate(pngs):
        with Image.open(p) as im:
            assert im.mode == "L" and (np.asarray(im) == arr[k, ..., 0]).all()  # grey PNGs keep 1 channel


def test_export_options(run_dir: Path, tmp_path: Path) -> None:
    npz = tmp_path / "mine" / "x.npz"
    done = export_run(run_dir, tmp_path / "out", png=False, npz=npz)
    assert done.npz == npz and npz.exists() and done.png_dir is None and not (tmp_path / "out" / "png").exists()
    # a second export replaces the PNG folder: no stale files from a larger earlier export remain
    (tmp_path / "out" / "png").mkdir(parents=True)
    (tmp_path / "out" / "png" / "000099.png").write_bytes(b"stale")
    done = export_run(run_dir, tmp_path / "out", npz=False)
    assert len(list((tmp_path / "out" / "png").iterdir())) == 5 and not (tmp_path / "out" / "samples.npz").exists()


def test_export_refuses_what_is_not_a_finished_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    write_status(unfinished, RunStatus.running)
    for folder, message in ((tmp_path, "is not a run folder"), (unfinished, "has not finished (status: running)")):
        done = run_main("scripts/export.py", [str(folder)], tmp_path, monkeypatch)
        assert done.returncode == 2 and message in done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
