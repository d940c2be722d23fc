"""A command's start-up, kept short: importing torch, diffusers and transformers makes millions of long-lived
objects, and every full pass of Python's cyclic garbage collector walks them all, during the imports and again
when the interpreter exits.

A command calls ``defer_collection()`` first. The runner calls ``end_startup()`` just before its first model call:
everything alive then is moved out of the collector's reach (``gc.freeze``), and collection resumes for what the
run itself makes. Where ``defer_collection`` was never called (a notebook, a library user) nothing changes.
"""

from __future__ import annotations

import gc

_deferred: list[bool] = []  # set by defer_collection, emptied by end_startup


def defer_collection() -> None:
    """No cyclic collection until ``end_startup``: nothing imported at start-up is garbage."""
    if gc.isenabled():
        gc.disable()
        _deferred.append(True)


def end_startup() -> None:
    """Freeze what start-up made (the collector, at exit too, skips it) and collect again; once per process."""
    if _deferred:
        _deferred.clear()
        gc.freeze()
        gc.enable()
