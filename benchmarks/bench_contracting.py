"""Contracting dynamics and bounded memory: backsolve against the checkpointed adjoint
and discretise-then-optimise.

1. Linear, ``dy/dt = A y`` with ``A`` symmetric, eigenvalues spread log-evenly over
   ``[-50, -1]`` (n = 6), ``t`` in ``[0, 10]``, dopri5, rtol 1e-8, atol 1e-10, float64.
   Loss ``w · y(10)``. Exact gradients ``dL/dy0``, ``dL/dA`` by autograd through
   ``torch.linalg.matrix_exp``.
2. A neural ODE with strongly contracting dynamics: ``f(y) = -diag(r) y + ½ MLP(y)``,
   rates ``r`` log-spread over ``[1, 50]``, MLP 4-16-4 tanh, ``t`` in ``[0, 10]`` (5 outputs),
   same tolerances. Reference gradient: ``Direct()`` with dopri8 at rtol 1e-12, atol 1e-14.

Backsolve re-solves ``y`` backwards, where every contracting mode becomes an expanding
one (``e^{50·10}``): its reconstruction warning fires and its parameter gradient is
garbage. The checkpointed adjoint and ``Direct`` never run ``y`` backwards.

3. Peak memory as the number of steps grows 100×: a rotation-dominated field
   (``f(y) = y Sᵀ + 0.1 tanh(y W₁ᵀ) W₂ᵀ``, S skew-symmetric, state (128, 16), float64,
   dopri5 rtol 1e-6), ``t`` in ``[0, T]`` for three ``T`` a factor 10 apart. Each
   measurement runs in a fresh process: peak resident memory (``ru_maxrss``) of one
   forward + backward minus the peak after setup. ``Direct()`` grows with the steps; the
   others do not (backsolve keeps no states; the checkpointed methods keep at most K per
   level, K = 16 here, and one segment of at most K steps).

``run(quick) -> dict`` for :mod:`benchmarks.report`; ``python benchmarks/bench_contracting.py [--quick]``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from typing import Dict

import torch
from torch import nn

try:
    from benchmarks import common, report
except ImportError:  # pragma: no cover - run as a script from benchmarks/
    import common  # type: ignore
    import report  # type: ignore

import torchadjoint as ta

D = torch.float64
TOL = dict(rtol=1e-8, atol=1e-10)


def contracting_linear(n: int = 6, fastest: float = 50.0, seed: int = 0):
    """(A (n, n) symmetric with eigenvalues -logspace(1, fastest), y0 (n,), w (n,))."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    rates = torch.logspace(0, torch.log10(torch.tensor(fastest)).item(), n, dtype=D)
    A = q @ torch.diag(-rates) @ q.T
    return A, torch.randn(n, generator=g, dtype=D), torch.randn(n, generator=g, dtype=D)


