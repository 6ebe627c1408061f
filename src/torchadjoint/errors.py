"""The one exception type for a solve that cannot go on."""
from __future__ import annotations


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
