"""Malformed and extreme inputs to the public API, with the outcome each must have.

Each case is a call and either an exception (type and words the message must contain) or a
check on the result. `tests/test_fuzz.py` runs them all; `python tests/fuzz_cases.py`
prints the table in docs/robustness.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

import torchadjoint as ta

T01 = torch.tensor([0.0, 1.0])


def decay(t, y):
    return -y


@dataclass
class Case:
    name: str
    call: Callable[[], object]
    raises: Optional[type] = None
    words: Tuple[str, ...] = ()
    check: Optional[Callable[[object], bool]] = None
    warns: Optional[type] = None  # a warning the call must give (words: in its message)

    @property
    def outcome(self) -> str:
        if self.raises is not None:
            return f"`{self.raises.__name__}` naming {', '.join(repr(w) for w in self.words)}"
        if self.warns is not None:
            named = f" naming {', '.join(repr(w) for w in self.words)}" if self.words else ""
            return f"correct result, with a `{self.warns.__name__}`{named}"
        return "correct result"


def solve(*args, **kwargs):
    return ta.solve(*args, **kwargs)


def _close_to_exp(sol, t=1.0):
    return torch.allclose(sol.ys[-1], torch.full_like(sol.ys[-1], math.exp(-t)), rtol=1e-5, atol=1e-6)


CASES = [
    # --- the function
    Case("func is not callable", lambda: solve(3, torch.ones(2), T01), TypeError, ("func", "callable")),
    Case("f returns the wrong shape", lambda: solve(lambda t, y: torch.ones(3), torch.ones(2), T01), TypeError, ("f(t, y)", "(3,)", "(2,)")),
    Case("f returns the wrong dtype", lambda: solve(lambda t, y: y.double(), torch.ones(2), T01), TypeError, ("f(t, y)", "float64")),
    Case("f returns None", lambda: solve(lambda t, y: None, torch.ones(2), T01), TypeError, ("f(t, y)", "NoneType")),
    Case("f returns a tuple for a tensor state", lambda: solve(lambda t, y: (y,), torch.ones(2), T01), TypeError, ("f(t, y)", "tuple")),
    Case("f returns a tensor for a tuple state", lambda: solve(lambda t, y: y[0], (torch.ones(2), torch.ones(1)), T01), TypeError, ("f(t, y)",)),
    Case("f raises", lambda: solve(lambda t, y: (_ for _ in ()).throw(KeyError("boom")), torch.ones(2), T01), KeyError, ("boom",)),
    Case("f returns NaN from the start", lambda: solve(lambda t, y: y * math.nan, torch.ones(2), T01), ta.SolveError, ("t=0", "non-finite")),
    Case("f returns NaN later", lambda: solve(lambda t, y: torch.where(t > 0.5, y * math.nan, y), torch.ones(2, dtype=torch.float64), T01.double()), ta.SolveError, ("t=0.5", "non-finite")),
    Case("finite-time blow-up (dy/dt = y², y0 = 1)", lambda: solve(lambda t, y: y * y, torch.ones(1, dtype=torch.float64), torch.tensor([0.0, 2.0], dtype=torch.float64)), ta.SolveError, ("t=1.0000", "step size underflow", "blow up")),
    Case("NaN with min_step set", lambda: solve(lambda t, y: y * math.nan, torch.ones(2), T01, min_step=1e-3, first_step=1e-2), ta.SolveError, ("non-finite",)),
    Case("fixed step into overflow", lambda: solve(lambda t, y: y * 1e30, torch.ones(2), T01, method="euler", step_size=0.1), ta.SolveError, ("non-finite", "step_size")),
    # --- the state
    Case("y0 is a list", lambda: solve(decay, [1.0, 2.0], T01), TypeError, ("y0", "tensor")),
    Case("y0 is an integer tensor", lambda: solve(decay, torch.ones(2, dtype=torch.int64), T01), TypeError, ("y0", "floating-point", "torch.int64")),
    Case("y0 is complex", lambda: solve(decay, torch.ones(2, dtype=torch.complex64), T01), TypeError, ("y0", "floating-point")),
    Case("y0 is empty", lambda: solve(decay, torch.ones(0), T01), ValueError, ("y0", "no elements")),
    Case("y0 contains NaN", lambda: solve(decay, torch.tensor([1.0, math.nan]), T01), ValueError, ("y0", "NaN")),
    Case("y0 contains inf", lambda: solve(decay, torch.tensor([1.0, math.inf]), T01), ValueError, ("y0", "inf")),
    Case("y0 tuple of mixed dtypes", lambda: solve(decay, (torch.ones(1), torch.ones(1, dtype=torch.float64)), T01), TypeError, ("y0", "dtype")),
    Case("y0 tuple across devices", lambda: solve(decay, (torch.ones(1), torch.ones(1, device="meta")), T01), ValueError, ("y0", "device")),
    Case("y0 empty tuple", lambda: solve(decay, (), T01), TypeError, ("y0", "empty")),
    Case("y0 dict with a string", lambda: solve(decay, {"a": torch.ones(1), "b": "x"}, T01), TypeError, ("y0['b']",)),
    Case("y0 0-dim tensor", lambda: solve(decay, torch.tensor(1.0), T01), None, check=lambda s: s.ys.shape == (2,) and _close_to_exp(s)),
    Case("y0 batched (4, 3, 2)", lambda: solve(decay, torch.ones(4, 3, 2), T01), None, check=lambda s: s.ys.shape == (2, 4, 3, 2) and _close_to_exp(s)),
    # --- the times
    Case("t is a list", lambda: solve(decay, torch.ones(2), [0.0, 1.0]), TypeError, ("t", "torch.Tensor")),
    Case("t is 2-D", lambda: solve(decay, torch.ones(2), torch.zeros(2, 2)), ValueError, ("t", "1-D")),
    Case("t is an integer tensor", lambda: solve(decay, torch.ones(2), torch.tensor([0, 1])), TypeError, ("t", "floating-point")),
    Case("t is empty", lambda: solve(decay, torch.ones(2), torch.zeros(0)), ValueError, ("t", "empty")),
    Case("t repeats a time (zero-length interval)", lambda: solve(decay, torch.ones(2), torch.tensor([0.0, 0.0])), ValueError, ("t", "repeats", "index 1")),
    Case("t is not monotone", lambda: solve(decay, torch.ones(2), torch.tensor([0.0, 1.0, 0.5])), ValueError, ("t", "changes direction")),
    Case("t contains NaN", lambda: solve(decay, torch.ones(2), torch.tensor([0.0, math.nan])), ValueError, ("t", "finite")),
    Case("t contains inf", lambda: solve(decay, torch.ones(2), torch.tensor([0.0, math.inf])), ValueError, ("t", "finite")),
    Case("t has one time", lambda: solve(decay, torch.ones(2), torch.tensor([0.5])), None, check=lambda s: torch.equal(s.ys, torch.ones(1, 2))),
    Case("t decreasing", lambda: solve(decay, torch.ones(2), torch.tensor([1.0, 0.0])), None, check=lambda s: torch.allclose(s.ys[-1], torch.full((2,), math.e), rtol=1e-5)),
    Case("t float64 with a float32 state", lambda: solve(decay, torch.ones(2), T01.double()), None, check=lambda s: s.ys.dtype == torch.float32 and _close_to_exp(s)),
    # --- tolerances and options
    Case("negative rtol", lambda: solve(decay, torch.ones(2), T01, rtol=-1e-3), ValueError, ("rtol", "non-negative")),
    Case("NaN atol", lambda: solve(decay, torch.ones(2), T01, atol=math.nan), ValueError, ("atol",)),
    Case("rtol = atol = 0", lambda: solve(decay, torch.ones(2), T01, rtol=0.0, atol=0.0), ValueError, ("rtol and atol", "zero")),
    Case("rtol as a string", lambda: solve(decay, torch.ones(2), T01, rtol="1e-3"), TypeError, ("rtol",)),
    Case("atol tensor of the wrong shape", lambda: solve(decay, torch.ones(2), T01, atol=torch.ones(3)), ValueError, ("atol", "broadcast")),
    Case("atol per component for a tuple state", lambda: solve(lambda t, y: (-y[0], -y[1]), (torch.ones(2), torch.ones(1)), T01, atol=(1e-9, 1e-6)), None, check=lambda s: _close_to_exp(type("S", (), {"ys": s.ys[0]})())),
    Case("atol with too many components", lambda: solve(lambda t, y: (-y[0], -y[1]), (torch.ones(2), torch.ones(1)), T01, atol=(1e-9, 1e-6, 1.0)), ValueError, ("atol", "components")),
    Case("huge tolerance (rtol=1e10)", lambda: solve(decay, torch.ones(2), T01, rtol=1e10, atol=1e10), None, check=lambda s: bool(torch.isfinite(s.ys).all())),
    Case("tiny tolerance (rtol=1e-300, atol=0)", lambda: solve(decay, torch.ones(2, dtype=torch.float64), T01.double(), rtol=1e-300, atol=0.0), check=_close_to_exp, warns=ta.ToleranceWarning, words=("rtol=1e-300", "Using rtol=1.11e-16")),
    Case("unknown method", lambda: solve(decay, torch.ones(2), T01, method="rk45"), ValueError, ("method", "'rk45'", "dopri5")),
    Case("method not a string", lambda: solve(decay, torch.ones(2), T01, method=5), TypeError, ("method",)),
    Case("unknown option", lambda: solve(decay, torch.ones(2), T01, stepsize=0.1), TypeError, ("stepsize", "valid options")),
    Case("step_size with an adaptive method", lambda: solve(decay, torch.ones(2), T01, step_size=0.1), ValueError, ("step_size", "adaptive", "first_step")),
    Case("fixed-step method without step_size", lambda: solve(decay, torch.ones(2), T01, method="rk4"), ValueError, ("step_size", "rk4")),
    Case("negative step_size", lambda: solve(decay, torch.ones(2), T01, method="rk4", step_size=-0.1), ValueError, ("step_size", "positive")),
    Case("negative first_step", lambda: solve(decay, torch.ones(2), T01, first_step=-0.1), ValueError, ("first_step", "positive")),
    Case("min_step above max_step", lambda: solve(decay, torch.ones(2), T01, min_step=0.5, max_step=0.1), ValueError, ("min_step", "max_step")),
    Case("max_num_steps = 0", lambda: solve(decay, torch.ones(2), T01, max_num_steps=0), ValueError, ("max_num_steps", "positive")),
    Case("max_num_steps too small", lambda: solve(decay, torch.ones(2), torch.tensor([0.0, 100.0]), max_num_steps=3), ta.SolveError, ("max_num_steps=3",)),
    Case("step_t outside the interval", lambda: solve(decay, torch.ones(2), T01, step_t=torch.tensor([2.0])), ValueError, ("step_t", "outside")),
    Case("jump_t of the wrong rank", lambda: solve(decay, torch.ones(2), T01, jump_t=torch.zeros(1, 1)), ValueError, ("jump_t", "1-D")),
    Case("norm not callable", lambda: solve(decay, torch.ones(2), T01, norm="max"), TypeError, ("norm", "callable")),
    Case("safety above 1", lambda: solve(decay, torch.ones(2), T01, safety=2.0), ValueError, ("safety",)),
    Case("interpolation unknown", lambda: solve(decay, torch.ones(2), T01, interpolation="cubic"), ValueError, ("interpolation", "'dense'")),
    # --- gradients
    Case("gradient not a gradient method", lambda: solve(decay, torch.ones(2, requires_grad=True), T01, gradient="backsolve"), TypeError, ("gradient", "Backsolve()")),
    Case("params not tensors", lambda: solve(decay, torch.ones(2), T01, params=[1.0]), TypeError, ("params[0]",)),
    Case("Backsolve with an unknown norm", lambda: ta.Backsolve(norm="max"), ValueError, ("norm", "seminorm")),
    Case("Backsolve with an unknown backward method", lambda: ta.Backsolve(method="rk45"), ValueError, ("method", "rk45")),
    Case("unknown gradient method name", lambda: ta.gradient_method("adjoint"), ValueError, ("'adjoint'", "backsolve")),
    # --- the edges of floating point, and solves that would run unbounded (tests/test_float_edges.py has more)
    Case("short interval far from zero (t = [1e16, 1e16 + 100], float64)", lambda: solve(decay, torch.ones(1, dtype=torch.float64), torch.tensor([1e16, 1e16 + 100], dtype=torch.float64)), check=lambda s: s.stats["forward"]["accepted"] > 10 and abs(s.ys[-1].item() - math.exp(-100)) < 1e-8, warns=ta.TimeResolutionWarning, words=("float64", "if f depends on t")),
    Case("f depends on t at Unix time (t0 = 1.7e9) in float32", lambda: solve(lambda t, y: torch.cos(t).expand_as(y), torch.zeros(1), torch.tensor([1.7e9, 1.7e9 + 1], dtype=torch.float64)), check=lambda s: s.ys.dtype == torch.float32, warns=ta.TimeResolutionWarning, words=("float32", "128", "Shift the time origin")),
    Case("float16 state", lambda: solve(decay, torch.ones(2, dtype=torch.float16), T01.half()), check=lambda s: s.ys.dtype == torch.float16 and abs(s.ys[-1, 0].item() - math.exp(-1)) < 2e-3, warns=ta.ToleranceWarning, words=("float16", "Using rtol=0.000488")),
    Case("bfloat16 state", lambda: solve(decay, torch.ones(2, dtype=torch.bfloat16), T01.bfloat16()), check=lambda s: s.ys.dtype == torch.bfloat16 and abs(s.ys[-1, 0].item() - math.exp(-1)) < 8e-3, warns=ta.ToleranceWarning, words=("bfloat16", "Using rtol=0.00391")),
    Case("rtol below float32 precision (1e-12, dopri8)", lambda: solve(decay, torch.ones(2), T01, method="dopri8", rtol=1e-12, atol=1e-14), check=_close_to_exp, warns=ta.ToleranceWarning, words=("rtol=1e-12", "float32", "Using rtol=5.96e-08")),
    Case("interval length overflows (t = [-1e308, 1e308])", lambda: solve(decay, torch.ones(1, dtype=torch.float64), torch.tensor([-1e308, 1e308], dtype=torch.float64)), ValueError, ("t:", "overflows")),
    Case("stagnating solve (dy/dt = -y over [0, 1e300]; default max_num_steps 100 000, here 1000)", lambda: solve(decay, torch.ones(1, dtype=torch.float64), torch.tensor([0.0, 1e300], dtype=torch.float64), max_num_steps=1000), ta.SolveError, ("max_num_steps=1000", "more steps", "looks stiff", "implicit")),
    Case("too many steps, not stiff", lambda: solve(lambda t, y: torch.stack([y[1], -y[0]]), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1e5]), max_num_steps=100), ta.SolveError, ("max_num_steps=100", "raise max_num_steps")),
    Case("torch.func.vmap over solve", lambda: torch.func.vmap(lambda y: solve(decay, y, T01).ys)(torch.ones(3, 2)), NotImplementedError, ("vmap", "batch dimension", "Direct()")),
    Case("torch.func.grad over an adjoint method", lambda: torch.func.grad(lambda y: solve(decay, y, T01).ys[-1].sum())(torch.ones(2)), NotImplementedError, ("Backsolve()", "Direct()", "backward()")),
    Case("torch.func.grad over Direct()", lambda: torch.func.grad(lambda y: solve(decay, y, T01, gradient=ta.Direct()).ys[-1].sum())(torch.ones(2)), check=lambda g: torch.allclose(g, torch.full_like(g, math.exp(-1)), atol=1e-5)),
]


def markdown() -> str:
    lines = [
        "# Robustness: malformed and extreme input",
        "",
        "Every case below is run by `tests/test_fuzz.py`; each ends in the documented exception",
        "with a message naming the argument (words checked by the test), or in a correct result.",
        "Exceptions raised by the user's own `f` propagate unchanged. A solve that cannot go on",
        "raises `torchadjoint.SolveError`, whose `.t` is the time reached and `.reason` the cause.",
        "",
        "Regenerate with `python tests/fuzz_cases.py > docs/robustness.md`.",
        "",
        "What the solver does at the edges of floating point (details in `solve`'s docstring):",
        "",
        "- **Time offsets.** Where the times are so far from 0 that their floats cannot resolve the",
        "  interval into 2^26 steps (an offset above ~1e7 × the interval's length), the loop keeps its",
        "  clock as offsets from the endpoint nearest 0, so steps stay error-checked whatever the",
        "  offset; `f` is still called at the caller's times. `f` receives `t` in the state's dtype:",
        "  when that dtype expresses fewer than 2^(p/3) times across the interval (256 in float32),",
        "  a `TimeResolutionWarning` says so (a result that depends on `t` is then not to be trusted).",
        "  Checkpointed gradients replay the forward from public times, which on the offset clock is",
        "  not bit-exact: a replay that cannot retake the forward's steps raises an error saying so;",
        "  shift the time origin there (solve over `t - t[0]`), or use Backsolve() or Direct().",
        "- **float16 / bfloat16** states are integrated in float32 (`f` still receives and returns its",
        "  own dtype) and returned in the state's dtype; gradients reach `y0` and the parameters in",
        "  their dtypes.",
        "- **Tolerances below the dtype's precision:** an `rtol` below the unit roundoff of the dtype",
        "  `f` is evaluated in (5.96e-8 float32, 1.11e-16 float64, 4.88e-4 float16, 3.91e-3 bfloat16)",
        "  is raised to it, with a `ToleranceWarning` naming the value used. `rtol=0` is left alone.",
        "- **Bounded work:** `max_num_steps` defaults to 100 000 (plus one per landing, e.g. each",
        "  output time of a backward pass). Past it, `SolveError` gives the time reached, the recent",
        "  step size and the steps still needed at that pace, and, where the method's stage pair",
        "  estimates `|h·λ|` near its stability limit, says the problem looks stiff.",
        "- **torch.func:** `grad`, `jacrev`, `jvp` work with `gradient=Direct()`; the adjoint methods",
        "  under them, and `vmap` over any solve, raise `NotImplementedError` naming what works.",
        "",
        "| case | outcome |",
        "| --- | --- |",
    ]
    lines += [f"| {c.name} | {c.outcome} |" for c in CASES]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
