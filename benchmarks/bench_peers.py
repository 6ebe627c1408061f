"""Problems 1 and 2 with torchadjoint, torchdiffeq and torchode side by side.

Problem 1 is torchdiffeq's demo (``common.demo_problem``: cubic oscillator, batch 20,
1000 output times on [0, 25], rtol 1e-6, atol 1e-7, loss on every output); problem 2 the
single-output MLP (``common.mlp_problem``: state 32, batch 256, t in [0, 1], rtol = atol
= 1e-5). Every library solves the same problem with dopri5 at the same tolerances, dtype,
device and thread count; runs alternate between libraries, and the medians are compared.

What is counted: ``nfe`` is the number of calls of the user's ``f`` (a batched call counts
once, whichever library makes it). In the backward pass of an adjoint each call of ``f``
is accompanied by one vector-Jacobian product; for autograd through the solver
("discretise-then-optimise") the backward pass makes no calls of ``f`` at all — it
backpropagates through the recorded ones — so its backward ``nfe`` is 0.

torchode solves each batch element as its own problem with its own step sizes (the error
norm is per element); its ``BacksolveAdjoint`` vmaps the vector-Jacobian product over the
batch (per-element parameter gradients, summed at the end) and, with output times, restarts
one backward solve per interval between output times.

``run(quick, device)`` returns a dict that :mod:`benchmarks.report` renders.
"""
from __future__ import annotations

import inspect
import time
from typing import Callable, Dict, List, Optional

import torch

try:  # run as ``python benchmarks/bench_peers.py`` or imported as ``benchmarks.bench_peers``
    from benchmarks import common, peer_diffrax
except ImportError:  # pragma: no cover
    import common  # type: ignore
    import peer_diffrax  # type: ignore

import torchadjoint as ta

PEERS_MISSING: List[str] = []
try:
    import torchdiffeq
except ImportError:  # the `bench` extra is not installed
    torchdiffeq = None
    PEERS_MISSING.append("torchdiffeq")
try:
    import torchode as to
except ImportError:
    to = None
    PEERS_MISSING.append("torchode")


# --------------------------------------------------------------------------- timing helpers

