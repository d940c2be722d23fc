"""FID and KID of a run's samples against real images, with torchmetrics.

Both feature networks go through the same code path: torchmetrics' ``FrechetInceptionDistance`` and
``KernelInceptionDistance`` with a feature module that takes images in [-1, 1].
- ``digits``: the small digits classifier shipped with diffexp (diffexp/features.py), usable offline.
- ``inception``: torch-fidelity's InceptionV3 (2048-d pool features), the standard FID; it needs its weights,
  downloaded on first use or given as a local file. Offline without them, diffexp says so and stops.
The real images' statistics are computed once per feature network, real set and resolution, and cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file
from torch import nn

from diffexp.config import FidFeatures
from diffexp.errors import DiffexpError
from diffexp.metrics.base import Context, Key, Metric
from diffexp.metrics.features import feature_name, load_digits_features
from diffexp.sampling.loop import StepState

if TYPE_CHECKING:
    from torchmetrics.image.fid import FrechetInceptionDistance

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"


class InceptionFeatures(nn.Module):
    """torch-fidelity's InceptionV3 on images in [-1, 1]: grey is repeated to RGB, then uint8 as it expects."""

    num_features = 2048

    def __init__(self, weights: str | None = None) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=weights
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        pixels = ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)  # as images.to_uint8
        return self.net(pixels)


@dataclass
class FeatureNet:
    module: nn.Module
    name: str  # recorded as fid_features


def feature_net(cfg: DictConfig, device: torch.device) -> FeatureNet:
    """The configured feature network, or a clear error saying why it can't be had."""
    if FidFeatures(cfg.features) == FidFeatures.digits:
        net, metadata = load_digits_features()
        return FeatureNet(net.to(device), feature_name(metadata))
    weights = cfg.inception_weights
    if weights is not None and not Path(weights).expanduser().is_file():
        raise DiffexpError(f"metrics.fid.inception_weights={weights} is not a file.")
    try:
        module = InceptionFeatures(str(Path(weights).expanduser()) if weights else None)
    except Exception as err:  # download errors come in many types; all mean "no weights here"
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise DiffexpError(
            "FID/KID with Inception features need torch-fidelity's InceptionV3 weights "
            f"({INCEPTION_FILE}), and they could not be loaded here: {reason}. This machine may be offline. "
            "Download the file where there is internet and pass metrics.fid.inception_weights=PATH, or use "
            "metrics.fid.features=digits (diffexp's own digits network, offline; its values are not "
            "comparable with Inception FID)."
        ) from None
    return FeatureNet(module.eval().requires_grad_(False).to(device), "inception-v3-compat-2048 (torch-fidelity)")


def real_images(source: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """The real set in [-1, 1] at the run's channels and resolution: the digits, or a folder of images."""
    channels, size = shape[0], shape[1]
    if source == "digits":
        from diffexp.sampling.ideal import digits_images

        x = digits_images(size)
        return x.repeat(1, channels, 1, 1) if channels != 1 else x
    files = image_files(source)
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    out = []
    for f in files:
        with Image.open(f) as im:
            v = torch.from_numpy(np.asarray(im.convert(mode).resize((size, size)))).float()
        out.append((v[None] if v.ndim == 2 else v.permute(2, 0, 1)) / 127.5 - 1)
    return torch.stack(out)


def image_files(source: str) -> list[Path]:
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise DiffexpError(f"metrics.fid.real={source} is neither 'digits' nor a folder of images.")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise DiffexpError(f"metrics.fid.real={source} holds {len(files)} images; FID needs at least 2.")
    return files


def _real_key(source: str, shape: tuple[int, int, int], features: str) -> str:
    if source == "digits":
        listing: Any = "digits"
    else:  # names, sizes and modification times: a changed folder gets new statistics
        listing = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in image_files(source)]
    text = json.dumps({"real": listing, "shape": list(shape), "features": features, "format": 1})
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def _metrics(net: FeatureNet, kid_subset_size: int, kid_subsets: int) -> tuple[FrechetInceptionDistance, Any]:
    from torchmetrics.image.fid import FrechetInceptionDistance  # torchmetrics loads only for runs with FID
    from torchmetrics.image.kid import KernelInceptionDistance

    fid = FrechetInceptionDistance(feature=net.module, reset_real_features=False)
    with warnings.catch_warnings():  # KID keeps every feature vector in memory by design; no need to say so
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(
            feature=net.module, subsets=kid_subsets, subset_size=kid_subset_size, reset_real_features=False
        )
    return fid, kid


