"""The memory check before sampling: a chunk of ``batch_size`` samples that cannot fit on the device is refused
before the first step, from the largest activation of one sample's model call."""

from __future__ import annotations

import torch

from diffexp.errors import DiffexpError
from diffexp.sampling.adapters import Adapter
from diffexp.sampling.device import free_memory
from diffexp.sampling.loop import initial_noise
from diffexp.sampling.models import LoadedModel
from diffexp.sampling.schedulers import BuiltScheduler


def check_memory(
    one: Adapter, loaded: LoadedModel, device: torch.device, batch_size: int, built: BuiltScheduler
) -> None:
    """Refuse a chunk that cannot fit, before sampling: a lower bound of what a chunk needs is the largest
    activation of one sample's model call, twice (a layer's input and output), times ``batch_size``."""
    limit = free_memory(device)
    if limit is None:
        return
    largest = 0

    def record(_module: torch.nn.Module, _inputs: object, output: object) -> None:
        nonlocal largest
        if isinstance(output, torch.Tensor):
            largest = max(largest, output.numel() * output.element_size())

    leaves = [m for m in one.module.modules() if next(m.children(), None) is None]
    hooks = [m.register_forward_hook(record) for m in leaves or [one.module]]
    noise, _ = initial_noise(loaded.sample_shape, 0, 1, device)
    try:
        with torch.inference_mode():
            one(noise, built.scheduler.timesteps[0])
    finally:
        for hook in hooks:
            hook.remove()
    needed = 2 * largest * batch_size
    if needed > limit:
        raise DiffexpError(
            f"batch_size={batch_size} cannot fit on {device}: a chunk needs at least {needed / 2**30:.1f} GiB "
            f"(the largest activation of one sample, {largest / 2**20:.1f} MiB, twice, times {batch_size}), and "
            f"{limit / 2**30:.1f} GiB are free. Lower batch_size (num_samples sets how many samples the run makes)."
        )