class ContractingField(nn.Module):
    """``f(y) = -diag(r) y + ½ MLP(y)``: every direction contracts at rate ≥ ~1, up to 50."""

    def __init__(self, n: int = 4, hidden: int = 16, fastest: float = 50.0, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.register_buffer("rates", torch.logspace(0, torch.log10(torch.tensor(fastest)).item(), n, dtype=D))
        self.net = nn.Sequential(nn.Linear(n, hidden), nn.Tanh(), nn.Linear(hidden, n)).to(D)

    def forward(self, t, y):
        return -self.rates * y + 0.5 * self.net(y)


def horizon(quick: bool) -> float:
    """The end time: 10 (the quick check: 3, where backsolve already fails by e^150)."""
    return 3.0 if quick else 10.0


BACKSOLVE = {False: "Backsolve()", True: "Backsolve(rtol=1e-5, atol=1e-7)"}


def methods(quick: bool = False) -> Dict[str, ta.GradientMethod]:
    # Backsolve at the forward's tolerance needs ~5000 backward steps here to produce its
    # garbage; the quick check runs it looser (the garbage is the same).
    return {
        BACKSOLVE[quick]: ta.Backsolve(rtol=1e-5, atol=1e-7) if quick else ta.Backsolve(),
        "Checkpointed()": ta.Checkpointed(),
        "Direct()": ta.Direct(),
        "Direct(checkpoints=16)": ta.Direct(checkpoints=16),
    }


def _gradients(run_loss, leaves, gradient):
    """(grads or None, warned, stats, seconds, error text)."""
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            loss, sol = run_loss(gradient)
            grads = torch.autograd.grad(loss, leaves)
            error = None
        except ta.SolveError as exc:
            grads, sol, error = None, None, f"SolveError at t={exc.t:.3g}" if hasattr(exc, "t") else "SolveError"
    warned = any(issubclass(w.category, ta.ReconstructionWarning) for w in caught)
    return grads, warned, (sol.stats if sol is not None else None), time.perf_counter() - start, error


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def linear_case(quick: bool) -> dict:
    A, y0, w = contracting_linear()
    A.requires_grad_(True)
    y0.requires_grad_(True)
    T = horizon(quick)
    t = torch.tensor([0.0, T], dtype=D)
    exact = torch.autograd.grad((torch.linalg.matrix_exp(A * T) @ y0 * w).sum(), (y0, A))

    def run_loss(gradient):
        sol = ta.solve(lambda s, y: A @ y, y0, t, gradient=gradient, params=[A], **TOL)
        return (sol.ys[-1] * w).sum(), sol

    rows, errors = [], {}
    for name, gradient in methods(quick).items():
        grads, warned, stats, seconds, error = _gradients(run_loss, (y0, A), gradient)
        errs = [rel(g, e) for g, e in zip(grads, exact)] if grads is not None else [None, None]
        errors[name] = errs
        back = (stats or {}).get("backward") or {}
        rows.append([name, errs[0], errs[1], warned, error, back.get("nfe"), seconds])
    return dict(rows=rows, errors=errors)


def neural_case(quick: bool) -> dict:
    field = ContractingField()
    params = list(field.parameters())
    y0 = torch.tensor([[1.0, -0.5, 0.8, 0.3], [-1.2, 0.4, 0.1, 0.9]], dtype=D, requires_grad=True)
    t = torch.linspace(0.0, horizon(quick), 5, dtype=D)

    def run_loss(gradient, **options):
        sol = ta.solve(field, y0, t, gradient=gradient, **(options or TOL))
        return (sol.ys[1:] ** 2).sum() + sol.ys[-1].sum(), sol

    loss, _ = run_loss(ta.Direct(), method="dopri8", rtol=1e-12, atol=1e-14)
    reference = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, [y0, *params])])
    rows, errors = [], {}
    for name, gradient in methods(quick).items():
        grads, warned, stats, seconds, error = _gradients(run_loss, [y0, *params], gradient)
        err = rel(torch.cat([g.reshape(-1) for g in grads]), reference) if grads is not None else None
        errors[name] = err
        back = (stats or {}).get("backward") or {}
        rows.append([name, err, warned, error, back.get("nfe"), seconds])
    return dict(rows=rows, errors=errors)


# --- memory -------------------------------------------------------------------------

MEMORY_METHODS = {
    "Direct()": lambda: ta.Direct(),
    "Direct(checkpoints=16)": lambda: ta.Direct(checkpoints=16),
    "Checkpointed(checkpoints=16)": lambda: ta.Checkpointed(checkpoints=16),
    "Backsolve()": lambda: ta.Backsolve(),
}


