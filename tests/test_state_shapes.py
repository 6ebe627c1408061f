"""Every state layout through every front door and every method, under gradcheck.

States: a 0-dim tensor, (n,), (b, n), an image batch (b, c, h, w), a tuple holding a 0-dim
leaf, and a dict (with a 0-dim leaf) whose keys ``f`` returns in another order. Front
doors: torchdiffeq's ``odeint`` and ``odeint_adjoint`` (a fixed-grid method with no
``step_size`` steps on ``t`` itself) and the native ``solve``. ``t`` requires grad, and the
field's parameters are 0-dim, as in torchdiffeq's own gradient tests.

The analytic gradients of ``L = Σ w·y(t_i)`` (with respect to every leaf of y0, every time
and every parameter) are compared with central differences in float64. The time gradients
are the continuous ones (``g_i · f``) while the differences see the discrete solve, and the
adjoint does not give the discrete gradient: both differ from the differences by the
discretisation error. So fixed-grid solves use short steps and a bound scaled by the
method's order and by the largest derivative; ``torch.autograd.gradcheck`` itself runs on
the layout that broke (0-dim state, rk4 on the grid ``t``).
"""
import warnings

import pytest
import torch
from torch import nn

import torchadjoint
from torchadjoint import odeint, odeint_adjoint

D = torch.float64
FIXED = ["euler", "midpoint", "heun2", "heun3", "rk4"]
ADAPTIVE = ["adaptive_heun", "fehlberg2", "bosh3", "dopri5", "tsit5", "dopri8"]
T = (0.5, 0.56, 0.6)  # the output times; a fixed grid steps on the points between (below)
STEPS_PER_INTERVAL = 5


