"""Stiff problems: the implicit solvers (ESDIRK kvaerno3/kvaerno5) against scipy's Radau
and BDF and against our best explicit method, forward and gradients.

Four problems, float64, one process, single-threaded:

1. Robertson's chemical kinetics (3 species, rate constants k = (0.04, 1e4, 3e7) as
   parameters), outputs at t = 1, 1e2, 1e4, 1e5; rtol 1e-6, atol 1e-10.
2. Van der Pol, ``y1' = y2``, ``y2' = μ (1 - y1²) y2 - y1`` with μ = 1000 (a parameter),
   y0 = (2, 0), outputs at t = 1000, 2000, 3000 (past two relaxation jumps); rtol 1e-6, atol 1e-6.
3. A linear system ``y' = A y``, A symmetric with eigenvalues log-spread over [-1e4, -1]
   (n = 10), outputs at t = 0.1, 1, 10; rtol 1e-8, atol 1e-10; exact by ``matrix_exp``.
4. The contracting system of bench_contracting (eigenvalues -1 … -50, n = 6, t in [0, 10]);
   rtol 1e-8, atol 1e-10; exact by ``matrix_exp``.

Forward: accuracy against a tight reference (scipy Radau at rtol 1e-12 for 1–2, the exact
solution for 3–4) as the largest error relative to each component's size
(``max |y - ref| / max(|ref|, atol)`` over outputs and components), with function
evaluations (nfe), Jacobian evaluations, LU factorisations, linear solves (ours: one per
Newton iteration) and wall time. scipy gets the same exact Jacobian (autograd, through
``jac=``), so its ``nfev`` counts ``f`` alone, as ours counts calls of ``f`` (a Jacobian by
``torch.func.jacrev`` is one call, counted in both nfe and Jacobians). The explicit method
(dopri5) is capped at ``EXPLICIT_CAP`` steps; where it does not finish, the table says
where it stopped.

Gradients: loss ``Σ_i w · y(t_i)``; ``dL/dy0`` and ``dL/dθ`` (θ: k, μ, A) for every gradient
method, against ``matrix_exp`` (3–4) or central finite differences of scipy Radau solves at
rtol 1e-12 (1–2; relative steps 1e-6). Backsolve and Quadrature re-solve ``y`` backwards in
time, which stiff contracting dynamics make explosive whatever the method: they are run
with a step cap and reported as they end. Van der Pol's outputs after a relaxation jump are
ill-conditioned in θ and y0: gradients there converge slowly with the tolerance (measured:
Direct 20 % off at rtol 1e-6, 0.1 % at 1e-10), and the checkpointed adjoint at the
forward's tolerance can be far off — hence the row with a 1000x tighter backward solve.

``run(quick) -> dict`` for :mod:`benchmarks.report`; ``python benchmarks/bench_stiff.py [--quick]``.
"""
from __future__ import annotations

import argparse
import time
import warnings
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

try:
    from benchmarks import common, report
    from benchmarks.bench_contracting import contracting_linear
except ImportError:  # pragma: no cover - run as a script from benchmarks/
    import common  # type: ignore
    import report  # type: ignore
    from bench_contracting import contracting_linear  # type: ignore

import torchadjoint as ta

D = torch.float64
EXPLICIT = "dopri5"
IMPLICIT = ("kvaerno5", "kvaerno3")


def robertson_field(k):
    def f(t, y):
        y1, y2, y3 = y.unbind(-1)
        return torch.stack([-k[0] * y1 + k[1] * y2 * y3, k[0] * y1 - k[1] * y2 * y3 - k[2] * y2**2, k[2] * y2**2], -1)

    return f


def van_der_pol_field(mu):
    def f(t, y):
        return torch.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])

    return f


def linear_field(a):
    return lambda t, y: a @ y


