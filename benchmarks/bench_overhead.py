"""Problem 6: solver overhead — wall time per function evaluation minus the cost of f.

For each library we time a solve and divide by its function evaluations; from that we
subtract the time ``f`` itself takes (forward pass), or ``f`` plus one vector-Jacobian
product (backward pass of an adjoint), measured by calling them alone in a loop on a state
of the same shape. What is left is what the solver spends per evaluation on everything
else: Runge–Kutta arithmetic, error norms, step-size control, dense output, bookkeeping,
host–device synchronisation, and (for an adjoint) packing the augmented state.

Two problems: the demo field (batch 20, state 2: f costs a few microseconds, so overhead
dominates; 10 output times on [0, 25]) and the MLP of problem 2 (f dominates). Forward:
solves without gradients. Backward: the backward pass of each library's backsolve adjoint
(ours ``Backsolve``, torchdiffeq ``odeint_adjoint``, torchode ``BacksolveAdjoint``).

``run(quick) -> dict`` for :mod:`benchmarks.report`.
"""
from __future__ import annotations

import time
from typing import Callable, Dict

import torch

try:
    from benchmarks import common
    from benchmarks.bench_peers import OurSolve, alternate_budget, f_costs, summarise, torchode_solver
except ImportError:  # pragma: no cover
    import common  # type: ignore
    from bench_peers import OurSolve, alternate_budget, f_costs, summarise, torchode_solver  # type: ignore

import torchadjoint as ta

try:
    import torchdiffeq
except ImportError:
    torchdiffeq = None
try:
    import torchode as to
except ImportError:
    to = None


def problems() -> Dict[str, dict]:
    f1, y1, _ = common.demo_problem()
    f2, y2, t2 = common.mlp_problem()
    return {
        "demo": dict(label="demo field, batch 20 × 2, 10 outputs", func=f1, y0=y1,
                     t=torch.linspace(0.0, 25.0, 10), rtol=1e-6, atol=1e-7),
        "mlp": dict(label="MLP 32-128-128-32, batch 256, 1 output", func=f2, y0=y2, t=t2, rtol=1e-5, atol=1e-5),
    }


def forward_runs(spec: dict) -> Dict[str, Callable[[], dict]]:
    func, y0, t, rtol, atol = spec["func"], spec["y0"], spec["t"], spec["rtol"], spec["atol"]

    def timed(solve):
        def once():
            func.nfe = 0
            start = time.perf_counter()
            with torch.no_grad():
                solve()
            return dict(s=time.perf_counter() - start, nfe=func.nfe)

        return once

    runs = {"torchadjoint": timed(lambda: ta.solve(func, y0, t, rtol=rtol, atol=atol))}
    if torchdiffeq is not None:
        runs["torchdiffeq"] = timed(lambda: torchdiffeq.odeint(func, y0, t, rtol=rtol, atol=atol, method="dopri5"))
    if to is not None:
        solver = torchode_solver("autodiff", func, rtol, atol)
        batch = y0.shape[0]
        runs["torchode"] = timed(lambda: solver.solve(to.InitialValueProblem(y0=y0, t_eval=t.expand(batch, -1))))
    return runs


def backward_runs(spec: dict) -> Dict[str, Callable[[], dict]]:
    func, y0, t, rtol, atol = spec["func"], spec["y0"], spec["t"], spec["rtol"], spec["atol"]
    params = tuple(func.parameters())

    def timed(solve):
        def once():
            for p in params:
                p.grad = None
            loss = solve(t).pow(2).mean()
            func.nfe = 0
            start = time.perf_counter()
            loss.backward()
            elapsed = time.perf_counter() - start
            # VJPs made without a call of f (ours, at the adjoint's jumps); peers: one per call.
            stats = getattr(solve, "stats", None)
            vjps = ((stats or {}).get("backward") or {}).get("nvjp", func.nfe)
            return dict(s=elapsed, nfe=func.nfe, extra_vjp=max(vjps - func.nfe, 0))

        return once

    runs = {"torchadjoint": timed(OurSolve(func, y0, rtol, atol, ta.Backsolve()))}
    if torchdiffeq is not None:
        runs["torchdiffeq"] = timed(lambda t: torchdiffeq.odeint_adjoint(
            func, y0, t, rtol=rtol, atol=atol, method="dopri5", adjoint_params=params))
    if to is not None:
        solver = torchode_solver("backsolve", func, rtol, atol)
        batch = y0.shape[0]
        runs["torchode"] = timed(lambda t: solver.solve(to.InitialValueProblem(y0=y0, t_eval=t.expand(batch, -1))).ys)
    return runs