def sync(device) -> None:
    """Wait for queued GPU work so that wall-clock times include it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def alternate_budget(
    runs: Dict[str, Callable[[], dict]], repeats: int, budget_s: float, warmups: Optional[Dict[str, Callable[[], object]]] = None
) -> Dict[str, List[dict]]:
    """Run every callable ``repeats`` times in alternation and collect what each returns.

    Each callable returns a dict of measurements. A callable whose runs together already
    took longer than ``budget_s`` seconds is not run again (it keeps at least one run): the
    slow peers (torchode's backsolve on 1000 output times takes a minute a run) would
    otherwise dominate the benchmark's own run time. ``warmups`` run once each first (a
    short problem), so that no library pays for first-call initialisation in its timings.
    """
    for fn in (warmups or {}).values():
        fn()
    results: Dict[str, List[dict]] = {name: [] for name in runs}
    spent = {name: 0.0 for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            if results[name] and spent[name] >= budget_s:
                continue
            start = time.perf_counter()
            out = fn()
            spent[name] += time.perf_counter() - start
            results[name].append(out)
    return results


def summarise(samples: List[dict]) -> dict:
    """Median of every numeric measurement over the runs, plus the number of runs."""
    keys = samples[0].keys()
    out = {k: common.median([s[k] for s in samples]) for k in keys if isinstance(samples[0][k], (int, float))}
    out["runs"] = len(samples)
    return out


def f_costs(func, y: torch.Tensor, calls: int) -> Callable[[], dict]:
    """A closure timing ``calls`` evaluations each of: f alone (``f_s``); f building its graph
    and one VJP through it with respect to the state and every parameter, as an adjoint's
    backward evaluation does (``vjp_s``); and one more VJP through a kept graph alone
    (``vjp_only_s``), what a backward pass pays for a VJP without a new call of f."""
    params = tuple(func.parameters())
    t = torch.tensor(0.0, dtype=y.dtype, device=y.device)
    a = torch.randn_like(y)

    def once() -> dict:
        # One untimed round first: the first VJP allocates the autograd buffers.
        with torch.enable_grad():
            x = y.detach().requires_grad_(True)
            torch.autograd.grad(func(t, x), (x,) + params, a)
        sync(y.device)
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(calls):
                func(t, y)
        sync(y.device)
        t1 = time.perf_counter()
        with torch.enable_grad():
            for _ in range(calls):
                x = y.detach().requires_grad_(True)
                out = func(t, x)
                torch.autograd.grad(out, (x,) + params, a, retain_graph=True)
        sync(y.device)
        t2 = time.perf_counter()
        with torch.enable_grad():
            for _ in range(calls):
                torch.autograd.grad(out, (x,) + params, a, retain_graph=True)
        sync(y.device)
        t3 = time.perf_counter()
        return dict(f_s=(t1 - start) / calls, vjp_s=(t2 - t1) / calls, vjp_only_s=(t3 - t2) / calls)

    return once


# --------------------------------------------------------------------------- the problems

def problem_specs(quick: bool, dtype=torch.float32) -> Dict[str, dict]:
    """The two problems: func, y0, t, tolerances and the loss on the outputs (N, *y0.shape)."""
    n_times = 50 if quick else 1000
    f1, y1, t1 = common.demo_problem(n_times=n_times, dtype=dtype)
    f2, y2, t2 = common.mlp_problem(dtype=dtype)
    return {
        "demo": dict(
            title=f"Problem 1: torchdiffeq's demo (cubic oscillator, batch 20, {n_times} output times, rtol 1e-6, atol 1e-7)",
            func=f1, y0=y1, t=t1, rtol=1e-6, atol=1e-7,
            # A loss on every output time: the backward pass has an adjoint jump at each.
            loss=lambda ys: ys.pow(2).mean(),
        ),
        "mlp": dict(
            title="Problem 2: MLP 32-128-128-32 tanh, batch 256, single output at t = 1, rtol = atol = 1e-5",
            func=f2, y0=y2, t=t2, rtol=1e-5, atol=1e-5,
            loss=lambda ys: ys[-1].pow(2).mean(),
        ),
    }


class OurSolve:
    """``solve(t) -> ys`` with torchadjoint; keeps the last solution's stats (they fill in on
    backward) so that VJPs made without a call of f are counted too."""

    def __init__(self, func, y0, rtol, atol, gradient):
        self.func, self.y0, self.rtol, self.atol, self.gradient = func, y0, rtol, atol, gradient
        self.stats: Optional[dict] = None

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        sol = ta.solve(self.func, self.y0, t, rtol=self.rtol, atol=self.atol, gradient=self.gradient)
        self.stats = sol.stats
        return sol.ys


def torchode_solver(kind: str, func, rtol: float, atol: float):
    """torchode's documented set-up: ODETerm, Dopri5, IntegralController, and an adjoint."""
    term = to.ODETerm(func)
    step = to.Dopri5(term=term)
    controller = to.IntegralController(atol=atol, rtol=rtol, term=term)
    if kind == "autodiff":
        return to.AutoDiffAdjoint(step, controller)
    return to.BacksolveAdjoint(term, step, controller)


def make_solvers(spec: dict) -> Dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """name -> ``solve(t) -> ys`` (N, *y0.shape), all differentiable w.r.t. func's parameters.

    Names are ``library / gradient method``; the first two are ours.
    """
    func, y0, rtol, atol = spec["func"], spec["y0"], spec["rtol"], spec["atol"]
    params = tuple(func.parameters())
    solvers: Dict[str, Callable] = {
        "torchadjoint / Backsolve": OurSolve(func, y0, rtol, atol, ta.Backsolve()),
        "torchadjoint / Direct": OurSolve(func, y0, rtol, atol, ta.Direct()),
    }
    if torchdiffeq is not None:
        solvers["torchdiffeq / odeint_adjoint"] = lambda t: torchdiffeq.odeint_adjoint(
            func, y0, t, rtol=rtol, atol=atol, method="dopri5", adjoint_params=params
        )
        solvers["torchdiffeq / odeint_adjoint (seminorm)"] = lambda t: torchdiffeq.odeint_adjoint(
            func, y0, t, rtol=rtol, atol=atol, method="dopri5", adjoint_params=params,
            adjoint_options=dict(norm="seminorm"),
        )
        solvers["torchdiffeq / odeint"] = lambda t: torchdiffeq.odeint(func, y0, t, rtol=rtol, atol=atol, method="dopri5")
    if to is not None:
        for kind, label in (("autodiff", "torchode / AutoDiffAdjoint"), ("backsolve", "torchode / BacksolveAdjoint")):
            solver = torchode_solver(kind, func, rtol, atol).to(y0.device)  # its tolerance buffers

            def solve_to(t, solver=solver):
                batch = y0.shape[0]
                problem = to.InitialValueProblem(y0=y0.reshape(batch, -1), t_eval=t.expand(batch, -1))
                sol = solver.solve(problem)
                # (batch, N, features) -> (N, *y0.shape), the layout every other library returns
                return sol.ys.transpose(0, 1).reshape(len(t), *y0.shape)

            solvers[label] = solve_to
    return solvers


