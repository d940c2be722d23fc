"""Speed settings of a run: TF32, channels-last, SDPA attention and torch.compile of the network in the adapter.

Each is refused, with the reason, where the device cannot do it. Compilation happens in warm-up calls before
the timed loop and is timed apart (``compile_s``). A compiled network is kept for the life of the process: the jobs
of a sweep that Hydra's basic launcher runs in one process, with the same model, shape and settings, compile once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

from diffexp.config import Precision
from diffexp.errors import DiffexpError
from diffexp.sampling.device import synchronize
from diffexp.sampling.network import Network
from diffexp.settings import RunSettings

log = logging.getLogger("diffexp")
_WARNED: list[bool] = []  # cudnn_benchmark's no-op is said once per process

# (identity of the model, device, dtype, input shape, guidance, mode, channels_last) -> (network, compiled network)
_COMPILED: dict[Hashable, tuple[torch.nn.Module, Callable[..., object]]] = {}


@dataclass
class SpeedRecord:
    """What is in force, for metrics.json and W&B."""

    precision: str
    channels_last: bool
    compile: str | None  # torch.compile's mode, None when not compiled
    attention: list[str] = field(default_factory=list)  # the attention processors of the network (diffusers')
    compile_s: float | None = None  # the warm-up calls that compile; 0 when the process had compiled it already
    compile_reused: bool = False
    graph: str = "none"  # graph=step: each step replayed as a CUDA graph (diffexp.sampling.graphs)
    capture_s: float | None = None  # graph=step: the time its chunks took to capture their steps


def check_precision(precision: Precision | str, device: torch.device) -> None:
    """Refuse a precision the device cannot run, before anything is loaded."""
    p = Precision(precision)
    if p == Precision.tf32 and (device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 8):
        raise DiffexpError(
            f"precision=tf32 needs a CUDA GPU with TF32 tensor cores (Ampere or newer); {device} has none. "
            "Use precision=fp32 (or bf16)."
        )
    if p == Precision.fp16 and device.type == "cpu":
        raise DiffexpError(
            "precision=fp16 is not supported on the CPU (half-precision convolutions there are slow or missing). "
            "Use precision=bf16 or fp32 on the CPU, or fp16 on a GPU."
        )


def check_compile(mode: str | None, device: torch.device) -> None:
    if mode == "reduce-overhead" and device.type != "cuda":
        raise DiffexpError(
            f"compile=reduce-overhead records CUDA graphs, which need a CUDA device; this run is on {device}. "
            "Use compile=default or compile=max-autotune there."
        )


def check_speed_keys(run: RunSettings, device: torch.device) -> None:
    """Precision and compile mode on this device; cudnn_benchmark (a no-op off CUDA, said once); graph=step (CUDA
    only); a cache, refused with compilation."""
    check_precision(run.precision, device)
    check_compile(run.compile, device)
    if run.graph != "none" and device.type != "cuda":
        raise DiffexpError(
            f"graph={run.graph} captures each step as a CUDA graph, which needs a CUDA device; this run is on "
            f"{device}. Use graph=none there (the samples are the same, only slower)."
        )
    if run.cudnn_benchmark and device.type != "cuda" and not _WARNED:
        _WARNED.append(True)
        log.warning("cudnn_benchmark=true is a no-op on %s: cuDNN autotuning exists on CUDA only.", device)
    torch.backends.cudnn.benchmark = run.cudnn_benchmark and device.type == "cuda"  # process-wide: set every run
    if run.cache.enabled and run.compile:
        raise DiffexpError(
            f"cache={run.cache.name} cannot combine with compile={run.compile}: diffusers' cache hooks decide on the "
            "host, per pass, whether to run or reuse a block, which a compiled graph cannot."
        )


def set_tf32(precision: Precision | str, device: torch.device) -> None:
    """fp32 is IEEE float32 on CUDA (TF32 off, also for convolutions, which torch allows by default); tf32 turns
    TF32 on for matmuls and convolutions. Process-wide flags, so every run sets them."""
    if device.type == "cuda":
        allow = Precision(precision) == Precision.tf32
        torch.backends.cuda.matmul.allow_tf32 = allow
        torch.backends.cudnn.allow_tf32 = allow


def use_sdpa(network: torch.nn.Module) -> list[str]:
    """Every diffusers attention module on PyTorch's scaled_dot_product_attention (``AttnProcessor2_0``) where it
    computes the same thing; returns the processors in force."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    names = set()
    for module in network.modules():
        processor = getattr(module, "processor", None)
        if processor is None or not hasattr(module, "set_processor"):
            continue
        if type(processor) is AttnProcessor and getattr(module, "scale_qk", True):
            module.set_processor(AttnProcessor2_0())
        names.add(type(module.processor).__name__)
    return sorted(names)


def probe_compiler(mode: str, device: torch.device) -> None:
    """A tiny function through torch.compile first, so a missing compiler or Triton is named in seconds."""
    try:
        torch.compile(lambda v: v * 2 + 1, dynamic=False)(torch.ones(4, device=device))
    except Exception as err:  # inductor raises many types: a missing C++ compiler, no Triton, an old GPU
        raise DiffexpError(
            f"compile={mode} cannot run here: torch.compile failed on a tiny function on {device} "
            f"({type(err).__name__}: {reason(err)}). Use compile=false, or install what it names "
            "(a C++ compiler for the CPU, Triton for CUDA)."
        ) from None


def reason(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:300]


def accelerate(
    network: Network,
    warm_up: Callable[[Network], None],
    identity: Hashable,
    precision: Precision | str,
    channels_last: bool,
    mode: str | None,
    device: torch.device,
) -> tuple[Network, SpeedRecord]:
    """The network with the settings applied (``identity`` names its weights, input and guidance for the process
    cache); with ``mode``, compiled and warmed up by ``warm_up`` (every batch shape the run calls it with)."""
    record = SpeedRecord(Precision(precision).value, channels_last, mode)
    set_tf32(precision, device)
    cudagraphs = mode in ("reduce-overhead", "max-autotune") and device.type == "cuda"  # both record CUDA graphs
    key = (identity, str(device), network.dtype, mode, channels_last)
    if mode is not None and key in _COMPILED:
        module, compiled = _COMPILED[key]
        record.attention, record.compile_s, record.compile_reused = use_sdpa(module), 0.0, True
        return Network(module, compiled, channels_last, cudagraphs), record
    module = network.module
    record.attention = use_sdpa(module)
    if channels_last:
        module.to(memory_format=torch.channels_last)
    if mode is None:
        return Network(module, None, channels_last), record
    probe_compiler(mode, device)
    network = Network(module, torch.compile(module, mode=mode, dynamic=False), channels_last, cudagraphs)
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for _ in range(3 if cudagraphs else 1):  # CUDA graphs are recorded on the third call
                warm_up(network)
        synchronize(device)
    except Exception as err:
        raise DiffexpError(
            f"compile={mode} failed on {type(module).__name__} ({type(err).__name__}: {reason(err)}). "
            "Use compile=false."
        ) from None
    record.compile_s = time.perf_counter() - start
    _COMPILED[key] = (module, network.compiled)
    return network, record
