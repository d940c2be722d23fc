"""Loading k-diffusion's samplers, an optional extra (``pip install -e ".[kdiffusion]"`` and the ``--no-deps`` step
of ``make install``; README, "k-diffusion").

Only ``k_diffusion.sampling`` is used. The package's ``__init__`` imports its training stack (CLIP, dctorch, kornia,
clean-fid ...), which takes seconds and fails where ``clip`` finds no ``pkg_resources`` (setuptools 81 and later),
so the sampling module is loaded on its own, under an empty ``k_diffusion`` package, unless the package is
already imported. It needs torch, scipy, torchsde, torchdiffeq, tqdm, torchvision, pillow and safetensors.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
from types import ModuleType

from diffexp.errors import DiffexpError

KDIFFUSION_VERSION = "0.1.1.post1"  # the version tested
INSTALL_HINT = (
    f'install the extra: pip install -e ".[kdiffusion]" && pip install --no-deps k-diffusion=={KDIFFUSION_VERSION} '
    "(or make install); --no-deps because k-diffusion's dctorch pins numpy<2 (README, k-diffusion)"
)


def k_sampling() -> ModuleType:
    """``k_diffusion.sampling``, or a clear error that says how to install it."""
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise DiffexpError(f"The k-diffusion samplers need the k-diffusion package, not installed: {INSTALL_HINT}.")
    if "k_diffusion" not in sys.modules:  # an empty package: its __init__ (the training stack) is not run
        package = importlib.util.module_from_spec(importlib.machinery.ModuleSpec("k_diffusion", None, is_package=True))
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["k_diffusion"] = package
    try:
        return importlib.import_module("k_diffusion.sampling")
    except ImportError as err:
        raise DiffexpError(f"k-diffusion's sampling module cannot be imported ({err}): {INSTALL_HINT}.") from None
