"""The errors fxfuse raises on purpose, and the switch that makes its own bugs raise.

Every error fxfuse documents derives from ``FxfuseError``: a caller can catch
that one class. Inside a pass, an exception that is not one of these is a bug
in fxfuse (a rule that crashed on a spelling it did not foresee). By default
it becomes a rejection (a rule) or a skipped pass, so a model that runs
eagerly can always be optimized; under ``strict()`` it propagates, which is
how the test suite makes such bugs fail.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterator


class FxfuseError(Exception):
    """Base class of every error fxfuse raises on purpose."""


class InputError(FxfuseError, TypeError, ValueError):
    """An argument given to fxfuse is wrong; the message says which and what to pass instead.

    It is both a ``TypeError`` and a ``ValueError``, so code written against
    the built-in errors keeps working.
    """


_STRICT: ContextVar[bool] = ContextVar("fxfuse_strict", default=False)


@contextlib.contextmanager
def strict(enabled: bool = True) -> Iterator[None]:
    """Inside this block, an unexpected exception in a rule or pass propagates instead of being reported."""
    token = _STRICT.set(enabled)
    try:
        yield
    finally:
        _STRICT.reset(token)


def is_strict() -> bool:
    """True inside ``strict()``."""
    return _STRICT.get()
