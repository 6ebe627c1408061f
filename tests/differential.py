"""Building blocks of the differential gradient harness (tests/test_differential.py).

A *case* is one point of the cross product the harness draws from: problem (linear with
constant ``A``, linear with ``A(t) = a(t) A``, nonlinear) × state layout × gradient method ×
solver × time direction × time offset × which outputs the loss looks at × loss scale ×
dtype. :func:`run_case` solves it with the library and returns the gradients with respect
to ``y0`` (every leaf), the parameters and the times; :func:`oracle` computes the same
gradients independently of the solver:

- linear problems: ``y(t) = expm(τ(t) A) y0`` with ``τ(t) = ∫ a``, differentiated by
  autograd through ``torch.linalg.matrix_exp`` (float64);
- nonlinear problems: ``Direct()`` (autograd through the solver's steps) at rtol 1e-12
  in float64 on the same program, whatever the case's dtype.

Every layout is a view of one flat core state: ``f`` unpacks the state, evaluates the core
field on one flat (…, m) tensor and packs the result again (a dict case returns its keys
in another order than ``y0`` has them).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch

import torchadjoint as ta

D = torch.float64

LAYOUTS = ("scalar", "vector", "batch", "tuple", "dict")
PROBLEMS = ("linear", "linear_t", "nonlinear")
ADAPTIVE = ("dopri5", "bosh3", "tsit5")
FIXED = {"rk4": 0.05, "midpoint": 0.02, "euler": 0.01}
GRADIENTS = ("backsolve", "checkpointed", "checkpointed4", "quadrature", "quadrature_loop", "direct", "direct3")
OUTPUTS = ("last", "middle", "all")


def make_gradient(name: str, checked: bool = True):
    """The gradient method ``name``. ``checked=False``: with its trust check that raises
    (``reconstruction_error``) turned off, for the methods that have one (the rest: None),
    so that a gradient it refused can still be looked at."""
    if not checked:
        if name not in UNCHECKED:
            return None
        return {
            "backsolve": lambda: ta.Backsolve(reconstruction_error=None),
            "quadrature": lambda: ta.Quadrature(reconstruction_error=None),
            "quadrature_loop": lambda: ta.Quadrature(batching="loop", reconstruction_error=None),
        }[name]()
    return {
        "backsolve": lambda: ta.Backsolve(),
        "checkpointed": lambda: ta.Checkpointed(),
        "checkpointed4": lambda: ta.Checkpointed(checkpoints=4),
        "quadrature": lambda: ta.Quadrature(),
        "quadrature_loop": lambda: ta.Quadrature(batching="loop"),
        "direct": lambda: ta.Direct(),
        "direct3": lambda: ta.Direct(checkpoints=3),
    }[name]()


# The methods whose reconstruction check (a re-solved y drifted as far as |y|, or a non-finite
# gradient) raises a SolveError that ``reconstruction_error=None`` turns into a warning.
UNCHECKED = ("backsolve", "quadrature", "quadrature_loop")


@dataclass(frozen=True)
class Case:
    problem: str = "linear"
    layout: str = "vector"
    gradient: str = "backsolve"
    solver: str = "dopri5"
    direction: int = 1
    offset: float = 0.0
    outputs: str = "last"
    scale: float = 1.0
    dtype: torch.dtype = D
    rtol: float = 1e-7
    seed: int = 0
    contracting: bool = False  # eigenvalues down to -50: reversing y is hopeless
    long: bool = False  # a span of 6 instead of 1.2: many steps
    undeclared: bool = False  # f multiplies its field by k (= 1, not in params) after the first output

    @property
    def adaptive(self) -> bool:
        return self.solver in ADAPTIVE

    def describe(self) -> str:
        return (f"Case(problem={self.problem!r}, layout={self.layout!r}, gradient={self.gradient!r}, solver={self.solver!r}, "
                f"direction={self.direction}, offset={self.offset!r}, outputs={self.outputs!r}, scale={self.scale!r}, "
                f"dtype={self.dtype}, rtol={self.rtol!r}, seed={self.seed}, contracting={self.contracting}, long={self.long}, "
                f"undeclared={self.undeclared})")


# --- the state layouts: each a view of a flat core state of m entries (per batch row)

def core_size(layout: str) -> int:
    return 1 if layout == "scalar" else 3


def pack(layout: str, flat: torch.Tensor):
    """A core tensor (…, m) as the layout's state."""
    if layout == "scalar":
        return flat.reshape(flat.shape[:-1])
    if layout == "tuple":
        return (flat[..., :2], flat[..., 2:])
    if layout == "dict":
        return {"x": flat[..., :2], "v": flat[..., 2:]}
    return flat


