"""The on-disk format of a run's samples: ``samples.npy`` for a run of one chunk, chunk files for the rest.

A run of ``num_samples`` samples in chunks of ``batch_size`` writes ``chunks/chunk-NNNNNN.npz`` per chunk, each
written atomically by the rank that sampled it: the sample indices, the images (float32 NCHW in [-1, 1]), a latent
model's latents, every metric's per-sample values and the chunk's cost. A finished chunk is never sampled again
(resume), and the final metrics are reduced from the chunk files' values. ``load_samples(run_dir)`` returns every
sample of a run as one float32 NCHW array in [-1, 1], sample k at index k.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffexp.errors import DiffexpError
from diffexp.folders import CorruptFile, atomic, read_json, write_json

SAMPLES_FILE = "samples.npy"
LATENTS_FILE = "latents.npy"
CHUNKS_DIR = "chunks"
MANIFEST_FILE = "chunks.json"  # a chunked run's chunk files, each with its size and sha256 (written at its end)
VALUE_PREFIX = "value:"
_CHUNK_NAME = re.compile(r"chunk-(\d{6})\.npz")


def chunk_path(run_dir: Path, index: int) -> Path:
    return Path(run_dir) / CHUNKS_DIR / f"chunk-{index:06d}.npz"


class Chunks(Sequence[range]):
    """A run's sample indices in chunks of ``size`` (the last may be smaller), each computed when asked for: a
    run of many chunks never lists them all."""

    def __init__(self, num_samples: int, size: int) -> None:
        self.num_samples, self.size = int(num_samples), int(size)

    def __len__(self) -> int:
        return -(-self.num_samples // self.size)

    def __getitem__(self, i: int) -> range:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(f"chunk {i} of {len(self)}")
        first = (i % len(self)) * self.size
        return range(first, min(first + self.size, self.num_samples))

    def __iter__(self) -> Iterator[range]:
        return (self[i] for i in range(len(self)))


@dataclass
class ChunkFile:
    """A finished chunk as stored: which samples, their per-sample metric values and the chunk's cost."""

    index: int
    samples: range
    values: dict[str, np.ndarray]
    cost: dict[str, Any]
    digest: dict[str, Any] | None = None  # the file's size and sha256, taken when it was written


def write_chunk(
    run_dir: Path,
    index: int,
    samples: range,
    images: np.ndarray,
    values: dict[str, np.ndarray],
    cost: dict[str, Any],
    latents: np.ndarray | None = None,
) -> Path:
    """Store one finished chunk, atomically: it exists complete or not at all."""
    path = chunk_path(run_dir, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "index": np.arange(samples.start, samples.stop, dtype=np.int64),
        "samples": np.asarray(images, dtype=np.float32),
        "cost": np.array(json.dumps(cost)),
        **{f"{VALUE_PREFIX}{k}": np.asarray(v) for k, v in values.items()},
    }
    if latents is not None:
        arrays["latents"] = np.asarray(latents, dtype=np.float32)
    with atomic(path) as tmp:
        np.savez(tmp, **arrays)
    return path


def read_chunk(path: Path) -> ChunkFile:
    """A chunk's indices, values and cost (not its images); a damaged file is a clear error."""
    try:
        with np.load(path, allow_pickle=False) as data:
            index = data["index"]
            values = {k[len(VALUE_PREFIX) :]: data[k] for k in data.files if k.startswith(VALUE_PREFIX)}
            cost = json.loads(str(data["cost"]))
    except Exception as err:
        raise DiffexpError(f"The chunk file {path} is unreadable ({err}); delete it and start the run again.") from None
    number = _CHUNK_NAME.fullmatch(Path(path).name)
    first = int(index[0]) if len(index) else 0
    return ChunkFile(int(number.group(1)) if number else -1, range(first, first + len(index)), values, cost)


def chunk_files(run_dir: Path) -> dict[int, Path]:
    """The finished chunks of a run folder, by chunk number."""
    folder = Path(run_dir) / CHUNKS_DIR
    found = (_CHUNK_NAME.fullmatch(p.name) for p in folder.iterdir()) if folder.is_dir() else ()
    return {int(m.group(1)): folder / m.group(0) for m in found if m}


