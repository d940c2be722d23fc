"""FID and KID of a run's samples against real images, with torchmetrics.

Both feature networks go through the same code path (diffexp/metrics/features.py): torchmetrics'
``FrechetInceptionDistance`` and ``KernelInceptionDistance`` with a feature module that takes images in [-1, 1].
- ``digits``: the small digits classifier shipped with diffexp, usable offline.
- ``inception``: torch-fidelity's InceptionV3 (2048-d pool features), the standard FID; its weights are downloaded
  on first use or read from a local file, always without running code (diffexp/metrics/inception.py).
The real set is the digits, a folder of images or precomputed statistics (diffexp/metrics/real_stats.py). Every
figure is recorded with its sample counts and feature network: FID depends on both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffexp.errors import DiffexpError
from diffexp.metrics.base import Chunk, Context, Key, Metric, Values
from diffexp.metrics.features import FeatureNet, batches, feature_net
from diffexp.metrics.real_stats import Precomputed, check_real, fid_kid_metrics, real_set
from diffexp.sampling.loop import StepState

STATED = ("fid_n", "fid_features")  # FID depends on both: shown wherever it is shown
KID_FROM_STATS = "the real set is statistics ({}): KID needs the real features themselves"


def fid_kid(
    fake: torch.Tensor,
    net: FeatureNet,
    source: str,
    shape: tuple[int, ...],
    cache_dir: Path,
    kid_subset_size: int = 100,
    kid_subsets: int = 100,
) -> dict[str, Any]:
    """FID, KID (mean and std over subsets) of the samples' features ``fake`` (N, dim; ``net.features`` of images
    of ``shape``) against the real set, with the sample counts and the feature network; KID is left out
    (``kid_left_out`` says why) for an .npz real set."""
    fake, n = fake.float(), fake.shape[0]  # the network's own float32 (net.features widens it losslessly)
    if n < 2:
        raise DiffexpError(f"FID needs at least 2 samples; this run has {n}. Raise num_samples.")
    real = real_set(net, source, tuple(shape), cache_dir)
    subset = min(kid_subset_size, n, real.n or n)
    fid, kid = fid_kid_metrics(net, subset, kid_subsets, Precomputed(net.dim))
    # start from the real states: merge_state adds them to the (empty) ones
    fid.merge_state(fid.metric_state | {k: v.to(net.device) for k, v in real.fid_state.items()})
    if real.kid_features is not None:
        kid.merge_state(kid.metric_state | {"real_features": [real.kid_features.to(net.device)]})
    with torch.inference_mode():
        for x in batches(fake, net.device):
            fid.update(x, real=False)
            if real.kid_features is not None:
                kid.update(x, real=False)
        out: dict[str, Any] = {"fid": fid.compute().item()}
        if real.kid_features is not None:
            with torch.random.fork_rng(devices=[]):  # KID draws random subsets: the same ones every time
                torch.manual_seed(0)
                kid_mean, kid_std = (v.item() for v in kid.compute())
            out |= {"kid_mean": kid_mean, "kid_std": kid_std, "kid_subset_size": subset, "kid_subsets": kid_subsets}
        else:
            out["kid_left_out"] = KID_FROM_STATS.format(source)
    return out | {"fid_n": n, "fid_n_real": real.n, "fid_features": net.name, "fid_real": source}


class FidKid(Metric):
    """``metrics.fid.enabled``: FID and KID of the run's samples (features chunk by chunk) against the real set."""

    name = "fid"
    keys = (
        Key("fid", "lower", stated_with=STATED),
        Key("kid_mean", "lower", stated_with=STATED),
        Key("kid_std"),
        Key("fid_n"),
        Key("fid_n_real"),
        Key("fid_features"),
        Key("fid_real"),
        Key("kid_subset_size"),
        Key("kid_subsets"),
        Key("kid_left_out"),
    )

    @classmethod
    def enabled(cls, ctx: Context) -> bool:
        return bool(ctx.settings.fid.enabled)

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        fcfg, total = ctx.settings.fid, ctx.run.num_samples
        if fcfg.n is not None and not 2 <= fcfg.n <= total:
            raise DiffexpError(
                f"metrics.fid.n={fcfg.n} is not allowed: FID uses the first n samples of the run, so n must be "
                f"between 2 and num_samples={total}."
            )
        if fcfg.n is None and total < 2:
            raise DiffexpError("FID needs at least 2 samples; raise num_samples (FID at small n is biased).")
        check_features_fit(str(getattr(fcfg.features, "value", fcfg.features)), ctx.run.pixel_shape)
        self.net = feature_net(fcfg, ctx.run.device, ctx.cache_dir)
        check_real(fcfg.real, self.net)

    def measure(self, chunk: Chunk, final: StepState) -> Values:
        """The features of this chunk's samples among FID's (the first ``metrics.fid.n`` of the run)."""
        used = len([k for k in chunk.samples if k < (self.ctx.settings.fid.n or self.ctx.run.num_samples)])
        return {"features": self.net.features(final.x_pixels[:used].float()).float()} if used else {}

    def final(self, values: Values) -> dict[str, Any]:
        fcfg = self.ctx.settings.fid
        return fid_kid(
            values["features"],
            self.net,
            fcfg.real,
            self.ctx.run.pixel_shape,
            self.ctx.cache_dir,
            fcfg.kid_subset_size,
            fcfg.kid_subsets,
        )


def check_features_fit(features: str, shape: tuple[int, ...]) -> None:
    """Refuse, before sampling, features that cannot describe these images: the digits network reads 1-channel
    digit images, so its FID of colour images would be a number without meaning."""
    if features == "digits" and shape[0] != 1:
        raise DiffexpError(
            f"metrics.fid.features=digits does not fit this model's {shape[0]}x{shape[1]}x{shape[2]} samples: the "
            "digits network reads 1-channel digit images. Use metrics.fid.features=inception for colour images."
        )