ADJOINTS = ("torchadjoint / Backsolve", "torchdiffeq / odeint_adjoint", "torchdiffeq / odeint_adjoint (seminorm)",
            "torchode / BacksolveAdjoint", peer_diffrax.ADJOINT)
AUTOGRAD = ("torchadjoint / Direct", "torchdiffeq / odeint", "torchode / AutoDiffAdjoint", peer_diffrax.AUTOGRAD)


def measure(solve: Callable, spec: dict, t: torch.Tensor, device) -> Callable[[], dict]:
    """A closure running forward + backward once; returns nfe and wall times."""
    func, loss_fn = spec["func"], spec["loss"]
    params = list(func.parameters())

    def once() -> dict:
        for p in params:
            p.grad = None
        func.nfe = 0
        sync(device)
        start = time.perf_counter()
        ys = solve(t)
        sync(device)
        forward_s = time.perf_counter() - start
        forward_nfe = func.nfe
        loss_fn(ys).backward()
        sync(device)
        total_s = time.perf_counter() - start
        grad = torch.cat([p.grad.reshape(-1) for p in params]).detach().cpu().double()
        backward_nfe = func.nfe - forward_nfe
        # Peers make one VJP per backward call of f; ours reports its own count (it also
        # makes VJPs through kept graphs at the adjoint's jumps, without calling f).
        stats = getattr(solve, "stats", None)
        bwd = (stats or {}).get("backward") or {}
        vjps = bwd.get("nvjp", backward_nfe)
        return dict(fwd_nfe=forward_nfe, bwd_nfe=backward_nfe, bwd_vjp=vjps, fwd_s=forward_s, total_s=total_s, grad=grad)

    return once


def agreement(samples: Dict[str, List[dict]]) -> Dict[str, float]:
    """Relative difference of each library's parameter gradient from ours (Backsolve), from
    the runs already made: all solve the same problem, so a large number flags a wrong set-up
    (differences of the order of the tolerance are expected)."""
    ref = samples["torchadjoint / Backsolve"][-1]["grad"]
    return {name: float((s[-1]["grad"] - ref).norm() / ref.norm()) for name, s in samples.items()}


