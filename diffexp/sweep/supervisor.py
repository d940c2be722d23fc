"""The supervisor of a command-line sampling process, so that a sweep outlives a job the kernel kills.

The kernel's out-of-memory killer ends a process with SIGKILL, which no handler can catch: a basic-launcher sweep
would die with its job, leaving that job ``running`` and the later jobs never run. So ``scripts/run.py`` runs
itself as a child process and waits. When the child is killed during a job of a sweep, the supervisor starts the
same sweep again in the same folder, which resumes it: finished jobs are skipped, the job that died reads ``died``
and is tried again until it has died ``sweep.max_deaths`` times, and the later jobs run. The jobs still share one
process between deaths, so what they share (loaded models, compiled code) stays shared.

Light to import: no torch, no Hydra.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

RECORD_ENV = "DIFFEXP_SUPERVISOR_RECORD"  # in the child: the file where it notes its sweep and current job
FORWARDED = (signal.SIGTERM, signal.SIGUSR2, signal.SIGHUP)  # Ctrl-C reaches the child from the terminal itself
MAX_RESTARTS = 1000  # a bound only; each restart follows a job's death, and a job dies at most max_deaths times


def supervised() -> bool:
    """Whether this process is the supervised child (or needs no supervisor)."""
    return RECORD_ENV in os.environ


def may_sweep(argv: Sequence[str]) -> bool:
    """Whether a command line can start a sweep: ``-m``/``--multirun``, ``hydra.mode=MULTIRUN``, or an experiment
    file (which may set the mode). A single run needs no supervisor: nothing follows it in the process."""
    return any(
        a in ("-m", "--multirun") or a.replace(" ", "").lower() == "hydra.mode=multirun" or "experiment=" in a
        for a in argv
    )


def note(**fields: Any) -> None:
    """Child side: tell the supervisor where the sweep is and which job runs (``job=None`` between jobs)."""
    path = os.environ.get(RECORD_ENV)
    if not path:
        return
    record = _read(Path(path)) | fields
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(record, default=str))
    os.replace(tmp, path)


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def supervise(script: str, argv: Sequence[str]) -> int:
    """Run ``script argv`` as a child until it ends other than by a death during a sweep's job; its exit status."""
    with tempfile.TemporaryDirectory(prefix="diffexp-") as tmp:
        record = Path(tmp) / "record.json"
        env = {**os.environ, RECORD_ENV: str(record)}
        args = list(argv)
        for _ in range(MAX_RESTARTS):
            code, stopping = _run_child([sys.executable, script, *args], env)
            if code >= 0 or stopping:
                return code if code >= 0 else 128 - code
            seen = _read(record)
            name = signal.Signals(-code).name
            if not (seen.get("sweep_dir") and seen.get("job")):
                print(
                    f"\ndiffexp: the process was killed by {name}, e.g. by the kernel for lack of memory; its run "
                    "folder reads `died`.",
                    file=sys.stderr,
                )
                return 128 - code
            print(
                f"\ndiffexp: the sweep's process was killed by {name} during the job in {seen['job']}, e.g. by "
                f"the kernel for lack of memory; that job reads `died`. Resuming the sweep in {seen['sweep_dir']}: "
                "finished jobs are skipped, and a job is tried again until it has died sweep.max_deaths times.",
                file=sys.stderr,
                flush=True,
            )
            record.unlink(missing_ok=True)
            args = [*argv, f"hydra.sweep.dir={seen['sweep_dir']}"]
    return 128 + signal.SIGKILL


def _run_child(command: list[str], env: dict[str, str]) -> tuple[int, bool]:
    """The child's return code (negative: killed by that signal) and whether this process was told to stop."""
    child = subprocess.Popen(command, env=env)
    stopping = False

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the child stops on it and says so
    try:
        return child.wait(), stopping
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
