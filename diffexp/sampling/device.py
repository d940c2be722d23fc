"""Device and precision: resolve what the user asked for, or say clearly why it can't be had."""

from __future__ import annotations

import os
import re
import resource
import sys
import time
from pathlib import Path

import torch

from diffexp.config import Precision
from diffexp.errors import DiffexpError

DTYPES = {
    Precision.fp32: torch.float32,
    Precision.tf32: torch.float32,  # float32 weights; the matmuls in TF32 (diffexp.sampling.speed)
    Precision.fp16: torch.float16,
    Precision.bf16: torch.bfloat16,
}


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU; an explicit device must exist."""
    name = name.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if re.fullmatch(r"cuda(:\d+)?", name):
        if not torch.cuda.is_available():
            raise DiffexpError(
                f"device={name} was asked for, but this machine has no usable CUDA GPU (torch "
                f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}). Use device=cpu or device=auto."
            )
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise DiffexpError(
                f"device={name} was asked for, but only {torch.cuda.device_count()} CUDA device(s) exist "
                f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})."
            )
        return torch.device(name)
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise DiffexpError(
                "device=mps was asked for, but Apple's MPS backend is not available here. Use device=cpu."
            )
        return torch.device("mps")
    raise DiffexpError(f"Unknown device '{name}'. Use one of: auto, cpu, cuda, cuda:N, mps.")


def resolve_dtype(precision: Precision | str) -> torch.dtype:
    return DTYPES[Precision(precision)]


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock times measure the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated memory since the last reset. CPU: the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine()


def process_age_s() -> float | None:
    """Seconds since this process started (Linux: its start time in /proc against the boot clock, 10 ms
    resolution; elsewhere psutil's, where installed); None where neither is known."""
    try:
        with open(f"/proc/{os.getpid()}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, after the pid and the name
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil

        return time.time() - psutil.Process().create_time()
    except Exception:  # not installed, or no access
        return None


def free_memory(device: torch.device) -> int | None:
    """Bytes free for a chunk: the GPU's free memory, or the machine's available memory; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if device.type == "cpu" and meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None