def profile_passes(spec: dict, repeats: int = 5, top: int = 12) -> List[dict]:
    """cProfile of our Backsolve on ``spec``, forward and backward pass separately, summed over
    ``repeats`` solves: where the time beyond f and its VJPs goes (table sections for the
    report). Each section's notes split the profiled time into calls of f (the user's module,
    cumulative), vector-Jacobian products (``torch.autograd.grad``, cumulative) and the rest:
    the solver's own work. Python-level: torch operators appear as the built-ins calling them."""
    import cProfile
    import pstats

    func, loss_fn = spec["func"], spec["loss"]

    def solve():
        return ta.solve(func, spec["y0"], spec["t"], rtol=spec["rtol"], atol=spec["atol"])

    for _ in range(2):  # warm
        loss_fn(solve().ys).backward()
    forward, backward = cProfile.Profile(), cProfile.Profile()
    for _ in range(repeats):
        forward.enable()
        sol = solve()
        forward.disable()
        loss = loss_fn(sol.ys)
        backward.enable()
        loss.backward()
        backward.disable()

    def where(key) -> str:
        filename, line, name = key
        if filename == "~":
            return name
        for marker in ("torchadjoint/", "torch/", "benchmarks/"):
            if marker in filename:
                filename = marker + filename.split(marker, 1)[1]
                break
        return f"{filename}:{line} {name}"

    f_file = inspect.getsourcefile(type(func).forward)
    sections = []
    for label, profiler in (("forward", forward), ("backward", backward)):
        stats = pstats.Stats(profiler).stats
        total = sum(v[2] for v in stats.values())  # own times summed = the profiled time
        f_time = sum(v[3] for k, v in stats.items() if k[0] == f_file and k[2] == "forward")
        vjp_time = sum(v[3] for k, v in stats.items() if k[0].endswith("torch/autograd/__init__.py") and k[2] == "grad")
        rest = total - f_time - vjp_time
        entries = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
        sections.append(dict(
            title=(f"Profile: torchadjoint Backsolve, {label} pass of {spec['title'].split(':')[0].lower()} "
                   f"(cProfile, {repeats} solves)"),
            notes=(f"Per solve: {1e3 * total / repeats:.1f} ms profiled = f {1e3 * f_time / repeats:.1f} ms "
                   f"({100 * f_time / total:.0f}%) + VJPs {1e3 * vjp_time / repeats:.1f} ms ({100 * vjp_time / total:.0f}%) "
                   f"+ everything else {1e3 * rest / repeats:.1f} ms ({100 * rest / total:.0f}%). The profiler slows "
                   f"Python-level code more than torch kernels, so the last share is an upper bound."),
            columns=["function", "calls", "own ms", "cumulative ms", "own %"],
            rows=[[where(k), v[1], 1e3 * v[2], 1e3 * v[3], 100 * v[2] / total] for k, v in entries],
        ))
    return sections


# --------------------------------------------------------------------------- problem 3: memory

MEMORY_BUDGET_MB = 3000.0


def memory_solvers() -> Dict[str, Callable]:
    """name -> ``solve(func, y0, t, tol) -> ys`` for the memory measurement."""
    out: Dict[str, Callable] = {
        "torchadjoint / Backsolve": lambda f, y0, t, tol: ta.solve(f, y0, t, gradient=ta.Backsolve(), **tol).ys,
        "torchadjoint / Direct": lambda f, y0, t, tol: ta.solve(f, y0, t, gradient=ta.Direct(), **tol).ys,
    }
    if torchdiffeq is not None:
        out["torchdiffeq / odeint_adjoint"] = lambda f, y0, t, tol: torchdiffeq.odeint_adjoint(
            f, y0, t, method="dopri5", adjoint_params=tuple(f.parameters()), **tol)
        out["torchdiffeq / odeint"] = lambda f, y0, t, tol: torchdiffeq.odeint(f, y0, t, method="dopri5", **tol)
    if to is not None:
        for kind, label in (("backsolve", "torchode / BacksolveAdjoint"), ("autodiff", "torchode / AutoDiffAdjoint")):
            def solve_to(f, y0, t, tol, kind=kind):
                solver = torchode_solver(kind, f, tol["rtol"], tol["atol"]).to(y0.device)
                batch = y0.shape[0]
                problem = to.InitialValueProblem(y0=y0, t_eval=t.expand(batch, -1))
                return solver.solve(problem).ys.transpose(0, 1)

            out[label] = solve_to
    return out