def pack_reordered(layout: str, flat: torch.Tensor):
    """As :func:`pack`, but a dict comes with its keys in the other order (f's output)."""
    if layout == "dict":
        return {"v": flat[..., 2:], "x": flat[..., :2]}
    return pack(layout, flat)


def unpack(layout: str, state) -> torch.Tensor:
    if layout == "scalar":
        return state.reshape(1)
    if layout == "tuple":
        return torch.cat([state[0], state[1]], dim=-1)
    if layout == "dict":
        return torch.cat([state["x"], state["v"]], dim=-1)
    return state


def leaves(layout: str, state) -> List[torch.Tensor]:
    if layout == "tuple":
        return list(state)
    if layout == "dict":
        return [state["x"], state["v"]]
    return [state]


def unpack_outputs(layout: str, ys) -> torch.Tensor:
    """The solution's ``ys`` as core states (N, …, m)."""
    if layout == "scalar":
        return ys.reshape(-1, 1)
    if layout == "tuple":
        return torch.cat([ys[0], ys[1]], dim=-1)
    if layout == "dict":
        return torch.cat([ys["x"], ys["v"]], dim=-1)
    return ys


# --- the problems

@dataclass
class Data:
    """Everything a case is built from, float64: ``A`` (m, m) or the network's weights,
    ``y0`` (…, m), the times (N,), the loss weights (N, …, m)."""

    params: Tuple[torch.Tensor, ...]
    y0: torch.Tensor
    times: List[float]
    weights: torch.Tensor
    looked_at: List[int]


def draw_data(case: Case) -> Data:
    g = torch.Generator().manual_seed(case.seed)
    m = core_size(case.layout)
    rows = (2,) if case.layout == "batch" else ()
    if case.problem == "nonlinear":
        h = 6
        params = (0.7 * torch.randn(h, m, generator=g, dtype=D), 0.3 * torch.randn(h, generator=g, dtype=D),
                  0.7 * torch.randn(m, h, generator=g, dtype=D))
    elif case.contracting:
        q, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=D))
        eig = torch.linspace(-1.0, -50.0, m, dtype=D)
        params = (q @ torch.diag(eig) @ q.T,)
    else:
        a = 0.6 * torch.randn(m, m, generator=g, dtype=D)
        params = (a - 0.2 * torch.eye(m, dtype=D),)
    y0 = torch.randn(*rows, m, generator=g, dtype=D)
    n_out = 2 if case.outputs == "last" else 4
    gaps = 0.2 + torch.rand(n_out - 1, generator=g, dtype=D)
    span = 1.0 if case.contracting else 6.0 if case.long else 1.2
    gaps = gaps / gaps.sum() * span
    rel = [0.0] + torch.cumsum(gaps, 0).tolist()
    times = [case.offset + case.direction * x for x in rel]
    weights = torch.randn(n_out, *rows, m, generator=g, dtype=D)
    looked_at = {"last": [n_out - 1], "middle": [1], "all": list(range(n_out))}[case.outputs]
    return Data(params, y0, times, weights, looked_at)


def rate(case: Case, t: torch.Tensor) -> torch.Tensor:
    """``a(t)`` of the time-dependent linear problem (1 for the others)."""
    return 1.0 + 0.5 * torch.cos(2.0 * (t - case.offset))


def rate_integral(case: Case, t: torch.Tensor) -> torch.Tensor:
    """``τ(t) = ∫_{offset}^{t} a``."""
    s = t - case.offset
    return s + 0.25 * torch.sin(2.0 * s)


