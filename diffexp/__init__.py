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
    "load_samples": "diffexp.samples",
    "NonFiniteError": "diffexp.errors",
    "LoadedModel": "diffexp.sampling.models",
    "load_model": "diffexp.sampling.models",
    "Experiment": "diffexp.sampling.experiment",
    "compose": "diffexp.settings",
    "read_settings": "diffexp.settings",
    "RunSettings": "diffexp.settings",
    "prepare": "diffexp.sampling.experiment",
    "run": "diffexp.runner.run",
    "Adapter": "diffexp.sampling.adapters",
    "pixel_adapter": "diffexp.sampling.adapters",
    "StepState": "diffexp.sampling.loop",
    "initial_noise": "diffexp.sampling.loop",
    "iter_steps": "diffexp.sampling.loop",
    "sample": "diffexp.sampling.loop",
    "SCHEDULERS": "diffexp.catalog",
    "build_scheduler": "diffexp.sampling.schedulers",
}
__all__ = sorted(_EXPORTS)

# The layers, bottom to top: a module imports only from its own layer or those below, also inside functions
# (tests/test_architecture.py checks it, and that no import circle exists).
LAYERS: tuple[tuple[str, ...], ...] = (
    # errors; on-disk formats; image grids; signals; the commands' start-up; config-named classes and numbers checked
    (
        "diffexp.errors",
        "diffexp.folders",
        "diffexp.images",
        "diffexp.samples",
        "diffexp.signals",
        "diffexp.startup",
        "diffexp.targets",
        "diffexp.numbers",
    ),
    # the schema (and its schedule group); refused scheduler names; scheduler files; guidance files; the typed run
    (
        "diffexp.guidance_settings",
        "diffexp.naming",
        "diffexp.config",
        "diffexp.cache_settings",
        "diffexp.schedule_config",
        "diffexp.refused",
        "diffexp.catalog",
        "diffexp.graph_settings",
        "diffexp.methods",
        "diffexp.settings",
    ),
    ("diffexp.sampling",),  # the loop, schedulers, models, noise, the experiment
    ("diffexp.metrics",),  # the Metric contract and each metric
    ("diffexp.tracking",),  # the W&B session policy and the offline reader
    ("diffexp.runner",),  # one run: observers, the loop driven, the summary
    ("diffexp.report",),  # the comparison report of a sweep
    ("diffexp.sweep",),  # Hydra callbacks, jobs, the convergence study
    ("diffexp.training",),  # training a UNet
)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffexp' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
