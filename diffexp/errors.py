"""The one error type a user sees: a clear paragraph, no traceback."""

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn


class DiffexpError(Exception):
    """Bad input or an impossible request, explained in one paragraph."""


class NonFiniteError(DiffexpError):
    """The sample or its x0 estimate stopped being finite."""

    def __init__(self, step: int, call: int, what: str, by_model: bool = False) -> None:
        self.step = step
        self.call = call
        self.by_model = by_model
        blame = (
            "The model's output was not finite for a finite input and timestep: the model produced it, not the "
            "scheduler; check the model and its options (e.g. model.std)."
            if by_model
            else "This scheduler and step count diverge on this model; try more steps or other options."
        )
        super().__init__(f"NaN/Inf at step {step} (model call {call}): the {what} is no longer finite. {blame}")


class DeviceOutOfMemory(DiffexpError):
    """A chunk did not fit in the device's memory."""

    reason = "oom"


def exit_with(err: DiffexpError, folder: object) -> NoReturn:
    """End a command-line run on a clear message: logged, printed as one paragraph, exit status 2."""
    logging.getLogger("diffexp").error("%s", err)
    print(f"\ndiffexp: {err}\n(output folder: {folder})", file=sys.stderr)
    sys.exit(2)


@contextmanager
def exit_on_error(folder: object) -> Iterator[None]:
    """For command-line scripts: a ``DiffexpError`` inside ends the process through ``exit_with``."""
    try:
        yield
    except DiffexpError as err:
        exit_with(err, folder)
