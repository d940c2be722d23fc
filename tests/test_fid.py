"""FID: Inception weights read without running code, real statistics from an .npz, and FID stated with its n."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import compose, run_main
from PIL import Image
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torchmetrics.image.fid import _compute_fid

from diffexp.errors import DiffexpError
from diffexp.images import to_uint8
from diffexp.metrics.features import FeatureNet, feature_net
from diffexp.metrics.fid import fid_kid
from diffexp.metrics.inception import INCEPTION_FILES
from diffexp.metrics.real_stats import write_stats
from diffexp.metrics.residual_noise import digits_limit
from diffexp.metrics.suite import STATED_WITH
from diffexp.report.grid import caption
from diffexp.report.jobs import Job, label_rows
from diffexp.report.tables import table_rows
from diffexp.runner.run import run
from diffexp.sampling.ideal import digits_images

CPU = torch.device("cpu")


def _run(tmp_path: Path, name: str, *overrides: str) -> dict[str, Any]:
    cfg = compose("model=digits-ideal", f"metrics.cache_dir={tmp_path / 'cache'}", "steps=5", *overrides)
    return run(cfg, tmp_path / name)


def _digits_net(cache: Path) -> FeatureNet:
    return feature_net(compose().metrics.fid, CPU, cache)


# --- Inception weights: read as tensors only --------------------------------------------------------------


class Payload:
    """Unpickling this calls Path.write_text(marker, "ran"): code run by loading a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (self.marker, "ran"))


class RandomInception(FeatureExtractorInceptionV3):
    """torch-fidelity's InceptionV3 left at its random initialisation: a state dict of the right structure."""

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        return None


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight InceptionV3 state dict saved as torch-fidelity saves it (not the standard weights)."""
    folder = tmp_path_factory.mktemp("inception")
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({}, Path(tmp) / "empty.pth")
        net = RandomInception("inception-v3-compat", ["2048"], feature_extractor_weights_path=f"{tmp}/empty.pth")
    torch.save(net.state_dict(), folder / "random-inception.pth")
    return folder / "random-inception.pth"


@pytest.mark.parametrize("where", ["path", "cache"])
def test_a_pickle_payload_as_inception_weights_is_refused_and_never_runs(tmp_path: Path, where: str) -> None:
    marker = tmp_path / "marker"
    payload = tmp_path / "cache" / "fid" / INCEPTION_FILES[0] if where == "cache" else tmp_path / "weights.pth"
    payload.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"Conv2d_1a_3x3.conv.weight": Payload(marker)}, payload)
    overrides = ["metrics=fid", "metrics.fid.features=inception"]
    overrides += [f"metrics.fid.inception_weights={payload}"] if where == "path" else []
    with pytest.raises(DiffexpError) as caught:
        _run(tmp_path, "run", *overrides)
    message = str(caught.value)
    assert str(payload) in message and "not a plain state dict" in message and "Nothing in it was executed" in message
    assert "getattr" in message and "offline" not in message and "\n" not in message
    assert not marker.exists()
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "failed"
    torch.load(payload, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.read_text() == "ran"


def test_inception_weights_from_a_local_state_dict(tmp_path: Path, inception_file: Path) -> None:
    cfg = compose("metrics=fid", "metrics.fid.features=inception", f"metrics.fid.inception_weights={inception_file}")
    net = feature_net(cfg.metrics.fid, CPU, tmp_path)
    assert net.dim == 2048 and net.name.startswith("inception-v3-compat 2048 @")  # not the standard file: named
    features = net.features(torch.rand(2, 1, 16, 16) * 2 - 1)
    assert features.shape == (2, 2048) and features.isfinite().all()
    # found in the cache folder under its standard name, without being configured
    (tmp_path / "fid").mkdir()
    (tmp_path / "fid" / INCEPTION_FILES[1]).symlink_to(inception_file)
    assert feature_net(compose("metrics.fid.features=inception").metrics.fid, CPU, tmp_path).name == net.name


@pytest.mark.parametrize(
    "content,message",
    [({"fc.weight": torch.zeros(2)}, "not InceptionV3's"), (torch.zeros(3), "holds Tensor"), ([1, 2], "holds list")],
)
def test_a_weight_file_that_is_not_inceptions_state_dict_is_refused(tmp_path: Path, content: Any, message: str) -> None:
    torch.save(content, tmp_path / "w.pth")
    cfg = compose("metrics.fid.features=inception", f"metrics.fid.inception_weights={tmp_path / 'w.pth'}")
    with pytest.raises(DiffexpError, match=message):
        feature_net(cfg.metrics.fid, CPU, tmp_path)


# --- real statistics from an .npz -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 1797 scikit-learn digits as 32x32 PNGs."""
    folder = tmp_path_factory.mktemp("digits")
    for k, image in enumerate(to_uint8(digits_images(32))):
        Image.fromarray(image[..., 0]).save(folder / f"{k:04d}.png")
    return folder


