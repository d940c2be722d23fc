"""The real side of FID and KID: the scikit-learn digits, a folder of images, or precomputed statistics (.npz).

From images, torchmetrics' own real-image states are computed once per feature network, real set and resolution,
and cached in ``<cache_dir>/fid/``. An ``.npz`` holds ``mu`` and ``sigma`` as pytorch-fid and clean-fid write them
(diffexp's ``scripts/fid_stats.py`` adds ``n``, ``features``, ``size`` and ``channels``); FID then starts from the
sums those imply, so torchmetrics' own formula computes it. KID needs the real features themselves, so an .npz
gives FID only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from diffexp.errors import DiffexpError
from diffexp.folders import atomic
from diffexp.metrics.features import FeatureNet, batches

if TYPE_CHECKING:
    from torchmetrics.image.fid import FrechetInceptionDistance

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
STATS_SUFFIX = ".npz"


@dataclass
class RealSet:
    """What FID and KID compare against: FID's real states, and KID's real features where there are some."""

    source: str
    fid_state: dict[str, torch.Tensor]  # torchmetrics FID's real_features_sum, _cov_sum and _num_samples
    kid_features: torch.Tensor | None  # None: statistics only, no KID
    n: int | None  # real images; None where an .npz does not say


def is_stats(source: str) -> bool:
    return source.lower().endswith(STATS_SUFFIX)


def real_images(source: str, shape: tuple[int, ...], key: str = "metrics.fid.real") -> torch.Tensor:
    """The real set in [-1, 1] at the given channels and resolution: the digits, or a folder of images."""
    channels, size = shape[0], shape[1]
    if source == "digits":
        from diffexp.sampling.ideal import digits_images

        x = digits_images(size)
        return x.repeat(1, channels, 1, 1) if channels != 1 else x
    files = image_files(source, key)
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                v = torch.from_numpy(np.array(im.convert(mode).resize((size, size)))).float()
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise DiffexpError(f"{key}={source}: {f} cannot be read as an image ({err}); remove it.") from None
        out.append((v[None] if v.ndim == 2 else v.permute(2, 0, 1)) / 127.5 - 1)
    return torch.stack(out)


def image_files(source: str, key: str = "metrics.fid.real") -> list[Path]:
    """The image files of a folder (by suffix), each checked to open as an image; at least 2."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise DiffexpError(f"{key}={source} is neither 'digits', a folder of images nor an .npz of statistics.")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    for f in files:
        try:
            Image.open(f).close()  # reads the header only
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
            raise DiffexpError(
                f"{key}={source}: {f} is not an image PIL can read ({type(err).__name__}); remove it from the folder."
            ) from None
    if len(files) < 2:
        found = "no image" if not files else "only one image"
        raise DiffexpError(f"{key}={source} holds {found} ({', '.join(sorted(IMAGE_SUFFIXES))}); FID needs at least 2.")
    return files


def _real_key(source: str, shape: tuple[int, ...], features: str) -> str:
    if source == "digits":
        listing: Any = "digits"
    else:  # names, sizes and modification times: a changed folder gets new statistics
        listing = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in image_files(source)]
    text = json.dumps({"real": listing, "shape": list(shape), "features": features, "format": 1})
    return hashlib.sha1(text.encode()).hexdigest()[:20]


