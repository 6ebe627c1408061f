"""Quadrature adjoint against backsolve when the parameters are many.

A network-dominated field with about 2.8e5 parameters and a small batch: state (4, 16),
MLP 16-512-512-16 tanh, t in [0, 5], dopri5, rtol 1e-6, atol 1e-7, float32. Backsolve
carries ``a_θ`` (p = 279 568) in its backward state: every stage computes a weight gradient
and every stage combination, error estimate and dense-output step runs over ``2n + p``
numbers. The quadrature adjoint integrates ``(y, a_y)`` (2n = 128) with VJPs in ``y`` only and
adds ``∫ a_y ∂f/∂θ dt`` by a 3-node Gauss rule per backward step, the nodes of many steps
evaluated in one batched call of ``f`` (``torch.func.vmap``, the default; or a plain call
on the stacked states) with one parameter VJP, or one call per node and one VJP per step
(``batching="loop"``, for ``f`` that cannot be vmapped).

We time the backward pass alone: one forward solve per method, then its backward pass
repeated with ``retain_graph=True`` (alternating methods, single thread, medians). Also
reported: backward function evaluations and VJPs, and the relative difference of the two
gradients (both approximate the same continuous adjoint).

``run(quick) -> dict`` for :mod:`benchmarks.report`; ``python benchmarks/bench_quadrature.py --quick``.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import nn

try:
    from benchmarks import common
except ImportError:  # pragma: no cover - run as a script from benchmarks/
    import common  # type: ignore

import torchadjoint as ta


class WideField(nn.Module):
    """``f(y) = MLP(y)``, 16-hidden-hidden-16 with tanh: (batch, 16) -> (batch, 16)."""

    def __init__(self, dim: int = 16, hidden: int = 512):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, dim))

    def forward(self, t, y):
        return self.net(y)


def make_problem(hidden: int = 512, batch: int = 4, t_end: float = 5.0, seed: int = 0):
    torch.manual_seed(seed)
    func = WideField(hidden=hidden)
    y0 = torch.randn(batch, 16)
    t = torch.tensor([0.0, t_end])
    return func, y0, t


def backward_runs(func, y0, t, methods: Dict[str, ta.GradientMethod], tol: dict):
    """For each method: a callable running the backward pass once, and the solution (for stats)."""
    params = list(func.parameters())
    runs: Dict[str, Callable[[], None]] = {}
    solutions, grads = {}, {}
    for name, method in methods.items():
        sol = ta.solve(func, y0, t, gradient=method, **tol)
        loss = sol.ys[-1].pow(2).sum()

        def once(loss=loss, name=name):
            grads[name] = torch.autograd.grad(loss, params, retain_graph=True)

        runs[name] = once
        solutions[name] = sol
    return runs, solutions, grads


def run(quick: bool = False) -> dict:
    torch.set_num_threads(1)
    func, y0, t = make_problem(t_end=2.0 if quick else 5.0)
    p = sum(x.numel() for x in func.parameters())
    tol = dict(rtol=1e-6, atol=1e-7)
    methods = {
        "Backsolve": ta.Backsolve(),
        "Quadrature": ta.Quadrature(),
        "Quadrature(batching='stack')": ta.Quadrature(batching="stack"),
        "Quadrature(batching='loop')": ta.Quadrature(batching="loop"),
    }
    runs, solutions, grads = backward_runs(func, y0, t, methods, tol)
    times = common.alternate(runs, repeats=2 if quick else 7, warmup=1)
    med = {name: common.median(ts) for name, ts in times.items()}
    flat = {name: torch.cat([g.reshape(-1) for g in gs]) for name, gs in grads.items()}
    ref = flat["Backsolve"]
    rows = []
    for name in methods:
        st = solutions[name].stats["backward"]
        rows.append([name, med[name], med["Backsolve"] / med[name], st["nfe"], st.get("nvjp"), st["accepted"],
                     float((flat[name] - ref).norm() / ref.norm())])
    ratio = med["Backsolve"] / med["Quadrature"]
    ratio_stacked = med["Backsolve"] / med["Quadrature(batching='stack')"]
    ratio_loop = med["Backsolve"] / med["Quadrature(batching='loop')"]
    return dict(
        name="quadrature",
        title="Quadrature adjoint vs backsolve with many parameters",
        notes=(
            f"MLP 16-512-512-16 tanh ({p} parameters), state (4, 16), t in [0, {float(t[-1]):g}], dopri5, "
            f"rtol 1e-6, atol 1e-7, float32; backward pass alone, median of alternating runs. "
            f"Machine: {common.machine()}."
        ),
        sections=[dict(
            title="Backward pass",
            columns=["gradient", "backward s", "speed-up vs backsolve", "bwd nfe", "bwd VJPs", "bwd steps",
                     "grad rel. diff vs backsolve"],
            rows=rows,
        )],
        headline={
            "quadrature: backward time, backsolve / quadrature (2.8e5 params)": ratio,
            "quadrature: backward time, backsolve / quadrature with stacked nodes": ratio_stacked,
            "quadrature: backward time, backsolve / quadrature with one call per node": ratio_loop,
        },
        metrics=dict(params=p, median_s=med, ratio=ratio, ratio_stacked=ratio_stacked, ratio_loop=ratio_loop),
    )


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(run(args.quick), indent=1, default=str))