class Field(nn.Module):
    """``dy/dt = a·y + b·sin(t)`` leaf by leaf, with 0-dim parameters ``a`` and ``b``. A dict
    state is returned with its keys reversed (the library must match them by name)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(-0.7, dtype=D))
        self.b = nn.Parameter(torch.tensor(0.4, dtype=D))

    def leaf(self, t, y):
        return self.a * y + self.b * torch.sin(t) * torch.ones_like(y)

    def forward(self, t, y):
        if isinstance(y, torch.Tensor):
            return self.leaf(t, y)
        if isinstance(y, dict):
            return {k: self.leaf(t, y[k]) for k in reversed(list(y))}
        return type(y)(self.leaf(t, x) for x in y)


SHAPES = {
    "scalar": lambda: torch.tensor(3.2, dtype=D),
    "vector": lambda: torch.tensor([0.5, -1.0], dtype=D),
    "batch": lambda: torch.tensor([[0.5, -1.0], [2.0, 0.3]], dtype=D),
    "image": lambda: torch.linspace(-1, 1, 8, dtype=D).reshape(2, 1, 2, 2),
    "tuple": lambda: (torch.tensor(1.5, dtype=D), torch.tensor([0.2, -0.6], dtype=D)),
    "dict": lambda: {"x": torch.tensor([[0.2, 0.1]], dtype=D), "v": torch.tensor(-0.8, dtype=D)},
}


def leaves(tree):
    if isinstance(tree, torch.Tensor):
        return [tree]
    return list(tree.values()) if isinstance(tree, dict) else list(tree)


def rebuild(like, parts):
    if isinstance(like, torch.Tensor):
        return parts[0]
    if isinstance(like, dict):
        return dict(zip(like, parts))
    return type(like)(parts)


def fine_times(method):
    """Output times; for a fixed-grid method through torchdiffeq's front door (grid = t),
    with intermediate output times so that the steps are short."""
    if method in FIXED:
        pieces = [torch.linspace(a, b, STEPS_PER_INTERVAL + 1, dtype=D)[:-1] for a, b in zip(T[:-1], T[1:])]
        return torch.cat(pieces + [torch.tensor(T[-1:], dtype=D)])
    return torch.tensor(T, dtype=D)


# Adaptive solves: tolerances per method (low orders take many steps at tight ones) and
# the agreement with central differences expected, relative to the largest derivative.
ADAPTIVE_TOL = {"adaptive_heun": 1e-6, "fehlberg2": 1e-7, "bosh3": 1e-8}
# The bound, relative to the largest derivative: fixed-grid solves on steps of about 0.01 carry
# their discretisation error, O(h^order); low-order adaptive ones their tolerance.
BOUND = {"euler": 3e-2, "midpoint": 1e-4, "heun2": 1e-4, "heun3": 1e-5, "rk4": 1e-5, "adaptive_heun": 1e-4, "fehlberg2": 1e-4}


def call(door, method, func, y0, t):
    """``ys`` through one front door (fixed grid: ``t`` itself via torchdiffeq's doors, a
    step of 0.01 natively)."""
    tol = ADAPTIVE_TOL.get(method, 1e-10)
    kwargs = {} if method in FIXED else dict(rtol=tol, atol=tol * 1e-2)
    if door == "odeint":
        return odeint(func, y0, t, method=method, **kwargs)
    if door == "odeint_adjoint":
        return odeint_adjoint(func, y0, t, method=method, **kwargs)
    if method in FIXED:
        kwargs = dict(step_size=0.01)
    return torchadjoint.solve(func, y0, t, method=method, **kwargs).ys


def check(door, method, shape):
    """Analytic gradients of ``L = Σ w·y(t_i)`` with respect to every y0 leaf, every time
    and every parameter against central differences, within ``bound × max|derivative|``."""
    func = Field()
    like = SHAPES[shape]()
    params = list(func.parameters())
    inputs = [x.clone().requires_grad_() for x in leaves(like)] + [fine_times(method).requires_grad_()]
    n_leaves = len(inputs) - 1

    def loss(values):
        y0 = rebuild(like, list(values[:n_leaves]))
        ys = call(door, method, func, y0, values[n_leaves])
        out = leaves(ys)
        assert [o.shape for o in out] == [(len(values[n_leaves]), *x.shape) for x in leaves(like)]
        return sum((torch.linspace(-1.0, 1.5, o.numel(), dtype=D).reshape(o.shape) * o).sum() for o in out)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        analytic = torch.autograd.grad(loss(inputs), inputs + params)
        eps = 1e-6
        numeric = []
        with torch.no_grad():
            for x in inputs + params:
                column = torch.zeros(x.numel(), dtype=D)
                for i in range(x.numel()):
                    for sign in (1, -1):
                        x.view(-1)[i] += sign * eps
                        column[i] += sign * float(loss([v.detach() for v in inputs])) / (2 * eps)
                        x.view(-1)[i] -= sign * eps
                numeric.append(column)
    scale = max(float(c.abs().max()) for c in numeric)
    bound = BOUND.get(method, 1e-5) * scale
    for k, (a, n) in enumerate(zip(analytic, numeric)):
        error = float((a.reshape(-1) - n).abs().max())
        assert error <= bound, f"input {k}: |analytic - central difference| = {error:.3g} > {bound:.3g}"


DOORS = ["odeint", "odeint_adjoint", "solve"]
CASES = sorted(
    {(door, m, "scalar") for door in DOORS for m in FIXED + ADAPTIVE}
    | {(door, m, s) for door in DOORS for m in ("rk4", "dopri5") for s in SHAPES}
    | {(door, "euler", s) for door in DOORS for s in ("tuple", "dict")}
)


@pytest.mark.parametrize("door,method,shape", CASES)
def test_every_layout_door_and_method_against_central_differences(door, method, shape):
    check(door, method, shape)


@pytest.mark.parametrize("door", ["odeint", "odeint_adjoint"])
def test_gradcheck_scalar_state_with_a_fixed_grid_and_time_gradients(door):
    """torch.autograd.gradcheck itself on the layout that broke: a 0-dim y0 and rk4 stepping
    on ``t``, ``t`` requiring grad (rk4's error on these steps is far below gradcheck's)."""
    func = Field()
    y0 = torch.tensor(3.2, dtype=D, requires_grad=True)
    t = fine_times("rk4").requires_grad_()
    fn = odeint if door == "odeint" else odeint_adjoint
    w = torch.linspace(-1.0, 1.5, len(t), dtype=D)
    assert torch.autograd.gradcheck(lambda y, s: (w * fn(func, y, s, method="rk4")).sum(), (y0, t))


@pytest.mark.parametrize("method", ["rk4", "euler"])
@pytest.mark.parametrize("door", ["odeint", "odeint_adjoint"])
def test_scalar_state_on_the_output_grid(door, method):
    """Regression: a 0-dim y0 with a fixed-grid method and no step_size (the grid is ``t``)
    failed in the state's unflattening. Outputs and y0/parameter gradients against
    torchdiffeq (the same computation for odeint; the continuous adjoint on the same grid for
    odeint_adjoint); time gradients are ``g_i · f(t_i, y_i)``."""
    import torchdiffeq

    results = {}
    for lib in (torchadjoint, torchdiffeq):
        func = Field()
        y0 = torch.tensor(3.2, dtype=D, requires_grad=True)
        t = torch.linspace(1, 8, 10, dtype=D, requires_grad=True)
        ys = getattr(lib, door)(func, y0, t, method=method)
        assert ys.shape == (10,)
        ys.sum().backward()
        with torch.no_grad():
            f_at = torch.stack([func(ti, yi) for ti, yi in zip(t, ys)])
        results[lib.__name__] = (ys.detach(), y0.grad, [p.grad for p in func.parameters()], t.grad, f_at)
    ours, theirs = results["torchadjoint"], results["torchdiffeq"]
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-12, atol=1e-12)
    rtol = 1e-12 if door == "odeint" else 1e-6
    torch.testing.assert_close(ours[1], theirs[1], rtol=rtol, atol=rtol)
    for a, b in zip(ours[2], theirs[2]):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol)
    # dL/dt_i = g_i · f(t_i, y_i) at every output time after the first (g_i = 1 here).
    torch.testing.assert_close(ours[3][1:], ours[4][1:], rtol=1e-12, atol=1e-12)