def spread_matrix(n: int = 10, slowest: float = 1.0, fastest: float = 1e4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    rates = torch.logspace(np.log10(slowest), np.log10(fastest), n, dtype=D)
    return q @ torch.diag(-rates) @ q.T, torch.randn(n, generator=g, dtype=D), torch.randn(n, generator=g, dtype=D)


def problems(quick: bool) -> Dict[str, dict]:
    """name -> dict(field(θ) -> f, theta, y0, times (with t0), w, tol, exact(θ, y0) or None)."""
    a_spread, y0_spread, w_spread = spread_matrix()
    a_con, y0_con, w_con = contracting_linear()
    linear_exact = lambda a, y0, times: torch.stack([torch.linalg.matrix_exp(a * t) @ y0 for t in times[1:]])  # noqa: E731
    return {
        "Robertson": dict(
            field=robertson_field, theta=torch.tensor([0.04, 1e4, 3e7], dtype=D), y0=torch.tensor([1.0, 0.0, 0.0], dtype=D),
            times=[0.0, 1.0, 1e2, 1e3] if quick else [0.0, 1.0, 1e2, 1e4, 1e5],
            w=torch.tensor([1.0, 1e4, 1.0], dtype=D), tol=dict(rtol=1e-6, atol=1e-10), exact=None),
        "Van der Pol μ=1000": dict(
            field=van_der_pol_field, theta=torch.tensor(1000.0, dtype=D), y0=torch.tensor([2.0, 0.0], dtype=D),
            times=[0.0, 500.0, 1000.0] if quick else [0.0, 1000.0, 2000.0, 3000.0],
            w=torch.tensor([1.0, 1.0], dtype=D), tol=dict(rtol=1e-6, atol=1e-6), exact=None),
        "linear, eigenvalues -1e4…-1": dict(
            field=linear_field, theta=a_spread, y0=y0_spread, times=[0.0, 0.1, 1.0] if quick else [0.0, 0.1, 1.0, 10.0],
            w=w_spread, tol=dict(rtol=1e-8, atol=1e-10), exact=linear_exact),
        "contracting, eigenvalues -50…-1": dict(
            field=linear_field, theta=a_con, y0=y0_con, times=[0.0, 3.0] if quick else [0.0, 10.0],
            w=w_con, tol=dict(rtol=1e-8, atol=1e-10), exact=linear_exact),
    }


def scipy_solve(f, y0, times, method, rtol, atol, jac=True):
    """(ys (N-1, n) at times[1:], stats dict, seconds) by scipy.integrate.solve_ivp."""
    from scipy.integrate import solve_ivp

    def fun(t, y):
        return f(torch.tensor(t, dtype=D), torch.from_numpy(y)).numpy()

    def jacobian(t, y):
        return torch.func.jacrev(lambda x: f(torch.tensor(t, dtype=D), x))(torch.from_numpy(y)).numpy()

    start = time.perf_counter()
    with torch.no_grad():
        # Dense output rather than t_eval, so that r.t lists every step.
        r = solve_ivp(fun, (times[0], times[-1]), y0.numpy(), method=method, dense_output=True, rtol=rtol, atol=atol,
                      jac=jacobian if jac else None)
    seconds = time.perf_counter() - start
    if not r.success:
        raise RuntimeError(f"scipy {method}: {r.message}")
    ys = np.stack([r.sol(t) for t in times[1:-1]] + [r.y[:, -1]])
    return torch.from_numpy(ys), dict(nfe=r.nfev, njev=r.njev, nlu=r.nlu, steps=len(r.t) - 1), seconds


def reference(problem: dict, theta=None, y0=None) -> torch.Tensor:
    theta = problem["theta"] if theta is None else theta
    y0 = problem["y0"] if y0 is None else y0
    if problem["exact"] is not None:
        return problem["exact"](theta, y0, problem["times"])
    atol = problem["tol"]["atol"] * 1e-4
    return scipy_solve(problem["field"](theta), y0, problem["times"], "Radau", 1e-12, atol)[0]


def error(ys: torch.Tensor, ref: torch.Tensor, atol: float) -> float:
    return float(((ys - ref).abs() / torch.clamp(ref.abs(), min=atol)).max())


def forward_rows(name: str, problem: dict, ref: torch.Tensor, explicit_cap: int) -> List[list]:
    f = problem["field"](problem["theta"])
    t = torch.tensor(problem["times"], dtype=D)
    atol = problem["tol"]["atol"]
    rows = []
    for method in IMPLICIT + (EXPLICIT,):
        cap = explicit_cap if method == EXPLICIT else 10**6
        start = time.perf_counter()
        try:
            sol = ta.solve(f, problem["y0"], t, method=method, max_num_steps=cap, **problem["tol"])
            s = sol.stats["forward"]
            rows.append([name, method, error(sol.ys[1:], ref, atol), s["nfe"], s.get("njev", 0), s.get("nlu", 0),
                         s.get("nsolve", 0), s["steps"], time.perf_counter() - start, ""])
        except ta.SolveError as exc:
            rows.append([name, method, None, None, None, None, None, cap, time.perf_counter() - start,
                         f"stopped at t={exc.t:.3g} after {cap} steps"])
    for method in ("Radau", "BDF"):
        ys, s, seconds = scipy_solve(f, problem["y0"], problem["times"], method, **problem["tol"])
        rows.append([name, f"scipy {method}", error(ys, ref, atol), s["nfe"], s["njev"], s["nlu"], None, s["steps"],
                     seconds, ""])
    return rows


BACKWARD_CAP = 300


def gradient_methods(tol: dict) -> Dict[str, ta.GradientMethod]:
    tight = dict(rtol=tol["rtol"] * 1e-3, atol=tol["atol"] * 1e-3)
    return {
        "Direct()": ta.Direct(),
        "Direct(checkpoints=16)": ta.Direct(checkpoints=16),
        "Checkpointed()": ta.Checkpointed(),
        "Checkpointed(backward tol ×1e-3)": ta.Checkpointed(**tight),
        # Capped: their backward re-solve of y explodes on these problems (see the notes).
        f"Backsolve(≤{BACKWARD_CAP} steps)": ta.Backsolve(options=dict(max_num_steps=BACKWARD_CAP)),
        f"Quadrature(≤{BACKWARD_CAP} steps)": ta.Quadrature(options=dict(max_num_steps=BACKWARD_CAP)),
    }


def loss_of(ys: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (ys * w).sum()


def reference_gradients(problem: dict):
    """(dL/dy0, dL/dθ) in float64: autograd through matrix_exp, or central differences."""
    theta, y0, w = problem["theta"], problem["y0"], problem["w"]
    if problem["exact"] is not None:
        th, y = theta.clone().requires_grad_(True), y0.clone().requires_grad_(True)
        return torch.autograd.grad(loss_of(problem["exact"](th, y, problem["times"]), w), (y, th))

    def loss(th, y):
        return float(loss_of(reference(problem, th, y), w))

    def central(x, shift_other):
        g = torch.zeros_like(x).reshape(-1)
        flat = x.reshape(-1)
        for i in range(flat.numel()):
            eps = 1e-6 * max(abs(float(flat[i])), 1e-2)
            up, down = flat.clone(), flat.clone()
            up[i] += eps
            down[i] -= eps
            g[i] = (shift_other(up.reshape(x.shape)) - shift_other(down.reshape(x.shape))) / (2 * eps)
        return g.reshape(x.shape)

    return central(y0, lambda y: loss(theta, y)), central(theta, lambda th: loss(th, y0))


def gradient_rows(name: str, problem: dict, ref_grads) -> List[list]:
    t = torch.tensor(problem["times"], dtype=D)
    rows = []
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    for label, gradient in gradient_methods(problem["tol"]).items():
        theta = problem["theta"].clone().requires_grad_(True)
        y0 = problem["y0"].clone().requires_grad_(True)
        f = problem["field"](theta)
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                sol = ta.solve(f, y0, t, method="kvaerno5", gradient=gradient, params=[theta], **problem["tol"])
                gy, gth = torch.autograd.grad(loss_of(sol.ys[1:], problem["w"]), (y0, theta))
                back = sol.stats["backward"] or {}
                failure = ""
                errs = [rel(gy, ref_grads[0]), rel(gth, ref_grads[1])]
            except (ta.SolveError, RuntimeError) as exc:
                back, errs = {}, [None, None]
                failure = f"SolveError at t={exc.t:.3g}" if isinstance(exc, ta.SolveError) else str(exc)[:80]
        trust = (ta.ReconstructionWarning, ta.AdjointMismatchWarning)
        warned = ", ".join(sorted({w.category.__name__ for w in caught if issubclass(w.category, trust)})) or "no"
        rows.append([name, label, errs[0], errs[1], warned, failure, back.get("nfe"), back.get("nvjp"),
                     back.get("steps"), time.perf_counter() - start])
    return rows


# --- Newton's linear solvers at scale (Dense / BatchedDense / Krylov) --------------------

def batch_of_systems(b: int, m: int, seed: int = 0):
    """``y_b' = A_b y_b - y_b³ + 2 cos t`` for b independent rows of m: each A_b rotated, with
    eigenvalues log-spread over [-1e3, -1]. Returns (f, y0 (b, m))."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(b, m, m, generator=g, dtype=D))
    eig = -torch.logspace(0, 3, m, dtype=D).expand(b, m) * (1 + 0.1 * torch.rand(b, m, generator=g, dtype=D))
    a = (q * eig[:, None, :]) @ q.transpose(1, 2)
    return (lambda t, y: (a @ y[..., None])[..., 0] - y**3 + 2 * torch.cos(t)), torch.randn(b, m, generator=g, dtype=D)


def diffusion(n: int):
    """``u_t = u_xx - u³`` on (0, 1), zero at both ends, n interior points (eigenvalues to about -4n²)."""
    dx = 1.0 / (n + 1)
    x = torch.linspace(dx, 1 - dx, n, dtype=D)

    def f(t, u):
        padded = torch.nn.functional.pad(u, (1, 1))
        return (padded[2:] - 2 * u + padded[:-2]) / dx**2 - u**3

    return f, torch.sin(np.pi * x) + 0.5 * torch.sin(5 * np.pi * x)


def diffusion_2d(n: int):
    """``u_t = Δu - u³`` on the unit square, zero on the boundary, an (n, n) interior grid."""
    dx = 1.0 / (n + 1)
    x = torch.linspace(dx, 1 - dx, n, dtype=D)

    def f(t, u):
        p = torch.nn.functional.pad(u, (1, 1, 1, 1))
        return (p[2:, 1:-1] + p[:-2, 1:-1] + p[1:-1, 2:] + p[1:-1, :-2] - 4 * u) / dx**2 - u**3

    return f, torch.outer(torch.sin(np.pi * x), torch.sin(2 * np.pi * x)) + 0.3 * torch.outer(x, 1 - x)


def _solver_row(problem, label, f, y0, t, spec, ref=None, tol=dict(rtol=1e-6, atol=1e-8)):
    from torchadjoint.tableaux import METHODS

    start = time.perf_counter()
    sol = ta.solve(f, y0, t, method=METHODS["kvaerno5"].with_linear_solver(spec), **tol)
    seconds = time.perf_counter() - start
    s = sol.stats["forward"]
    diff = None if ref is None else float((sol.ys - ref).abs().max() / ref.abs().max())
    return [problem, label, diff, s["nfe"], s["njev"], s["nlu"], s["nsolve"], s.get("njvp"), s["steps"], seconds, ""], sol


def _dense_one_jacobian(f, y0) -> float:
    """Seconds for one dense Jacobian and one LU of I - γhJ, as the Dense() path takes per step."""
    from torchadjoint.implicit.jacobian import JacobianEvaluator

    flat = lambda t, y: f(torch.tensor(t, dtype=D), y.view(y0.shape)).reshape(-1)  # noqa: E731
    start = time.perf_counter()
    ev = JacobianEvaluator()
    ev.factor(ev(flat, 0.0, y0.reshape(-1)), 0.01)
    return time.perf_counter() - start


def linear_solver_rows(quick: bool) -> List[list]:
    from torchadjoint.implicit import BatchedDense, Dense, Krylov

    rows = []
    t = torch.tensor([0.0, 0.5, 1.0], dtype=D)
    # A small batch, where the dense path can run to the end: the same answers.
    b_small, m = 16, 32
    f, y0 = batch_of_systems(b_small, m)
    ref_row, ref = _solver_row(f"batch ({b_small}, {m})", "Dense()", f, y0, t, Dense())
    rows.append(ref_row)
    for label, spec in ((f"BatchedDense({b_small})", BatchedDense(b_small)), ("Krylov()", Krylov())):
        rows.append(_solver_row(f"batch ({b_small}, {m})", label, f, y0, t, spec, ref.ys)[0])
    # The large batch: the block path and Krylov run; the dense path is timed on one Jacobian + LU.
    b_big = 64 if quick else 256
    f, y0 = batch_of_systems(b_big, m)
    row, ref = _solver_row(f"batch ({b_big}, {m})", f"BatchedDense({b_big})", f, y0, t, BatchedDense(b_big))
    rows.append(row)
    rows.append(_solver_row(f"batch ({b_big}, {m})", "Krylov()", f, y0, t, Krylov(), ref.ys)[0])
    one = _dense_one_jacobian(f, y0)
    njev = row[4]
    rows.append([f"batch ({b_big}, {m})", "Dense()", None, None, None, None, None, None, None, one,
                 f"not run: one {b_big * m}² Jacobian + LU took {one:.3g} s; the solve needs {njev} (≈ {one * njev:.3g} s)"])
    # A discretised PDE: matrix-free against dense.
    n = 200 if quick else 1000
    f, u0 = diffusion(n)
    t = torch.tensor([0.0, 0.01, 0.05], dtype=D)
    ref_row, ref = _solver_row(f"diffusion n={n}", "Dense()", f, u0, t, Dense())
    rows.append(ref_row)
    rows.append(_solver_row(f"diffusion n={n}", "Krylov()", f, u0, t, Krylov(), ref.ys)[0])
    # 2-D: the dense Jacobian is (n²)²; matrix-free runs, the dense path is timed on one Jacobian + LU.
    n = 24 if quick else 48
    f, u0 = diffusion_2d(n)
    row, _ = _solver_row(f"diffusion 2-D {n}×{n}", "Krylov()", f, u0, t, Krylov())
    rows.append(row)
    one = _dense_one_jacobian(f, u0)
    rows.append([f"diffusion 2-D {n}×{n}", "Dense()", None, None, None, None, None, None, None, one,
                 f"not run: one {n * n}² Jacobian + LU took {one:.3g} s; Krylov's solve took {row[4]} linearisations"])
    return rows


LINEAR_SOLVER_COLUMNS = ["problem", "linear solver", "max diff vs first row", "nfe", "Jacobians", "LU", "linear solves",
                         "JVPs", "steps", "s", "note"]


def run(quick: bool = False, only: Optional[Sequence[str]] = None) -> dict:
    """``only``: the problems to run (names as in :func:`problems`); then the section on the
    linear solvers is left out."""
    torch.set_num_threads(1)
    explicit_cap = 2000 if quick else 20000
    forward, gradients, headline = [], [], {}
    chosen = problems(quick)
    if only:
        unknown = sorted(set(only) - set(chosen))
        if unknown:
            raise ValueError(f"unknown problem(s) {unknown}; choose among {list(chosen)}")
        chosen = {name: chosen[name] for name in only}
    for name, problem in chosen.items():
        ref = reference(problem)
        rows = forward_rows(name, problem, ref, explicit_cap)
        forward += rows
        by = {r[1]: r for r in rows}
        headline[f"{name}: kvaerno5 nfe / scipy Radau nfe"] = by["kvaerno5"][3] / by["scipy Radau"][3]
        if by[EXPLICIT][3] is not None:
            headline[f"{name}: {EXPLICIT} steps / kvaerno5 steps"] = by[EXPLICIT][7] / by["kvaerno5"][7]
        else:
            headline[f"{name}: {EXPLICIT} steps / kvaerno5 steps"] = f"> {explicit_cap / by['kvaerno5'][7]:.0f} (capped)"
        gradients += gradient_rows(name, problem, reference_gradients(problem))
    solvers = [] if only else linear_solver_rows(quick)
    return dict(
        name="stiff",
        title="Stiff problems: implicit solvers (kvaerno5, kvaerno3) against scipy Radau/BDF and dopri5",
        notes=(
            "Robertson (k = 0.04, 1e4, 3e7; t to " + ("1e3" if quick else "1e5") + "; rtol 1e-6, atol 1e-10), "
            "Van der Pol μ = 1000 (y0 = (2, 0); rtol = atol = 1e-6), linear with eigenvalues log-spread over "
            "[-1e4, -1] (n = 10; rtol 1e-8, atol 1e-10), contracting (eigenvalues -1…-50, n = 6, T = "
            + ("3" if quick else "10") + "; rtol 1e-8, atol 1e-10); float64, one thread. Error: largest "
            "|y - ref| / max(|ref|, atol) over outputs and components, ref = scipy Radau at rtol 1e-12 or matrix_exp. "
            f"scipy is given the exact Jacobian (autograd). dopri5 capped at {explicit_cap} steps. Linear solves: "
            "ours, one per Newton iteration (scipy does not report them). Gradients: kvaerno5 forward, loss Σ w·y(t_i), "
            "relative error (2-norm) against matrix_exp or central differences of scipy Radau at rtol 1e-12. "
            f"Wall times on a shared, loaded machine: indicative only. Machine: {common.machine()}."
        ),
        sections=[
            dict(title="Forward: accuracy and cost",
                 columns=["problem", "method", "error", "nfe", "Jacobians", "LU", "linear solves", "steps", "s", "note"],
                 rows=forward),
            dict(title="Gradients (kvaerno5 forward): relative error against the float64 reference",
                 columns=["problem", "gradient", "dL/dy0", "dL/dθ", "trust warning", "failure", "bwd nfe",
                          "bwd vjp", "bwd steps", "fwd+bwd s"],
                 rows=gradients),
        ] + ([] if only else [
            dict(title="Newton's linear solvers at scale (kvaerno5, rtol 1e-6, atol 1e-8)",
                 columns=LINEAR_SOLVER_COLUMNS, rows=solvers)]),
        headline=headline,
        metrics=dict(forward=forward, gradients=gradients, linear_solvers=solvers),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--linear-solvers-only", action="store_true",
                        help="only the section on Newton's linear solvers (Dense/BatchedDense/Krylov)")
    parser.add_argument("--problems", nargs="+", metavar="NAME",
                        help=f"only these problems (forward and gradients), among {list(problems(False))}")
    args = parser.parse_args()
    if args.linear_solvers_only:
        torch.set_num_threads(1)
        result = dict(name="stiff", title="Stiff problems: Newton's linear solvers at scale", notes=(
            "kvaerno5, rtol 1e-6, atol 1e-8, float64, one thread; 'max diff vs first row': largest |y - y_ref| / "
            f"max |y_ref| over outputs against the problem's first row. Machine: {common.machine()}."),
            sections=[dict(title="Newton's linear solvers at scale", columns=LINEAR_SOLVER_COLUMNS,
                           rows=linear_solver_rows(args.quick))], headline={})
    else:
        result = run(args.quick, only=args.problems)
    print(f"# {common.machine()}")
    report.print_sections(result)
    print("\n## headline")
    for key, value in result["headline"].items():
        print(f"{key}: {report.fmt(value)}")


if __name__ == "__main__":
    main()
