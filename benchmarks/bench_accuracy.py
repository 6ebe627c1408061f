"""Problem 5: gradient accuracy against an analytic gradient, as the tolerance is swept.

A linear ODE ``dy/dt = A y`` (state 6, batch 16, float64, t in [0, 5]) has the solution
``y(T) = expm(A T) y0``; for the loss ``L = Σ W ⊙ y(T)`` the exact gradients ``dL/dA`` and
``dL/dy0`` come from autograd through ``torch.linalg.matrix_exp`` (whose backward is the exact
Fréchet derivative), independent of any ODE solver. ``A`` is a rotation plus a small random
part, so the flow neither contracts nor expands much and backsolve is well posed.

For each tolerance (rtol = atol) every method computes ``(dL/dA, dL/dy0)``; we report the
relative error ``|g - g_exact| / |g_exact|`` against the backward cost. The backward cost is
the number of vector-Jacobian products of ``f``: for an adjoint, its backward function
evaluations (each comes with one VJP); for autograd through the solver, the number of
recorded forward calls it backpropagates through (its forward nfe).

``run(quick) -> dict`` for :mod:`benchmarks.report`.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List

import torch
from torch import nn

import torchadjoint as ta

try:
    import torchdiffeq
except ImportError:
    torchdiffeq = None
try:
    import torchode as to
except ImportError:
    to = None


class LinearField(nn.Module):
    """``f(t, y) = y Aᵀ`` for y (batch, d): the batch of linear ODEs ``dy/dt = A y``."""

    def __init__(self, A: torch.Tensor):
        super().__init__()
        self.A = nn.Parameter(A.clone())
        self.nfe = 0

    def forward(self, t, y):
        self.nfe += 1
        return y @ self.A.T


def make_problem(d: int = 6, batch: int = 16, T: float = 5.0, seed: int = 0):
    """(A (d, d), y0 (batch, d), W (batch, d), t (2,)) in float64."""
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(d, d, generator=g, dtype=torch.float64)
    A = 0.5 * (S - S.T) + 0.1 * torch.randn(d, d, generator=g, dtype=torch.float64)
    y0 = torch.randn(batch, d, generator=g, dtype=torch.float64)
    W = torch.randn(batch, d, generator=g, dtype=torch.float64)
    return A, y0, W, torch.tensor([0.0, T], dtype=torch.float64)


def exact_gradient(A, y0, W, T: float) -> torch.Tensor:
    """(dL/dA, dL/dy0) flattened, for ``L = Σ W ⊙ (y0 expm(A T)ᵀ)``, by autograd through matrix_exp."""
    A = A.clone().requires_grad_(True)
    y0 = y0.clone().requires_grad_(True)
    loss = (W * (y0 @ torch.linalg.matrix_exp(A * T).T)).sum()
    gA, gy0 = torch.autograd.grad(loss, (A, y0))
    return torch.cat([gA.reshape(-1), gy0.reshape(-1)])


def methods(func: LinearField, tol: float) -> Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """name -> ``solve(y0, t) -> y(T)`` (batch, d), differentiable w.r.t. y0 and A."""
    out: Dict[str, Callable] = {
        "torchadjoint / Backsolve": lambda y0, t: ta.solve(func, y0, t, rtol=tol, atol=tol, gradient=ta.Backsolve(reconstruction_warning=None)).ys[-1],
        "torchadjoint / Direct": lambda y0, t: ta.solve(func, y0, t, rtol=tol, atol=tol, gradient=ta.Direct()).ys[-1],
    }
    if torchdiffeq is not None:
        out["torchdiffeq / odeint_adjoint"] = lambda y0, t: torchdiffeq.odeint_adjoint(
            func, y0, t, rtol=tol, atol=tol, method="dopri5")[-1]
        out["torchdiffeq / odeint_adjoint (seminorm)"] = lambda y0, t: torchdiffeq.odeint_adjoint(
            func, y0, t, rtol=tol, atol=tol, method="dopri5", adjoint_options=dict(norm="seminorm"))[-1]
        out["torchdiffeq / odeint"] = lambda y0, t: torchdiffeq.odeint(func, y0, t, rtol=tol, atol=tol, method="dopri5")[-1]
    if to is not None:
        for kind, label in (("autodiff", "torchode / AutoDiffAdjoint"), ("backsolve", "torchode / BacksolveAdjoint")):
            term = to.ODETerm(func)
            step = to.Dopri5(term=term)
            controller = to.IntegralController(atol=tol, rtol=tol, term=term)
            solver = to.AutoDiffAdjoint(step, controller) if kind == "autodiff" else to.BacksolveAdjoint(term, step, controller)
            solver = solver.to(torch.float64)  # its tolerance buffers default to float32

            def solve_to(y0, t, solver=solver):
                problem = to.InitialValueProblem(y0=y0, t_eval=t.expand(y0.shape[0], -1))
                return solver.solve(problem).ys[:, -1]

            out[label] = solve_to
    return out


AUTOGRAD = ("torchadjoint / Direct", "torchdiffeq / odeint", "torchode / AutoDiffAdjoint")


def cost_at(points: List[dict], target: float):
    """Backward cost at which the error crosses ``target``, interpolated in log-log between the
    first sweep point below the target and the one before it; None if never reached."""
    for prev, cur in zip(points, points[1:]):
        if cur["error"] <= target < prev["error"]:
            lc0, lc1 = math.log(prev["cost"]), math.log(cur["cost"])
            le0, le1, lt = math.log(prev["error"]), math.log(cur["error"]), math.log(target)
            return math.exp(lc0 + (lc1 - lc0) * (lt - le0) / (le1 - le0))
    if points and points[0]["error"] <= target:
        return float(points[0]["cost"])
    return None


def run(quick: bool = False) -> dict:
    A, y0, W, t = make_problem()
    T = float(t[-1])
    exact = exact_gradient(A, y0, W, T)
    tolerances = [1e-4, 1e-6, 1e-8] if quick else [1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10]
    func = LinearField(A)
    results: Dict[str, List[dict]] = {}
    for tol in tolerances:
        for name, solve in methods(func, tol).items():
            func.A.grad = None
            x0 = y0.clone().requires_grad_(True)
            func.nfe = 0
            yT = solve(x0, t)
            forward_nfe = func.nfe
            (W * yT).sum().backward()
            backward_nfe = func.nfe - forward_nfe
            g = torch.cat([func.A.grad.reshape(-1), x0.grad.reshape(-1)])
            error = float((g - exact).norm() / exact.norm())
            cost = forward_nfe if name in AUTOGRAD else backward_nfe
            results.setdefault(name, []).append(dict(tol=tol, fwd_nfe=forward_nfe, bwd_nfe=backward_nfe, cost=cost, error=error))
    rows = [[name, r["tol"], r["fwd_nfe"], r["bwd_nfe"], r["cost"], r["error"]] for name, rs in results.items() for r in rs]
    # Headline: the backward cost each method needs for a gradient error of 1e-6, read off
    # its error-vs-cost curve by log-log interpolation between the two sweep points around it.
    target = 1e-6
    reach = {name: cost_at(rs, target) for name, rs in results.items()}
    ours = reach.get("torchadjoint / Backsolve")
    headline = {}
    for name in ("torchdiffeq / odeint_adjoint", "torchdiffeq / odeint_adjoint (seminorm)", "torchode / BacksolveAdjoint"):
        if ours and reach.get(name):
            headline[f"accuracy: bwd cost for gradient error {target:g}, ours / {name}"] = ours / reach[name]
    return dict(
        name="accuracy",
        title="Problem 5: gradient accuracy against the analytic gradient (linear ODE, matrix_exp)",
        notes=(
            "`dy/dt = A y`, state 6, batch 16, float64, t in [0, 5], dopri5, rtol = atol = tol swept. "
            "Error = |g - g_exact| / |g_exact| for g = (dL/dA, dL/dy0); the exact gradient is autograd through "
            "`torch.linalg.matrix_exp`. Backward cost = vector-Jacobian products of f: backward nfe for adjoints, "
            "forward nfe for autograd through the solver (it backpropagates through every recorded call)."
        ),
        sections=[
            dict(title=f"Backward cost for a gradient error of {target:g} (log-log interpolation along the sweep)",
                 columns=["library / gradient", "backward cost"], rows=[[k, v] for k, v in reach.items()]),
            dict(title="Full sweep", columns=["library / gradient", "tol", "fwd nfe", "bwd nfe", "backward cost", "gradient rel. error"],
                 rows=rows),
        ],
        plots=[dict(
            file="accuracy_sweep.png", kind="line", logx=True, logy=True,
            title="Gradient error vs backward cost (linear ODE, tolerance swept)",
            xlabel="backward cost (vector-Jacobian products of f)", ylabel="relative gradient error",
            series={name: [[r["cost"] for r in rs], [max(r["error"], 1e-16) for r in rs]] for name, rs in results.items()},
        )],
        headline=headline,
    )


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(json.dumps(run(args.quick), indent=1, default=str))