def load_samples(run_dir: Path | str, key: str = "samples") -> np.ndarray:
    """All samples of a run, float32 NCHW in [-1, 1], sample k at index k (``key="latents"``: a latent model's
    final latents). A chunked run must have every chunk: a gap is a clear error, never a silent shift."""
    run_dir = Path(run_dir)
    single = run_dir / (SAMPLES_FILE if key == "samples" else LATENTS_FILE)
    if single.is_file():
        return np.load(single).astype(np.float32, copy=False)
    files = chunk_files(run_dir)
    if not files:
        raise DiffexpError(f"{run_dir} holds no samples ({single.name} and {CHUNKS_DIR}/ are missing).")
    recorded = read_manifest(run_dir)
    parts, expected, previous = [], 0, -1
    for number in sorted(files):
        data = files[number].read_bytes()
        why = None if recorded is None else mismatch(data, recorded.pop(files[number].name, None))
        if why:
            raise DiffexpError(damage_message(run_dir, {number: why}))
        with open_chunk(files[number], data) as arrays:
            index = arrays["index"]
            if len(index) == 0 or int(index[0]) != expected:
                gone = ", ".join(chunk_path(run_dir, k).name for k in range(previous + 1, number)) or "a chunk"
                raise DiffexpError(
                    f"{run_dir} is missing samples {expected}..{int(index[0]) - 1 if len(index) else '?'} ({gone}: "
                    "not finished yet, or deleted). Start the run again with the same config and folder: resume "
                    "samples the missing chunks."
                )
            parts.append(arrays[key].astype(np.float32, copy=False))
            expected, previous = int(index[-1]) + 1, number
    if recorded:  # chunks after the last one found
        raise DiffexpError(damage_message(run_dir, {int(n[6:12]): "missing" for n in recorded}))
    return np.concatenate(parts)


def open_chunk(path: Path, data: bytes | None = None) -> Any:
    """A chunk file's arrays (``np.load``) from its bytes, or a clear error naming the file and what to do."""
    try:
        return np.load(io.BytesIO(Path(path).read_bytes() if data is None else data), allow_pickle=False)
    except Exception as err:  # a truncated or overwritten file: BadZipFile, EOFError, ValueError, OSError
        raise DiffexpError(
            f"The chunk file {path} cannot be read ({type(err).__name__}: {err}): it is damaged or cut short. "
            "Start the run again with the same config and folder: resume samples the damaged chunks again."
        ) from None


def read_manifest(run_dir: Path) -> dict[str, dict[str, Any]] | None:
    """``chunks.json``'s files (name -> size and sha256); None without one, a clear error for a damaged one."""
    try:
        manifest = read_json(Path(run_dir) / MANIFEST_FILE)
    except CorruptFile as err:
        raise DiffexpError(f"{err}. Start the run again with the same config and folder to rewrite it.") from None
    return None if manifest is None else dict(manifest.get("files") or {})


def mismatch(data: bytes, recorded: dict[str, Any] | None) -> str | None:
    """Why a chunk file's bytes differ from what was recorded when it was written; None when they match."""
    if recorded is None:
        return "not recorded when the run finished"
    if len(data) != recorded.get("bytes"):
        return f"{len(data)} bytes, {recorded.get('bytes')} when written"
    if hashlib.sha256(data).hexdigest() != recorded.get("sha256"):
        return "its sha256 differs from the one recorded when it was written"
    return None


def file_digest(path: Path) -> dict[str, Any]:
    """A file's size and sha256."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return {"bytes": Path(path).stat().st_size, "sha256": digest.hexdigest()}


def write_manifest(run_dir: Path, digests: dict[int, dict[str, Any]]) -> None:
    """``chunks.json``: every chunk file of a finished run with its size and sha256."""
    files = {chunk_path(run_dir, i).name: digests[i] for i in sorted(digests)}
    write_json(Path(run_dir) / MANIFEST_FILE, {"chunks": len(files), "files": files})


def damaged_chunks(run_dir: Path, count: int | None = None) -> dict[int, str]:
    """The chunks of a finished run that no longer verify against ``chunks.json`` (missing, another size, another
    sha256), by number, with why; without the manifest, the missing ones of ``count`` chunks."""
    run_dir = Path(run_dir)
    try:
        recorded = read_manifest(run_dir)
    except DiffexpError as err:
        return {-1: str(err)}
    found = chunk_files(run_dir)
    if recorded is None:
        expected = range(count) if count and count > 1 else range(0)
        return {i: "missing" for i in expected if i not in found}
    bad = {}
    for name, record in recorded.items():
        number = int(name[6:12])  # chunk-NNNNNN.npz
        path = found.get(number)
        why = "missing" if path is None else mismatch(path.read_bytes(), record)
        if why:
            bad[number] = why
    return bad


def damage_message(run_dir: Path, damaged: dict[int, str]) -> str:
    names = [
        f"{MANIFEST_FILE} ({why})" if i < 0 else f"{CHUNKS_DIR}/{chunk_path(run_dir, i).name} ({why})"
        for i, why in sorted(damaged.items())
    ]
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return (
        f"{run_dir} is not complete: {', '.join(names[:5])}{more} no longer match what the run wrote. Start the "
        "run again with the same config and folder: resume keeps the good chunks and samples the damaged ones again."
    )
