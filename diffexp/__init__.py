"""diffexp: compare diffusers schedulers on one model, step by step.

import diffexp
exp = diffexp.prepare(diffexp.compose(["scheduler=ddim", "steps=30"]))
for s in exp.steps():           # one model call at a time
    if s.snapshot:
        print(s.step, s.nfe, s.timestep, s.x.shape, s.x0.shape)
"""

from diffexp.errors import DiffexpError, NonFiniteError
from diffexp.models import LoadedModel, load_model
from diffexp.run import Experiment, compose, prepare, run
from diffexp.sampler import CountingModel, StepState, initial_noise, iter_steps, sample
from diffexp.schedulers import SCHEDULERS, build_scheduler

__all__ = [
    "SCHEDULERS",
    "CountingModel",
    "DiffexpError",
    "Experiment",
    "LoadedModel",
    "NonFiniteError",
    "StepState",
    "build_scheduler",
    "compose",
    "initial_noise",
    "iter_steps",
    "load_model",
    "prepare",
    "run",
    "sample",
]
