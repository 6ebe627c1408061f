"""The one exception type for a solve that cannot go on."""
from __future__ import annotations

import os
import sys

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def user_stacklevel() -> int:
    """The ``stacklevel`` for :func:`warnings.warn` that points at the first frame outside
    this package (the user's call), however deep inside the package the warning is made."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


class SolveError(RuntimeError):
    """A solve stopped before reaching its end time.

    Attributes:
        t: the time reached (float), i.e. the end of the last accepted step.
        reason: why it stopped, in words (step size underflow, too many steps,
            non-finite values in the state or in ``f``).
        direction: ``"forward"`` or ``"backward"`` (the adjoint's solve).
    """

    def __init__(self, t: float, reason: str, direction: str = "forward"):
        self.t = float(t)
        self.reason = reason
        self.direction = direction
        super().__init__(f"{direction} solve stopped at t={self.t:.10g}: {reason}")


class ToleranceWarning(UserWarning):
    """A tolerance was below what the state's dtype can resolve; the solve used the
    tightest one it can meet (the message says which)."""


class TimeResolutionWarning(UserWarning):
    """The output times are so large relative to the interval that ``f``, which receives
    ``t`` in the state's dtype, sees only a few distinct times across it: a result that
    depends on ``t`` is not to be trusted (time-independent ``f`` is unaffected)."""