def memory_child(name: str, T: float, batch: int, device: str) -> dict:
    """One measurement, in its own process: memory of forward + backward above the baseline.

    The problem and the CPU method are those of :mod:`benchmarks.bench_memory` (rotation +
    small tanh network; peak resident set after ``/proc/self/clear_refs``),
    so the rows add to its table. On CUDA the figure is ``torch.cuda.max_memory_allocated``
    above what was allocated before the run: tensor memory, exact, no allocator caching.
    """
    from benchmarks import bench_memory

    torch.set_num_threads(1)
    solve = memory_solvers()[name]
    func, y0 = bench_memory.problem(batch)
    func, y0 = func.to(device), y0.to(device)
    cuda = torch.device(device).type == "cuda"

    def once(t_):
        for p in func.parameters():
            p.grad = None
        func.nfe = 0
        ys = solve(func, y0, t_.to(device), bench_memory.TOL)
        nfe = func.nfe
        ys[-1].pow(2).mean().backward()
        return nfe

    warmed = common.reset_peak()
    once(torch.tensor([0.0, 0.1]))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        forward_nfe = once(torch.tensor([0.0, T]))
        torch.cuda.synchronize()
        return dict(peak_mb=(torch.cuda.max_memory_allocated() - baseline) / 2**20, forward_nfe=forward_nfe)
    common.reset_peak()
    baseline_kb = common.status_kib("VmRSS") if warmed else common.status_kib("VmHWM")
    forward_nfe = once(torch.tensor([0.0, T]))
    # VmHWM (this process's own high-water mark, reset by clear_refs), not ru_maxrss:
    # Linux carries ru_maxrss over from the parent across fork and exec, so a child of a
    # large process would report the parent's size.
    peak_kb = common.status_kib("VmHWM")
    return dict(peak_mb=(peak_kb - baseline_kb) / 1024, forward_nfe=forward_nfe, warmed=warmed)


