"""The standard FID network: torch-fidelity's InceptionV3 (2048-d pool features), with its weights loaded safely.

Weight files are pickles, and ``torch.load(weights_only=False)``, which torch-fidelity uses, runs any code a pickle
holds. diffexp therefore reads every weight file itself with ``torch.load(weights_only=True)`` (tensors only, no
code), checks it is a plain state dict, and hands the network a copy written from those tensors alone. The file's
sha256 is compared with the known one: other weights work, but their name (``fid_features``) says so.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tempfile
from pathlib import Path

import torch
from torch import nn

from diffexp.errors import DiffexpError

log = logging.getLogger(__name__)

# pytorch-fid's and torch-fidelity's names for the same file (95,628,359 bytes), converted from TensorFlow's FID net
INCEPTION_FILES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INCEPTION_NAME = "inception-v3-compat 2048"  # fid_features of the standard weights


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A weight file as a state dict of tensors, read without running code; else a clear error naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for code or objects, others for files that are no pickle at all
        raise DiffexpError(
            f"The Inception weight file {path} is not a plain state dict of tensors, so diffexp does not load it. "
            "Weight files are read with torch.load(weights_only=True), which accepts tensors and containers "
            f"only and runs no code from the file; this one was refused ({_refusal(err)}). Nothing in it was "
            f"executed. Use the original {INCEPTION_FILES[0]} (sha256 {INCEPTION_SHA256[:16]}...), or "
            "metrics.fid.features=digits."
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        kind = type(state).__name__ if not isinstance(state, dict) else "a dict with values other than tensors"
        raise DiffexpError(
            f"The Inception weight file {path} holds {kind}, not a state dict of tensors (parameter name -> tensor) as "
            f"{INCEPTION_FILES[0]} does. Use the original file, or metrics.fid.features=digits."
        )
    return state


def _refusal(err: Exception) -> str:
    """Why torch refused a file, in one line: the unpickler's own reason where it gives one."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    found = re.search(r"WeightsUnpickler error:\s*([^.\n]+)", text)
    return (found.group(1) if found else " ".join(text.split())[:200]) or type(err).__name__


def find_weights(configured: str | None, cache_dir: Path) -> Path | None:
    """The local weight file: the configured path, else a file of the known names in ``<cache_dir>/fid/`` or in
    torch's hub cache (where torch-fidelity downloads it); None if there is none."""
    if configured is not None:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise DiffexpError(f"metrics.fid.inception_weights={configured} is not a file.")
        return path
    folders = (Path(cache_dir).expanduser() / "fid", Path(torch.hub.get_dir()) / "checkpoints")
    return next((f / name for f in folders for name in INCEPTION_FILES if (f / name).is_file()), None)


def download_weights() -> Path:
    """torch-fidelity's weights, downloaded into torch's hub cache and checked against their sha256."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILES[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(URL_INCEPTION_V3, str(path), hash_prefix=INCEPTION_SHA256, progress=False)
    except Exception as err:  # download errors come in many types; all mean "no weights here"
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise DiffexpError(
            f"FID/KID with Inception features need torch-fidelity's InceptionV3 weights ({INCEPTION_FILES[0]}), "
            f"and they could not be downloaded: {reason}. This machine may be offline. Download the file where "
            "there is internet and pass metrics.fid.inception_weights=PATH (or put it in <metrics.cache_dir>/fid/), "
            "or use metrics.fid.features=digits (diffexp's own digits network, offline; its values are not "
            "comparable with Inception FID)."
        ) from None
    return path


class InceptionFeatures(nn.Module):
    """torch-fidelity's InceptionV3 on images in [-1, 1]: grey is repeated to RGB, then uint8 as it expects."""

    num_features = 2048

    def __init__(self, state: dict[str, torch.Tensor], source: Path) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        # torch-fidelity takes a path and unpickles it freely: give it a file written from checked tensors only
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "inception.pth"
            torch.save(state, copy)
            try:
                self.net = NoTrainInceptionV3(
                    name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(copy)
                )
            except RuntimeError as err:  # load_state_dict: missing, unexpected or mis-shaped parameters
                reason = " ".join(str(err).split())[:300]
                raise DiffexpError(
                    f"The Inception weight file {source} holds a state dict, but not InceptionV3's as "
                    f"torch-fidelity builds it ({reason}). Use the original {INCEPTION_FILES[0]}."
                ) from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        pixels = ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)  # as images.to_uint8
        return self.net(pixels)


def load_inception(configured: str | None, cache_dir: Path) -> tuple[InceptionFeatures, str]:
    """The network in eval mode and its ``fid_features`` name: ``inception-v3-compat 2048`` for the standard
    weights, with ``@<sha256 prefix>`` added for any other file."""
    path = find_weights(configured, cache_dir) or download_weights()
    state = read_state_dict(path)
    module = InceptionFeatures(state, path)
    digest = sha256(path)
    name = INCEPTION_NAME
    if digest != INCEPTION_SHA256:
        name += f" @{digest[:8]}"
        log.warning("%s is not the standard FID weight file (sha256 %s...): its FID is not comparable", path, digest)
    return module.eval().requires_grad_(False), name
