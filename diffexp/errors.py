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

    def __init__(self, step: int, call: int, what: str) -> None:
        self.step = step
        self.call = call
        super().__init__(
            f"NaN/Inf at step {step} (model call {call}): the {what} is no longer finite. This scheduler "
            "and step count diverge on this model; try more steps or other options."
        )


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
