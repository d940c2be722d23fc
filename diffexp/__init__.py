"""diffexp: compare diffusers schedulers on one model, step by step.

    import diffexp
    exp = diffexp.prepare(diffexp.compose(["scheduler=ddim", "steps=30"]))
    for s in exp.steps():           # one model call at a time
        if s.snapshot:
            print(s.step, s.nfe, s.timestep, s.x.shape, s.x0.shape)

Names load on first use, so ``import diffexp.config`` stays light (no torch) for fast config errors.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DiffexpError": "diffexp.errors",
    "NonFiniteError": "diffexp.errors",
    "LoadedModel": "diffexp.models",
    "load_model": "diffexp.models",
    "Experiment": "diffexp.runner",
    "compose": "diffexp.runner",
    "prepare": "diffexp.runner",
    "run": "diffexp.runner",
    "CountingModel": "diffexp.sampler",
    "StepState": "diffexp.sampler",
    "initial_noise": "diffexp.sampler",
    "iter_steps": "diffexp.sampler",
    "sample": "diffexp.sampler",
    "SCHEDULERS": "diffexp.schedulers",
    "build_scheduler": "diffexp.schedulers",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffexp' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