class Precomputed(nn.Module):
    """Features extracted chunk by chunk: torchmetrics' FID and KID take them as they are."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_kid_metrics(
    net: FeatureNet, kid_subset_size: int, kid_subsets: int, feature: nn.Module | None = None
) -> tuple[FrechetInceptionDistance, Any]:
    """torchmetrics' FID and KID on ``net`` (or ``feature``: e.g. ``Precomputed``), keeping their real states across
    resets. Figures are computed from gathered values in one process: no synchronisation across ranks."""
    from torchmetrics.image.fid import FrechetInceptionDistance  # torchmetrics loads only for runs with FID
    from torchmetrics.image.kid import KernelInceptionDistance

    feature = net.module if feature is None else feature
    fid = FrechetInceptionDistance(feature=feature, reset_real_features=False, sync_on_compute=False)
    with warnings.catch_warnings():  # KID keeps every feature vector in memory by design; no need to say so
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(
            feature=feature,
            subsets=kid_subsets,
            subset_size=kid_subset_size,
            reset_real_features=False,
            sync_on_compute=False,
        )
    return fid.to(net.device), kid.to(net.device)


def _image_set(net: FeatureNet, source: str, shape: tuple[int, ...], cache_dir: Path) -> RealSet:
    """FID's and KID's real-image states (torchmetrics ``metric_state``), computed once and cached."""
    path = Path(cache_dir) / "fid" / f"{_real_key(source, shape, net.name)}.safetensors"
    if not path.exists():
        fid, kid = fid_kid_metrics(net, 1, 1)
        with torch.inference_mode():
            for x in batches(real_images(source, shape), net.device):
                fid.update(x, real=True)
                kid.update(x, real=True)
        state = {f"fid.{k}": v for k, v in fid.metric_state.items() if k.startswith("real_")}
        state["kid.real_features"] = torch.cat(kid.real_features)
        state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic(path) as tmp:
            save_file(state, str(tmp), metadata={"real": source, "features": net.name})
    state = load_file(str(path))
    fid_state = {k[4:]: v for k, v in state.items() if k.startswith("fid.")}
    n = int(fid_state["real_features_num_samples"])
    return RealSet(source, fid_state, state["kid.real_features"], n)


def fid_state(mu: np.ndarray, sigma: np.ndarray, n: int) -> dict[str, torch.Tensor]:
    """FID's real states as ``update`` leaves them after n images whose features have mean mu and covariance
    sigma (unbiased, as np.cov): sum = n mu, sum of outer products = (n - 1) sigma + n mu mu^T."""
    mu_t, sigma_t = torch.from_numpy(mu).double(), torch.from_numpy(sigma).double()
    return {
        "real_features_sum": n * mu_t,
        "real_features_cov_sum": (n - 1) * sigma_t + n * torch.outer(mu_t, mu_t),
        "real_features_num_samples": torch.tensor(n, dtype=torch.long),
    }


def read_stats(source: str, net: FeatureNet, size: int | None = None) -> RealSet:
    """Precomputed statistics of the real set, checked against the feature network."""
    path = Path(source).expanduser()
    if not path.is_file():
        raise DiffexpError(f"metrics.fid.real={source} is not a file.")
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except Exception as err:  # not a zip, or object arrays (pickles), which are refused
        raise DiffexpError(f"metrics.fid.real={source} cannot be read as an .npz of arrays: {err}") from None
    if "mu" not in data or "sigma" not in data:
        raise DiffexpError(
            f"metrics.fid.real={source} holds {sorted(data)}, not 'mu' and 'sigma' (the mean and covariance of the "
            "real images' features, as pytorch-fid, clean-fid and scripts/fid_stats.py write them)."
        )
    mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    d = mu.shape[0] if mu.ndim == 1 else None
    if d is None or sigma.shape != (d, d) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise DiffexpError(
            f"metrics.fid.real={source}: mu has shape {mu.shape} and sigma {sigma.shape}; they must be a finite "
            "vector of d features and a d x d covariance."
        )
    if d != net.dim:
        raise DiffexpError(
            f"metrics.fid.real={source} holds statistics of {d}-d features, but the feature network "
            f"({net.name}) gives {net.dim}-d features: real statistics must come from the same network as the "
            f"samples' features. Write them with scripts/fid_stats.py and the same --features, or choose the "
            f"matching metrics.fid.features ({'inception' if d == 2048 else 'digits' if d == 64 else 'none fits'})."
        )
    written_by = str(data["features"]) if "features" in data else None
    if written_by is not None and written_by != net.name:
        raise DiffexpError(
            f"metrics.fid.real={source} holds statistics of the features {written_by!r}, but this run's network is "
            f"{net.name!r}; FID is meaningful only within one network. Write the statistics again with it."
        )
    if size is not None and "size" in data and int(data["size"]) != size:
        log.warning("%s holds statistics of %d px images; the samples are %d px", source, int(data["size"]), size)
    n = int(data["n"]) if "n" in data else None
    return RealSet(source, fid_state(mu, sigma, n or 2), None, n)  # any n >= 2 gives the same mean and cov


def real_set(net: FeatureNet, source: str, shape: tuple[int, ...], cache_dir: Path) -> RealSet:
    """The real set of ``metrics.fid.real``: 'digits', a folder of images or an .npz of statistics."""
    if is_stats(source):
        return read_stats(source, net, shape[-1])
    return _image_set(net, source, shape, cache_dir)


def check_real(source: str, net: FeatureNet) -> None:
    """Fail before sampling if the real set can't be read or does not fit the network."""
    if is_stats(source):
        read_stats(source, net)
    elif source != "digits":
        image_files(source)


def write_stats(
    out: Path,
    net: FeatureNet,
    source: str,
    shape: tuple[int, ...],
    key: str = "metrics.fid.real",
    extra: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The real set's ``mu`` and ``sigma`` (np.cov, as pytorch-fid computes them) in an .npz, with ``n``,
    ``features``, ``size``, ``channels`` and ``extra`` (e.g. the residual-noise limit); returns what was written
    besides mu and sigma."""
    if not is_stats(str(out)):
        raise DiffexpError(f"{out}: the statistics file must end in {STATS_SUFFIX}, which is how a run recognises it.")
    feats = net.features(real_images(source, shape, key)).numpy()
    if len(feats) < 2:
        raise DiffexpError(f"{key}={source} holds {len(feats)} image(s); statistics need at least 2.")
    info = {"n": len(feats), "features": net.name, "size": shape[-1], "channels": shape[0], **(extra or {})}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as f:  # np.savez would add .npz to a path without it
        np.savez(
            f, mu=feats.mean(axis=0), sigma=np.cov(feats, rowvar=False), **{k: np.array(v) for k, v in info.items()}
        )
    return info