def test_fid_from_npz_statistics_equals_fid_from_the_image_folder(tmp_path: Path, digits_folder: Path) -> None:
    net = _digits_net(tmp_path)
    stats = tmp_path / "digits.npz"
    info = write_stats(stats, net, str(digits_folder), (1, 32, 32))
    assert info == {"n": 1797, "features": net.name, "size": 32, "channels": 1}
    gen = torch.Generator().manual_seed(0)
    samples = (digits_images(32)[:300] + 0.3 * torch.randn(300, 1, 32, 32, generator=gen)).clamp(-1, 1)
    fake = net.features(samples)
    from_folder = fid_kid(fake, net, str(digits_folder), (1, 32, 32), tmp_path, kid_subsets=10)
    from_npz = fid_kid(fake, net, str(stats), (1, 32, 32), tmp_path)
    assert from_folder["fid"] > 1  # a real distance, not a trivially equal zero
    assert from_npz["fid"] == pytest.approx(from_folder["fid"], abs=1e-4), (from_npz["fid"], from_folder["fid"])
    assert from_npz["fid_n"] == from_folder["fid_n"] == 300 and from_npz["fid_n_real"] == from_folder["fid_n_real"]
    assert from_npz["fid_n_real"] == 1797 and from_npz["fid_features"] == net.name == from_folder["fid_features"]
    # KID needs real features: left out of an .npz real set, with the reason
    assert "kid_mean" in from_folder and "kid_mean" not in from_npz and "KID needs" in from_npz["kid_left_out"]
    # torchmetrics' own FID formula on the two sets' mean and covariance gives the same value
    feats = net.features(samples).numpy()
    with np.load(stats) as f:
        mu, sigma = (torch.from_numpy(f[k]) for k in ("mu", "sigma"))
    direct = _compute_fid(torch.from_numpy(feats.mean(0)), torch.from_numpy(np.cov(feats, rowvar=False)), mu, sigma)
    assert from_npz["fid"] == pytest.approx(direct.item(), abs=1e-4)
    # pytorch-fid's and clean-fid's files hold mu and sigma only: the same FID, n unknown
    np.savez(tmp_path / "plain.npz", mu=mu.numpy(), sigma=sigma.numpy())
    plain = fid_kid(fake, net, str(tmp_path / "plain.npz"), (1, 32, 32), tmp_path)
    assert plain["fid"] == pytest.approx(from_npz["fid"], abs=1e-6) and plain["fid_n_real"] is None


def _stats(path: Path, d: int, **extra: Any) -> Path:
    np.savez(path, mu=np.zeros(d), sigma=np.eye(d), **extra)
    return path


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: _stats(p, 2048), "2048-d features, but the feature network .* gives 64-d"),
        (lambda p: _stats(p, 64, features=np.array("inception-v3-compat 2048")), "meaningful only within one"),
        (lambda p: np.savez(p, m=np.zeros(3)), "not 'mu' and 'sigma'"),
        (lambda p: np.savez(p, mu=np.zeros(64), sigma=np.zeros(64)), "d x d covariance"),
        (lambda p: p.write_text("text"), "cannot be read as an .npz"),
    ],
)
def test_bad_real_statistics_fail_before_sampling(tmp_path: Path, make: Any, message: str) -> None:
    make(tmp_path / "real.npz")
    with pytest.raises(DiffexpError, match=message):
        _run(tmp_path, "bad", "metrics=fid", f"metrics.fid.real={tmp_path / 'real.npz'}")
    assert not (tmp_path / "bad" / "steps.jsonl").exists()


def test_a_run_against_npz_statistics_records_fid_its_counts_and_no_kid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stats = tmp_path / "digits.npz"
    args = ["digits", str(stats), "--features", "digits", "--cache-dir", str(tmp_path)]
    done = run_main("scripts/fid_stats.py", args, tmp_path, monkeypatch)
    assert done.returncode == 0, done.stderr
    assert "1797 images" in done.stdout
    with np.load(stats) as saved:  # the residual-noise limit travels with the statistics
        assert float(saved["residual_noise_p99"]) == pytest.approx(digits_limit(), rel=1e-6)
    metrics = _run(tmp_path, "run", "metrics=fid", "batch_size=6", f"metrics.fid.real={stats}")
    assert metrics["fid"] > 0 and metrics["fid_n"] == 6 and metrics["fid_n_real"] == 1797
    assert metrics["fid_features"].startswith("digits-cnn@") and metrics["fid_features"].endswith(" 64")
    assert "kid_mean" not in metrics and str(stats) in metrics["kid_left_out"]
    bad = run_main("scripts/fid_stats.py", [str(tmp_path / "missing"), str(tmp_path / "x.npz")], tmp_path, monkeypatch)
    assert bad.returncode == 2 and "diffexp:" in bad.stderr and "Traceback" not in bad.stderr


# --- FID is shown with its n and network -------------------------------------------------------------------


def test_the_report_states_fids_n_and_feature_network() -> None:
    config = {"scheduler": {"name": "ddim"}, "steps": 10, "seed": 0, "model": {"name": "tiny"}}
    metrics = {"nfe": 10, "wall_s": 0.5, "fid": 5.61, "fid_n": 200, "fid_features": "digits-cnn@ab12cd34 64"}
    job = Job(None, 0, "finished", config, metrics)
    assert caption(job, ["fid"], stated=STATED_WITH) == "NFE 10 · 500 ms\nfid 5.61 (n 200)\ndigits-cnn@ab12cd34 64"
    label_rows([job])
    columns, rows = table_rows([job], ["fid"], Path("."), STATED_WITH)
    assert columns.index("fid_n") == columns.index("fid") + 1 and rows[0]["fid_features"] == metrics["fid_features"]