def _batches(x: torch.Tensor, device: torch.device, size: int = 256):
    for i in range(0, len(x), size):
        yield x[i : i + size].to(device)


def real_state(net: FeatureNet, source: str, shape: tuple[int, int, int], cache_dir: Path, device: torch.device):
    """FID's and KID's real-image states (torchmetrics ``metric_state``), computed once and cached."""
    path = Path(cache_dir) / "fid" / f"{_real_key(source, shape, net.name)}.safetensors"
    if path.exists():
        return load_file(str(path)), path
    fid, kid = _metrics(net, 1, 1)
    fid, kid = fid.to(device), kid.to(device)
    with torch.inference_mode():
        for x in _batches(real_images(source, shape), device):
            fid.update(x, real=True)
            kid.update(x, real=True)
    state = {f"fid.{k}": v for k, v in fid.metric_state.items() if k.startswith("real_")}
    state["kid.real_features"] = torch.cat(kid.real_features)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"real": source, "features": net.name})
    os.replace(tmp, path)
    return state, path


def fid_kid(
    samples: torch.Tensor,
    net: FeatureNet,
    source: str,
    cache_dir: Path,
    kid_subset_size: int = 100,
    kid_subsets: int = 100,
) -> dict[str, Any]:
    """FID, KID (mean and std over subsets) of ``samples`` (N, C, H, W in [-1, 1]) against the real set."""
    n = samples.shape[0]
    if n < 2:
        raise DiffexpError(f"FID needs at least 2 samples; this run has {n}. Raise batch_size.")
    device = next(net.module.parameters()).device
    state, _ = real_state(net, source, tuple(samples.shape[1:]), cache_dir, device)
    n_real = int(state["fid.real_features_num_samples"])
    subset = min(kid_subset_size, n, n_real)
    fid, kid = _metrics(net, subset, kid_subsets)
    fid, kid = fid.to(device), kid.to(device)
    # start both metrics from the cached real states: merge_state adds them to the (empty) ones
    fid.merge_state(fid.metric_state | {k[4:]: v.to(device) for k, v in state.items() if k.startswith("fid.")})
    kid.merge_state(kid.metric_state | {"real_features": [state["kid.real_features"].to(device)]})
    with torch.inference_mode():
        for x in _batches(samples, device):
            fid.update(x, real=False)
            kid.update(x, real=False)
        value = fid.compute().item()
        with torch.random.fork_rng(devices=[]):  # KID draws random subsets: the same ones every time
            torch.manual_seed(0)
            kid_mean, kid_std = (v.item() for v in kid.compute())
    return {
        "fid": value,
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "fid_n": n,
        "fid_n_real": n_real,
        "fid_features": net.name,
        "fid_real": source,
        "kid_subset_size": subset,
        "kid_subsets": kid_subsets,
    }


def check_real(source: str) -> None:
    """Fail before sampling if the real set can't be read."""
    if source != "digits":
        image_files(source)


class FidKid(Metric):
    """``metrics.fid.enabled``: FID and KID of the final samples against the real set."""

    keys = (
        Key("fid", "lower"),
        Key("kid_mean", "lower"),
        Key("kid_std"),
        Key("fid_n"),
        Key("fid_n_real"),
        Key("fid_features"),
        Key("fid_real"),
        Key("kid_subset_size"),
        Key("kid_subsets"),
    )

    @classmethod
    def enabled(cls, ctx: Context) -> bool:
        return bool(ctx.mcfg.fid.enabled)

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        fcfg, batch = ctx.mcfg.fid, ctx.cfg.batch_size
        if fcfg.n is not None and not 2 <= fcfg.n <= batch:
            raise DiffexpError(
                f"metrics.fid.n={fcfg.n} is not allowed: FID uses the first n samples of the batch, so n must be "
                f"between 2 and batch_size={batch}."
            )
        if fcfg.n is None and batch < 2:
            raise DiffexpError("FID needs at least 2 samples; raise batch_size (FID at small n is biased).")
        check_real(fcfg.real)
        self.net = feature_net(fcfg, ctx.exp.device)

    def final(self, final: StepState) -> dict[str, Any]:
        fcfg = self.ctx.mcfg.fid
        n = fcfg.n or len(final.x_pixels)
        return fid_kid(
            final.x_pixels[:n].float(), self.net, fcfg.real, self.ctx.cache_dir, fcfg.kid_subset_size, fcfg.kid_subsets
        )
