"""Termination signals handled like Ctrl-C.

SIGTERM (``kill``, ``timeout``, a job scheduler's end of a job) and SIGUSR2 (sent by Slurm and submitit before a
preemption) raise ``Terminated``, a ``KeyboardInterrupt`` that names the signal. So every path that handles Ctrl-C
handles them too: the run folder says ``interrupted``, partial outputs are flushed, the W&B run is finished with a
non-zero exit code. A second signal while that cleanup runs is ignored, so a signal sent to the whole process
group and to the process itself stops it once.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR2)


class Terminated(KeyboardInterrupt):
    """A termination signal, raised where the process was, as Ctrl-C raises ``KeyboardInterrupt``."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        self.name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.name}")


def exit_code(error: KeyboardInterrupt) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number (130 for Ctrl-C)."""
    return 128 + getattr(error, "signum", signal.SIGINT)


@contextmanager
def signals_as_interrupts(signals: tuple[signal.Signals, ...] = SIGNALS) -> Iterator[None]:
    """Inside, ``signals`` raise ``Terminated`` (once); the previous handlers come back on the way out.
    Only the main thread can own signal handlers: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal raised
        if raised:
            logging.getLogger("diffexp").warning("%s again: already stopping", signal.Signals(signum).name)
            return
        raised = True
        raise Terminated(signum)

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


@contextmanager
def stop_on_signals(outputs: str) -> Iterator[None]:
    """For command-line scripts: termination signals interrupt like Ctrl-C, and an interrupt ends the process on
    one line (what stopped it, where ``outputs`` are) with exit status 128 + the signal's number."""
    try:
        with signals_as_interrupts():
            yield
    except KeyboardInterrupt as err:
        print(f"\ndiffexp: {interrupt_message(err, outputs)}", file=sys.stderr)
        exit_now(exit_code(err))


def interrupt_message(error: KeyboardInterrupt, outputs: str) -> str:
    """What stopped the process and where its outputs are; an interrupt that says what it interrupted (its
    ``outputs`` attribute, e.g. a sweep's report) says that instead."""
    return f"{str(error) or 'interrupted (Ctrl-C)'}; {getattr(error, 'outputs', None) or outputs}"


def exit_now(code: int) -> None:
    """Leave at once once an interrupt is handled (run files written, W&B finished): the exit hooks run, but
    not the interpreter's teardown of every module, which takes seconds once torch is loaded."""
    atexit._run_exitfuncs()  # W&B's teardown, logging's flush
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
