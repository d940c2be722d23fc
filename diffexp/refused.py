"""Scheduler names and diffusers classes that cannot drive a DDPM-style UNet, and why (``diffexp.catalog``)."""

from __future__ import annotations

# diffusers schedulers that cannot drive such a model, and why
REFUSED: dict[str, str] = {
    "EDMEulerScheduler": "it uses EDM timestep and output scaling",
    "EDMDPMSolverMultistepScheduler": "it uses EDM timestep and output scaling",
    "IPNDMScheduler": "it expects continuous time in [0, 1]",
    "LCMScheduler": "it is only for consistency-distilled models",
    "TCDScheduler": "it is only for trajectory-consistency-distilled models",
    "ScoreSdeVeScheduler": "it is a variance-exploding score-SDE sampler",
    "CMStochasticIterativeScheduler": "it is only for consistency models",
    "RePaintScheduler": "it inpaints and needs a mask",
    "UnCLIPScheduler": "it is specific to unCLIP",
    "FlowMatchLCMScheduler": "it is for flow-matching models",
    "CogVideoXDDIMScheduler": "it is specific to CogVideoX",
    "CogVideoXDPMScheduler": "it is specific to CogVideoX",
    "DDIMInverseScheduler": "it inverts images into noise",
    "DPMSolverMultistepInverseScheduler": "it inverts images into noise",
    "AmusedScheduler": "it samples discrete tokens",
    "VQDiffusionScheduler": "it samples discrete tokens",
}
# short names people try for the refused ones
REFUSED_NAMES: dict[str, str] = {
    "edm-euler": "EDMEulerScheduler",
    "edm-dpmsolver": "EDMDPMSolverMultistepScheduler",
    "ipndm": "IPNDMScheduler",
    "lcm": "LCMScheduler",
    "tcd": "TCDScheduler",
    "score-sde-ve": "ScoreSdeVeScheduler",
    "consistency": "CMStochasticIterativeScheduler",
    "repaint": "RePaintScheduler",
    "unclip": "UnCLIPScheduler",
    "ddim-inverse": "DDIMInverseScheduler",
}