def core_field(case: Case, params, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """dy/dt on the core state (…, m)."""
    if case.problem == "nonlinear":
        w1, b1, w2 = params
        s = (t - case.offset).to(y.dtype)
        return torch.tanh(y @ w1.T + b1 + 0.5 * torch.sin(s)) @ w2.T - 0.3 * y
    (a,) = params
    out = y @ a.T
    return out * rate(case, t).to(y.dtype) if case.problem == "linear_t" else out


def switch_time(data: "Data", dtype: torch.dtype = D) -> float:
    """Where an ``undeclared`` case's f starts using k: halfway to the first output, as a
    ``dtype`` number, so that f switches exactly where the solve's ``jump_t`` (a tensor of the
    case's dtype) makes it land. (Had f switched at the float64 time while a float32 solve
    landed on its rounding, up to 1e-7 earlier, the first stage after the landing would miss
    k: its weight in a step, not a 1e-7 sliver, taken off dL/dk: 24 % with bosh3.)"""
    return float(torch.tensor(0.5 * (data.times[0] + data.times[1]), dtype=dtype))


def make_func(case: Case, params, k: Optional[torch.Tensor] = None, t_switch: float = 0.0) -> Callable:
    """f(t, y) in the case's layout; with ``k``, the field is multiplied by k from
    ``t_switch`` on (towards the last output): f uses k only after t_0."""
    sign = 1.0 if case.direction > 0 else -1.0

    def f(t, y):
        dy = core_field(case, params, t, unpack(case.layout, y))
        if k is not None and sign * (float(t) - t_switch) > 0:
            dy = k.to(dy.dtype) * dy
        return pack_reordered(case.layout, dy)

    return f


def loss_of(case: Case, data: Data, core_ys: torch.Tensor) -> torch.Tensor:
    """``c Σ_i (w_i · y_i + ½|y_i|²)`` over the outputs the loss looks at."""
    w = data.weights.to(core_ys.dtype)
    total = 0.0
    for i in data.looked_at:
        total = total + (w[i] * core_ys[i]).sum() + 0.5 * core_ys[i].pow(2).sum()
    return case.scale * total


# --- running a case and its oracle

@dataclass
class Outcome:
    grads: Dict[str, torch.Tensor]  # "y0", "p0", "p1", …, "t" (and "k"): float64
    stats: dict
    warned: List[str]
    error: Optional[BaseException] = None


def _options(case: Case, data: Data) -> dict:
    # An undeclared case's f changes with k at the switch time (its value does not, k = 1, but
    # its derivative in k does): every method treats it as a discontinuity of f (jump_t),
    # so that dL/dk is no discretisation of a jump.
    land = dict(jump_t=torch.tensor([switch_time(data, case.dtype)], dtype=case.dtype)) if case.undeclared else {}
    if case.adaptive:
        return dict(method=case.solver, rtol=case.rtol, atol=case.rtol, **land)
    return dict(method=case.solver, step_size=FIXED[case.solver], **land)


def run_case(case: Case, data: Optional[Data] = None, gradient=None, options: Optional[dict] = None) -> Outcome:
    """Solve the case with the library and differentiate the loss."""
    data = data or draw_data(case)
    params = tuple(p.detach().to(case.dtype).clone().requires_grad_() for p in data.params)
    y0_core = data.y0.to(case.dtype)
    y0 = pack(case.layout, y0_core)
    y0_leaves = [x.detach().clone().requires_grad_() for x in leaves(case.layout, y0)]
    y0 = {"tuple": lambda: tuple(y0_leaves), "dict": lambda: {"x": y0_leaves[0], "v": y0_leaves[1]}}.get(
        case.layout, lambda: y0_leaves[0])()
    t = torch.tensor(data.times, dtype=case.dtype, requires_grad=True)
    gradient = gradient if gradient is not None else make_gradient(case.gradient)
    k = torch.ones((), dtype=case.dtype, requires_grad=True) if case.undeclared else None
    func = make_func(case, params, k, switch_time(data, case.dtype))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            sol = ta.solve(func, y0, t, gradient=gradient, params=list(params),
                           **(options if options is not None else _options(case, data)))
            loss = loss_of(case, data, unpack_outputs(case.layout, sol.ys))
            loss.backward()
        except (ta.SolveError, ValueError) as error:
            # A ValueError only for an undeclared tensor (the harness passes nothing else wrong).
            if isinstance(error, ValueError) and not (case.undeclared and "params" in str(error)):
                raise
            return Outcome({}, {}, [str(w.message) for w in caught], error)
    warned = [str(w.message) for w in caught if issubclass(w.category, ta.ReconstructionWarning)]
    grads = {"y0": torch.cat([_grad(x).reshape(-1) for x in y0_leaves])}
    for i, p in enumerate(params):
        grads[f"p{i}"] = _grad(p)
    grads["t"] = _grad(t)
    if k is not None:
        grads["k"] = _grad(k).reshape(1)
    return Outcome({k: v.double() / case.scale for k, v in grads.items()}, sol.stats, warned)


def _grad(x: torch.Tensor) -> torch.Tensor:
    # A gradient that never arrived is a zero one here: the oracle then tells it is wrong.
    return torch.zeros_like(x) if x.grad is None else x.grad


def oracle(case: Case, data: Optional[Data] = None) -> Dict[str, torch.Tensor]:
    """The case's gradients (divided by the loss scale), float64, independent of the solver
    under test: matrix_exp for the linear problems, Direct at rtol 1e-12 otherwise."""
    data = data or draw_data(case)
    if case.problem == "nonlinear":
        tight = replace(case, dtype=D, scale=1.0, gradient="direct", solver="dopri5", rtol=1e-12)
        land = dict(jump_t=torch.tensor([switch_time(data)], dtype=D)) if case.undeclared else {}
        return run_case(tight, data, options=dict(method="dopri5", rtol=1e-12, atol=1e-12, **land)).grads
    (a,) = (p.clone().requires_grad_() for p in data.params)
    y0 = data.y0.clone().requires_grad_()
    t = torch.tensor(data.times, dtype=D, requires_grad=True)
    k = torch.ones((), dtype=D, requires_grad=True)
    tau = rate_integral(case, t) if case.problem == "linear_t" else t

    def flow(i):
        """y(t_i): expm((τ_i - τ_0) A), with A -> kA past the switch time for ``undeclared``."""
        if not case.undeclared or i == 0:
            return y0 @ torch.linalg.matrix_exp(a * (tau[i] - tau[0])).T
        s = torch.tensor(switch_time(data), dtype=D)
        tau_s = rate_integral(case, s) if case.problem == "linear_t" else s
        y_s = y0 @ torch.linalg.matrix_exp(a * (tau_s - tau[0])).T
        return y_s @ torch.linalg.matrix_exp(k * a * (tau[i] - tau_s)).T

    ys = torch.stack([flow(i) for i in range(len(data.times))])
    y0_grad, a_grad, t_grad, k_grad = torch.autograd.grad(
        loss_of(replace(case, scale=1.0), data, ys), (y0, a, t, k), allow_unused=True)
    if case.layout == "dict" or case.layout == "tuple":
        y0_grad = torch.cat([y0_grad[..., :2].reshape(-1), y0_grad[..., 2:].reshape(-1)])
    out = {"y0": y0_grad.reshape(-1), "p0": a_grad, "t": t_grad}
    if case.undeclared:
        out["k"] = k_grad.reshape(1)
    return out


def relative_errors(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Per gradient: max |got - want| over max |want| (the largest entry sets the scale)."""
    out = {}
    for key, w in want.items():
        g = got[key].reshape(w.shape)
        out[key] = float((g - w).abs().max() / w.abs().max().clamp_min(1e-300))
    return out


def error_bound(case: Case) -> float:
    """How far a correct gradient may be from the oracle. Adaptive: a multiple of rtol
    (global errors are tens of times the local tolerance), floored by the dtype's rounding.
    Fixed step: the discretisation error of the steps themselves, measured by the caller."""
    eps = torch.finfo(case.dtype).eps
    return max(2e3 * case.rtol, 2e4 * eps) if case.adaptive else math.nan


def is_loud(outcome: Outcome) -> bool:
    return outcome.error is not None or bool(outcome.warned)


def rerun_unchecked(case: Case, data: Data) -> Optional[Outcome]:
    """The case again with the gradient method's raising trust check off (its gradient is
    returned, with a warning, instead of a SolveError); None for a method without one."""
    gradient = make_gradient(case.gradient, checked=False)
    return None if gradient is None else run_case(case, data, gradient=gradient)


@dataclass
class Verdict:
    """The harness's verdict on a loud outcome (a warning or a SolveError).

    ``kind``: "true alarm" (the gradient it was about is off by more than the alarm level,
    or non-finite, or the case is one known to be hard), "false alarm" (that gradient is
    within the alarm level: the user was told off a right answer), or "no gradient" (the
    solve raised, and raised again with its trust check off: nothing to judge).
    ``errors``: the judged gradient's relative errors against the oracle (None: not judged)."""

    kind: str
    reason: str
    errors: Optional[Dict[str, float]] = None

    @property
    def true(self) -> bool:
        return self.kind == "true alarm"


def judge_alarm(outcome: Outcome, want: Dict[str, torch.Tensor], alarm_level: float,
                unchecked: Optional[Outcome] = None) -> Verdict:
    """Whether a loud ``outcome`` was right to be loud, from the gradient it was about.

    A warning comes with its gradient. A raised error has none; ``unchecked`` is the same
    case with the check that raised turned off (:func:`rerun_unchecked`), whose gradient is
    judged in its place: the raise was a true alarm if that gradient is off by more than
    ``alarm_level`` (the warning's threshold), a false alarm if it is within it.
    ``want``: the oracle's gradients."""
    if outcome.error is None:
        grads, source = outcome.grads, f"warned {outcome.warned[0][:160]!r}"
    elif unchecked is not None and unchecked.error is None:
        grads = unchecked.grads
        source = f"raised {str(outcome.error)[:160]!r}; with the check off the gradient"
    else:
        again = "no such check to turn off" if unchecked is None else f"with the check off it raised {unchecked.error}"
        return Verdict("no gradient", f"raised {outcome.error}; {again}")
    errors = relative_errors(grads, want)
    worst = max(errors, key=lambda k: errors[k] if math.isfinite(errors[k]) else math.inf)
    summary = f"d/d{worst} off by {errors[worst]:.3g} (alarm level {alarm_level:.3g})"
    if not math.isfinite(errors[worst]) or errors[worst] > alarm_level:
        return Verdict("true alarm", f"{source}: {summary}", errors)
    return Verdict("false alarm", f"{source}: right, {summary}", errors)