def run(quick: bool = False) -> dict:
    repeats = 1 if quick else 7
    rows, headline = [], {}
    forward_series: Dict[str, float] = {}
    backward_series: Dict[str, float] = {}
    for key, spec in problems().items():
        calls = (50 if key == "demo" else 10) if quick else (400 if key == "demo" else 60)
        cost = f_costs(spec["func"], spec["y0"], calls)
        for direction, make in (("forward", forward_runs), ("backward", backward_runs)):
            runs = make(spec)
            runs["f alone"] = cost
            samples = alternate_budget(runs, repeats, budget_s=20.0 if not quick else 0.0, warmups=dict(runs))
            stats = {name: summarise(s) for name, s in samples.items()}
            f_s = stats["f alone"]["f_s" if direction == "forward" else "vjp_s"]
            overhead = {}
            for name, s in stats.items():
                if name == "f alone":
                    continue
                per_eval = s["s"] / s["nfe"]
                # VJPs without a call of f are not solver overhead: take their cost out first.
                extra = s.get("extra_vjp", 0) * stats["f alone"]["vjp_only_s"] / s["nfe"]
                overhead[name] = per_eval - extra - f_s
                rows.append([spec["label"], direction, name, s["nfe"], 1e6 * per_eval, 1e6 * f_s, 1e6 * overhead[name],
                             overhead["torchadjoint"] / overhead[name] if name != "torchadjoint" else None, s["runs"]])
            series = forward_series if direction == "forward" else backward_series
            for name, value in overhead.items():
                series[f"{key}: {name}"] = max(1e6 * value, 1e-3)
            for name in overhead:
                if name != "torchadjoint":
                    headline[f"overhead per eval, {key} {direction}, ours / {name}"] = overhead["torchadjoint"] / overhead[name]
    return dict(
        name="overhead",
        title="Problem 6: solver overhead per function evaluation",
        notes=(
            "Overhead = (solve time / nfe) − (time of f alone) in the forward pass, and "
            "(backward time − VJPs made without a call of f × one VJP) / backward nfe − (time of f + one VJP w.r.t. "
            "state and parameters) in an adjoint's backward pass; f, f + VJP and VJP alone are timed in a loop on a state of the same shape, alternating with the "
            "solves. Forward: solves without gradients (torchode: AutoDiffAdjoint under no_grad). Backward: "
            "Backsolve / odeint_adjoint / BacksolveAdjoint. Times in microseconds, medians. A negative overhead "
            "means the library's calls of f ran faster than the isolated loop (timing noise of the order of the "
            "difference)."
        ),
        sections=[dict(
            title="Overhead per function evaluation",
            columns=["problem", "pass", "library", "nfe", "µs per eval", "µs f (+VJP)", "µs overhead",
                     "ours/theirs overhead", "runs"],
            rows=rows,
        )],
        plots=[
            dict(file="overhead_forward.png", kind="bar", title="Forward overhead per function evaluation",
                 xlabel="µs per evaluation (log scale)", logx=True, series=forward_series),
            dict(file="overhead_backward.png", kind="bar", title="Backward (adjoint) overhead per function evaluation",
                 xlabel="µs per evaluation (log scale)", logx=True, series=backward_series),
        ],
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