def memory_measure(name: str, T: float, batch: int, device: str) -> dict:
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    code = (f"from benchmarks.bench_peers import memory_child; import json; "
            f"print(json.dumps(memory_child({name!r}, {T!r}, {batch!r}, {device!r})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines()
        return dict(error=lines[-1] if lines else f"exit {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory(quick: bool, device: torch.device) -> Optional[dict]:
    """Problem 3 for what bench_memory does not measure: torchode's adjoints on the CPU (with
    our Backsolve measured alongside for the ratio), and every method on CUDA (bench_memory
    measures the CPU's resident set only). None when there is nothing to add."""
    try:
        from benchmarks import bench_memory
    except ImportError:
        return None
    names = list(memory_solvers())
    if device.type == "cpu":
        covered = set(getattr(bench_memory, "METHODS", {}))
        names = ["torchadjoint / Backsolve"] + [n for n in names if n.startswith("torchode") and n not in covered]
        if len(names) == 1:
            return None
    intervals = (1.0,) if quick else (1.0, 10.0, 100.0)  # quick: one process per method, a check only
    batch = 32 if quick else 128
    table: Dict[str, Dict[float, dict]] = {}
    for name in names:
        table[name] = {}
        for T in intervals:
            done = sorted((k, v) for k, v in table[name].items() if "peak_mb" in v)
            if len(done) >= 2:  # linear trend in T: skip what would exceed the budget
                (T1, r1), (T2, r2) = done[-2:]
                predicted = r2["peak_mb"] + (r2["peak_mb"] - r1["peak_mb"]) / (T2 - T1) * (T - T2)
                if predicted > MEMORY_BUDGET_MB:
                    table[name][T] = dict(skipped=f"~{predicted:.0f} MB predicted")
                    continue
            table[name][T] = memory_measure(name, T, batch, str(device))
    rows, headline = [], {}
    for name, by_T in table.items():
        cells = [by_T[T].get("peak_mb", by_T[T].get("skipped") or by_T[T].get("error")) for T in intervals]
        first, last = by_T[intervals[0]], by_T[intervals[-1]]
        growth = last["peak_mb"] / first["peak_mb"] if "peak_mb" in first and "peak_mb" in last and first["peak_mb"] > 0 else None
        nfe = last.get("forward_nfe")
        rows.append([name] + cells + [growth, nfe])
    for row in rows:
        if row[-2] is not None and len(intervals) > 1:
            headline[f"memory ({device.type}) at T={intervals[-1]:g} / at T={intervals[0]:g}: {row[0]}"] = row[-2]
    what = "resident memory (MB) above the baseline" if device.type == "cpu" else "CUDA tensor memory (MB) above the baseline"
    return dict(
        title=f"Problem 3 ({device.type}): peak {what}, forward + backward",
        notes=(
            f"bench_memory's problem (rotation + small tanh network, state 32, batch {batch}, dopri5, rtol 1e-6, "
            f"atol 1e-8, one output at T), each measurement in its own process"
            + (", with our Backsolve measured again beside torchode's adjoints." if device.type == "cpu" else ".")
        ),
        columns=["library / gradient"] + [f"T = {T:g}" for T in intervals] + [f"T={intervals[-1]:g} / T={intervals[0]:g}",
                                                                             f"fwd nfe at T={intervals[-1]:g}"],
        rows=rows,
        headline=headline,
        table={name: {str(T): r for T, r in by_T.items()} for name, by_T in table.items()},
    )


def run(quick: bool = False, device: str = "cpu") -> dict:
    """Problems 1 and 2, every library, alternating; medians and ratios (ours / theirs)."""
    device = torch.device(device)
    repeats, budget = (1, 0.0) if quick else (5, 20.0)
    sections, plots = [], []
    headline, metrics = {}, {}
    for key, spec in problem_specs(quick).items():
        spec["func"].to(device)
        spec["y0"], spec["t"] = spec["y0"].to(device), spec["t"].to(device)
        solvers = make_solvers(spec)
        runs = {name: measure(solve, spec, spec["t"], device) for name, solve in solvers.items()}
        # Warm-up on the first three output times only (a short solve per library).
        warmups = {name: measure(solve, spec, spec["t"][:3], device) for name, solve in solvers.items()}
        # diffrax: compiled here (compile time kept apart), its evaluations counted once by an
        # instrumented twin; its warm-up is one run of the compiled functions.
        jax_runs = peer_diffrax.make_runs(spec, key, device)
        runs.update(jax_runs)
        warmups.update(jax_runs)
        # f alone and f + one VJP, timed in the same alternation: the ideal cost of a run is
        # what its function evaluations would cost with no solver around them.
        calls = (20 if key == "demo" else 5) if quick else (200 if key == "demo" else 30)
        runs["f alone"] = f_costs(spec["func"], spec["y0"], calls)
        samples = alternate_budget(runs, repeats, budget, warmups)
        cost = summarise(samples.pop("f alone"))
        stats = {name: summarise(s) for name, s in samples.items()}
        grad_diff = agreement(samples)
        rows = []
        for name, s in stats.items():
            adjoint = name in ADJOINTS
            ours = stats["torchadjoint / Backsolve" if adjoint else "torchadjoint / Direct"]
            # Adjoint: forward calls of f, backward calls of f + VJP. Autograd through the
            # solver: each forward call is recorded and backpropagated once (≈ f + VJP).
            if name in jax_runs:
                # The ideal cost is priced with PyTorch's eager f and VJP: not diffrax's (XLA's) cost.
                s["ideal_ratio"] = None
            else:
                if adjoint:
                    extra_vjps = max(s["bwd_vjp"] - s["bwd_nfe"], 0)
                    ideal = s["fwd_nfe"] * cost["f_s"] + s["bwd_nfe"] * cost["vjp_s"] + extra_vjps * cost["vjp_only_s"]
                else:
                    ideal = s["fwd_nfe"] * cost["vjp_s"]
                s["ideal_ratio"] = s["total_s"] / ideal
            rows.append([
                name, s["fwd_nfe"], s["bwd_nfe"], s["bwd_vjp"] if adjoint else None, 1e3 * s["fwd_s"], s["total_s"],
                s["ideal_ratio"],
                ours["total_s"] / s["total_s"],
                (ours["bwd_nfe"] / s["bwd_nfe"]) if s["bwd_nfe"] else None,
                grad_diff[name], s.get("compile_s"), s["runs"],
            ])
        metrics[key] = dict(stats=stats, f_s=cost["f_s"], vjp_s=cost["vjp_s"])
        sections.append(dict(
            key=key, title=spec["title"],
            notes=(f"Unit costs: f alone {1e6 * cost['f_s']:.0f} µs per call; f with its graph + one VJP "
                   f"{1e6 * cost['vjp_s']:.0f} µs; one more VJP through a kept graph {1e6 * cost['vjp_only_s']:.0f} µs."),
            columns=["library / gradient", "fwd nfe", "bwd nfe", "bwd VJPs", "fwd ms", "fwd+bwd s", "× ideal cost",
                     "ours/theirs wall", "ours/theirs bwd nfe", "grad rel. diff vs ours", "compile s", "runs"],
            rows=rows,
        ))
        plots.append(dict(
            file=f"peers_{key}_{device.type}.png", kind="bar", logx=True,
            title=spec["title"].split(":")[0] + f": forward + backward wall time, median ({device.type})",
            xlabel="seconds (log scale)", series={name: s["total_s"] for name, s in stats.items()},
        ))
        if key == "mlp":
            sections += profile_passes(spec, repeats=2 if quick else 5)
        ours = stats["torchadjoint / Backsolve"]
        for name in jax_runs:
            # diffrax against the pairing of ours the rows use; compile time not included.
            mine = stats["torchadjoint / Backsolve" if name in ADJOINTS else "torchadjoint / Direct"]
            headline[f"{key}: fwd+bwd wall, ours / {name}"] = mine["total_s"] / stats[name]["total_s"]
            headline[f"{key}: fwd wall, ours / {name}"] = mine["fwd_s"] / stats[name]["fwd_s"]
        for peer in ("torchdiffeq / odeint_adjoint", "torchode / BacksolveAdjoint"):
            if peer in stats:
                headline[f"{key}: fwd+bwd wall, ours / {peer}"] = ours["total_s"] / stats[peer]["total_s"]
                headline[f"{key}: bwd nfe, ours / {peer}"] = ours["bwd_nfe"] / max(stats[peer]["bwd_nfe"], 1)
                headline[f"{key}: bwd VJPs, ours / {peer}"] = ours["bwd_vjp"] / max(stats[peer]["bwd_vjp"], 1)
                headline[f"{key}: fwd wall, ours / {peer}"] = ours["fwd_s"] / stats[peer]["fwd_s"]
        spec["func"].to("cpu")
    mem = memory(quick, device)
    if mem is not None:
        headline.update(mem.pop("headline"))
        metrics["memory"] = mem.pop("table")
        sections.append(mem)
    return dict(
        name="peers",
        title="Problems 1 and 2: torchadjoint, torchdiffeq and torchode side by side",
        device=str(device),
        notes=(
            "Rows marked `ours/theirs` compare our Backsolve with each adjoint, and our Direct "
            "(autograd through the solver) with each autograd-through-the-solver peer. "
            "nfe = calls of f (a batched call counts once). Backward nfe of autograd-through-the-solver "
            "methods is 0: they backpropagate through the recorded forward calls. torchode steps each "
            "batch element with its own step size; its BacksolveAdjoint restarts one backward solve per "
            "output interval and vmaps the vector-Jacobian product per element. "
            "`runs` is the number of timed runs (slow peers are capped by a time budget). "
            "`bwd VJPs` counts vector-Jacobian products through f in the backward pass: one per call for the peers; "
            "ours also makes one at each output time where the adjoint jumps, through the last stage's kept graph "
            "instead of a new call of f. "
            "`× ideal cost` is the wall time over what the run's evaluations cost alone: forward nfe × (f) + "
            "backward nfe × (f + one VJP) + VJPs beyond the backward calls × (one VJP) for adjoints, "
            "forward nfe × (f + one VJP) for autograd through the solver. "
            "`grad rel. diff vs ours` is |g - g_ours| / |g_ours| for the parameter gradient. "
            "diffrax (JAX, JIT-compiled, one XLA thread) solves the same problem with the same weights, data, "
            "tolerances and dopri5; its BacksolveAdjoint is paired with our Backsolve, its default "
            "RecursiveCheckpointAdjoint (autograd through the solver with checkpointing: its backward nfe are the "
            "recomputations) with our Direct. Its evaluations are counted by an instrumented twin of each compiled "
            "function (a host callback in f); the timed functions carry no instrumentation. `compile s` is its "
            "one-off compile time (forward function + forward-and-backward function), not included in the wall "
            "times; `× ideal cost` is not given for it (the ideal is priced with PyTorch's eager f)."
            + (f" Not installed, so not measured: {', '.join(PEERS_MISSING)}." if PEERS_MISSING else "")
            + (f" {peer_diffrax.skip_note(device)}." if peer_diffrax.skip_note(device) else "")
        ),
        sections=sections,
        plots=plots,
        headline=headline,
        metrics=metrics,
    )


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(json.dumps(run(args.quick, args.device), indent=1, default=str))
