"""Read the ``.wandb`` file of a run, offline: what W&B will show once the run is synced.

wandb has no public reader for these files. Each holds wandb's own protobuf messages
(``wandb.proto.wandb_internal_pb2.Record``) in the leveldb log framing that wandb's writer uses
(https://github.com/google/leveldb/blob/main/doc/log_format.md): a 7-byte file header
(``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each
``crc32 (uint32 LE) | length (uint16 LE) | type (uint8: FULL, FIRST, MIDDLE, LAST) | data``,
where the crc32 (zlib's) covers the type byte and the data. Checked against wandb 0.31.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

HEADER = struct.pack("<4sHB", b":W&B", 0xBEE1, 0)
BLOCK = 32768
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_chunks(data: bytes) -> Iterator[bytes]:
    """The payloads of a leveldb log (after the file header), joined across blocks."""
    pos, pending = len(HEADER), b""
    while pos + CHUNK_HEADER <= len(data):
        if BLOCK - pos % BLOCK < CHUNK_HEADER:  # a block's tail too short for a chunk header is zero padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        if crc == 0 and length == 0 and kind == 0:  # preallocated, not yet written
            break
        body = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        if len(body) < length or zlib.crc32(body, zlib.crc32(bytes([kind]))) != crc:
            raise ValueError(f"corrupt or truncated chunk at byte {pos}")
        pos += CHUNK_HEADER + length
        if kind == FULL:
            yield body
        elif kind == FIRST:
            pending = body
        elif kind == MIDDLE:
            pending += body
        elif kind == LAST:
            yield pending + body
            pending = b""
        else:
            raise ValueError(f"unknown chunk type {kind} at byte {pos}")


def read_records(path: Path) -> Iterator[pb.Record]:
    """Every record of a ``.wandb`` file, in the order written."""
    data = Path(path).read_bytes()
    if not data.startswith(HEADER):
        raise ValueError(f"{path} is not a W&B run file (header {data[:7]!r})")
    for chunk in read_chunks(data):
        record = pb.Record()
        record.ParseFromString(chunk)
        yield record


def _value(item: Any) -> Any:
    """An item's value: JSON, or for history items maybe one of the typed fields that wandb may write."""
    kind = item.WhichOneof("value") if isinstance(item, pb.HistoryItem) else None
    if kind == "json":
        return json.loads(item.json)
    if kind is not None:
        return None if kind == "none" else getattr(item, kind)
    return json.loads(item.value_json or "null")


def _update(target: dict[str, Any], items: Any) -> dict[str, Any]:
    """Apply items keyed by ``key`` or by a ``nested_key`` path (wandb-core writes ``["x", "width"]``)."""
    for item in items:
        *parents, last = list(item.nested_key) or [item.key]
        node = target
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = _value(item)
    return target


@dataclass
class OfflineRun:
    """What one ``.wandb`` file says: run settings, config, history rows, summary, metrics, exit code."""

    run: pb.RunRecord | None = None
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: list[pb.MetricRecord] = field(default_factory=list)
    exit_code: int | None = None

    @classmethod
    def read(cls, path: Path) -> OfflineRun:
        """Read one ``run-<id>.wandb`` file, or the only one under a folder."""
        path = Path(path)
        if path.is_dir():
            files = sorted(path.rglob("*.wandb"))
            if len(files) != 1:
                raise ValueError(f"expected one .wandb file under {path}, found {len(files)}")
            path = files[0]
        out = cls()
        for r in read_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                out.run = r.run
                _update(out.config, r.run.config.update)
            elif kind == "config":
                _update(out.config, r.config.update)
            elif kind == "history":
                out.history.append(_update({}, r.history.item))
            elif kind == "summary":
                _update(out.summary, r.summary.update)
                for item in r.summary.remove:
                    *parents, last = list(item.nested_key) or [item.key]
                    node = out.summary
                    for k in parents:
                        node = node.get(k, {})
                    node.pop(last, None)
            elif kind == "metric":
                out.metrics.append(r.metric)
            elif kind == "exit":
                out.exit_code = r.exit.exit_code
        return out