class RotatingField(nn.Module):
    """``f(y) = y Sᵀ + 0.1 tanh(y W₁ᵀ) W₂ᵀ``: oscillatory, so the steps grow with T."""

    def __init__(self, n: int = 16, hidden: int = 32, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        s = torch.randn(n, n, generator=g, dtype=D)
        self.register_buffer("S", (s - s.T) / n**0.5)
        self.w1 = nn.Parameter(torch.randn(hidden, n, generator=g, dtype=D) / n**0.5)
        self.w2 = nn.Parameter(torch.randn(n, hidden, generator=g, dtype=D) / hidden**0.5)

    def forward(self, t, y):
        return y @ self.S.T + 0.1 * torch.tanh(y @ self.w1.T) @ self.w2.T


def memory_child(name: str, t_end: float) -> dict:
    """One measurement (in a fresh process): peak RSS growth of forward + backward."""
    torch.set_num_threads(1)
    field = RotatingField()
    y0 = torch.randn(128, 16, dtype=D, generator=torch.Generator().manual_seed(1), requires_grad=True)
    # Warm up every code path on a short solve first, so the baseline holds them.
    warm = ta.solve(field, y0, torch.tensor([0.0, 0.05], dtype=D), gradient=MEMORY_METHODS[name](), rtol=1e-6, atol=1e-8)
    warm.ys[-1].pow(2).sum().backward()
    del warm
    baseline = common.status_kib("VmRSS") if common.reset_peak() else common.status_kib("VmHWM")
    sol = ta.solve(field, y0, torch.tensor([0.0, t_end], dtype=D), gradient=MEMORY_METHODS[name](), rtol=1e-6, atol=1e-8)
    sol.ys[-1].pow(2).sum().backward()
    peak = common.status_kib("VmHWM")
    return dict(peak_mib=(peak - baseline) / 1024.0, steps=sol.stats["forward"]["accepted"])


def memory_case(quick: bool) -> dict:
    lengths = [1.0, 10.0] if quick else [1.0, 10.0, 100.0]  # ~10, 100, 1000 steps
    table: Dict[str, Dict[float, dict]] = {}
    for name in MEMORY_METHODS:
        table[name] = {}
        for t_end in lengths:
            out = subprocess.run(
                [sys.executable, __file__, "--memory-child", json.dumps([name, t_end])],
                capture_output=True, text=True, check=True,
            )
            table[name][t_end] = json.loads(out.stdout.strip().splitlines()[-1])
    return dict(lengths=lengths, table=table)


def run(quick: bool = False) -> dict:
    torch.set_num_threads(1)
    linear = linear_case(quick)
    neural = neural_case(quick)
    memory = memory_case(quick)
    lengths = memory["lengths"]
    T = horizon(quick)
    steps = [memory["table"]["Direct()"][T]["steps"] for T in lengths]
    memory_rows = [[name] + [memory["table"][name][T]["peak_mib"] for T in lengths] +
                   [memory["table"][name][lengths[-1]]["peak_mib"] / max(memory["table"][name][lengths[0]]["peak_mib"], 1e-3)]
                   for name in MEMORY_METHODS]
    headline = {
        "contracting linear: dL/dA rel. error, backsolve": linear["errors"][BACKSOLVE[quick]][1],
        "contracting linear: dL/dA rel. error, checkpointed": linear["errors"]["Checkpointed()"][1],
        "contracting neural ODE: rel. error, backsolve": neural["errors"][BACKSOLVE[quick]],
        "contracting neural ODE: rel. error, checkpointed": neural["errors"]["Checkpointed()"],
        f"memory: Direct() peak growth for {steps[-1] / steps[0]:.0f}x the steps": memory_rows[0][-1],
        f"memory: Direct(checkpoints=16) peak growth for {steps[-1] / steps[0]:.0f}x the steps": memory_rows[1][-1],
        f"memory: Checkpointed(checkpoints=16) peak growth for {steps[-1] / steps[0]:.0f}x the steps": memory_rows[2][-1],
    }
    return dict(
        name="contracting",
        title="Contracting dynamics and bounded memory: backsolve, checkpointed adjoint, discretise-then-optimise",
        notes=(
            f"Linear: A symmetric with eigenvalues log-spread over [-50, -1] (n = 6), t in [0, {T:g}], dopri5, "
            f"rtol 1e-8, atol 1e-10, float64, loss w·y({T:g}); exact gradient by matrix_exp. Neural ODE: "
            "f(y) = -diag(r) y + ½ MLP(y), r log-spread over [1, 50], MLP 4-16-4 tanh, batch 2, 5 outputs on "
            f"[0, {T:g}], same tolerances; reference: Direct() with dopri8 at rtol 1e-12. Memory: rotation-dominated "
            "field, state (128, 16) float64, dopri5 rtol 1e-6; peak RSS growth of one forward + backward in a "
            f"fresh process (includes allocator noise of a few MiB). Machine: {common.machine()}."
        ),
        sections=[
            dict(title="Contracting linear system (gradient relative error against matrix_exp)",
                 columns=["gradient", "dL/dy0", "dL/dA", "reconstruction warning", "failure", "bwd nfe", "fwd+bwd s"],
                 rows=linear["rows"]),
            dict(title="Contracting neural ODE (gradient relative error against the reference)",
                 columns=["gradient", "dL/d(y0, θ)", "reconstruction warning", "failure", "bwd nfe", "fwd+bwd s"],
                 rows=neural["rows"]),
            dict(title=f"Peak memory (MiB) as the steps grow: {steps} forward steps",
                 columns=["gradient"] + [f"T = {T:g}" for T in lengths] + ["growth"],
                 rows=memory_rows),
        ],
        headline=headline,
        metrics=dict(linear=linear["errors"], neural=neural["errors"], memory=memory, steps=steps),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child is not None:
        name, t_end = json.loads(args.memory_child)
        print(json.dumps(memory_child(name, t_end)))
        return
    result = run(args.quick)
    print(f"# {common.machine()}")
    report.print_sections(result)


if __name__ == "__main__":
    main()
