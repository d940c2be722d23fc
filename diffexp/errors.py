"""The one error type a user sees: a clear paragraph, no traceback."""


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
