"""Backsolve against torchdiffeq's ``odeint_adjoint`` (seminorm), problems 1 and 2.

    python benchmarks/bench_adjoint.py            # the reported numbers (a few minutes)
    python benchmarks/bench_adjoint.py --quick    # small settings, to check that it works

Problem 1 is torchdiffeq's demo (``common.demo_problem``: 1000 output times on [0, 25],
rtol 1e-6, atol 1e-7, a loss on every output), where the output times, not accuracy, force
the backward steps; problem 2 the single-output MLP (``common.mlp_problem``), where the
network dominates. Both libraries solve with dopri5 at the same tolerances, dtype and thread
count, with seminorm error control backwards; runs alternate and medians are compared.

What is counted, for both libraries alike: ``bwd nfe`` = calls of the user's ``f`` during
the backward pass, ``bwd vjp`` = vector-Jacobian products (backward passes through ``f``'s
graph). torchdiffeq makes one VJP per call of ``f``. Ours makes one per call too, plus one
at each output time where the adjoint jumps: the derivative after the jump is the last
stage plus a VJP with the jump through that stage's kept graph, instead of a new call of
``f`` (and when the re-solved ``y`` has drifted past tolerance from the forward's stored
value, ours resets it there and calls ``f`` again: ``resets``).

The ideal cost of a run is what its evaluations cost with no solver around them: forward
nfe × f (no graph) + backward nfe × (f with a graph) + backward VJPs × (one VJP), each
measured alone on the problem's state in the same alternation. ``grad error`` is the
relative error of the parameter gradient against a float64 reference computed with
autograd through the solver (``Direct()``) at rtol 1e-10 (demo) / 1e-9 (MLP).

On the single-output problem a third row runs the same evaluations in a bare loop
(:mod:`benchmarks.bare_adjoint`: fixed steps, as many as ours accepted, no error control,
checks or bookkeeping): its ``wall / ideal`` is the floor any eager PyTorch loop around these
evaluations reaches on the machine, measured in the same alternation.

``run(quick) -> dict`` for :mod:`benchmarks.report`.
"""
from __future__ import annotations

import copy
import os
import sys
import time
import warnings
from typing import Callable, Dict, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # ``python benchmarks/bench_adjoint.py`` from anywhere
    sys.path.insert(0, ROOT)

from benchmarks import common, report  # noqa: E402
from benchmarks.bare_adjoint import bare_adjoint  # noqa: E402

import torchadjoint as ta  # noqa: E402

try:
    import torchdiffeq
except ImportError:  # the `bench` extra is not installed
    torchdiffeq = None


def problem_specs(quick: bool) -> Dict[str, dict]:
    n_times = 100 if quick else 1000
    f1, y1, t1 = common.demo_problem(n_times=n_times)
    f2, y2, t2 = common.mlp_problem()
    return {
        "demo": dict(
            title=f"Problem 1: torchdiffeq's demo, {n_times} output times on [0, 25], rtol 1e-6, atol 1e-7",
            func=f1, y0=y1, t=t1, rtol=1e-6, atol=1e-7, ref_tol=1e-10,
            loss=lambda ys: ys.pow(2).mean(),  # every output time: a jump at each
        ),
        "mlp": dict(
            title="Problem 2: MLP 32-128-128-32 tanh, batch 256, one output at t = 1, rtol = atol = 1e-5",
            func=f2, y0=y2, t=t2, rtol=1e-5, atol=1e-5, ref_tol=1e-9,
            loss=lambda ys: ys[-1].pow(2).mean(),
        ),
    }


def flat_grad(func) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in func.parameters()]).detach().double()


def ours(spec: dict, gradient: ta.GradientMethod) -> Callable[[], dict]:
    func, y0, t, loss = spec["func"], spec["y0"], spec["t"], spec["loss"]

    def once() -> dict:
        func.zero_grad(set_to_none=True)
        start = time.perf_counter()
        sol = ta.solve(func, y0, t, rtol=spec["rtol"], atol=spec["atol"], gradient=gradient)
        fwd_s = time.perf_counter() - start
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ta.ReconstructionWarning)  # reported in the table instead
            loss(sol.ys).backward()
        total_s = time.perf_counter() - start
        b = sol.stats["backward"]
        return dict(fwd_nfe=sol.stats["forward"]["nfe"], fwd_steps=sol.stats["forward"]["accepted"],
                    bwd_nfe=b["nfe"], bwd_vjp=b["nvjp"], bwd_steps=b["steps"], bwd_accepted=b["accepted"],
                    resets=b["resets"], reconstruction=b["reconstruction_error_max"], fwd_s=fwd_s, total_s=total_s,
                    grad=flat_grad(func))

    return once


def theirs(spec: dict) -> Callable[[], dict]:
    func, y0, t, loss = spec["func"], spec["y0"], spec["t"], spec["loss"]
    params = tuple(func.parameters())

    def once() -> dict:
        func.zero_grad(set_to_none=True)
        func.nfe = 0
        start = time.perf_counter()
        ys = torchdiffeq.odeint_adjoint(func, y0, t, rtol=spec["rtol"], atol=spec["atol"], method="dopri5",
                                        adjoint_params=params, adjoint_options=dict(norm="seminorm"))
        fwd_s = time.perf_counter() - start
        fwd_nfe = func.nfe
        loss(ys).backward()
        total_s = time.perf_counter() - start
        bwd = func.nfe - fwd_nfe  # one VJP per call of f in its augmented dynamics
        return dict(fwd_nfe=fwd_nfe, fwd_steps=None, bwd_nfe=bwd, bwd_vjp=bwd, bwd_steps=None, bwd_accepted=None,
                    resets=None, reconstruction=None,
                    fwd_s=fwd_s, total_s=total_s, grad=flat_grad(func))

    return once


def bare(spec: dict, probe: dict) -> Callable[[], dict]:
    """The bare loop of :mod:`benchmarks.bare_adjoint` with as many steps as ours accepted
    (single-output problems: the loss gradient at the last time only)."""
    func, y0, t = spec["func"], spec["y0"], spec["t"]

    def loss_grad(y1: torch.Tensor) -> torch.Tensor:
        y1 = y1.detach().requires_grad_(True)
        with torch.enable_grad():
            return torch.autograd.grad(spec["loss"](y1.unsqueeze(0)), y1)[0]

    def once() -> dict:
        out = bare_adjoint(func, y0, float(t[0]), float(t[-1]), probe["fwd_steps"], probe["bwd_accepted"], loss_grad)
        return dict(out, bwd_steps=probe["bwd_accepted"], resets=None, reconstruction=None)

    return once


def unit_costs(func, y: torch.Tensor, calls: int) -> Callable[[], dict]:
    """Seconds per call of f without a graph, of f building its graph, and of one VJP
    (with respect to the state and every parameter) through a kept graph."""
    params = tuple(func.parameters())
    t = torch.tensor(0.0, dtype=y.dtype)
    a = torch.randn_like(y)

    def once() -> dict:
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(calls):
                func(t, y)
        t1 = time.perf_counter()
        with torch.enable_grad():
            for _ in range(calls):
                x = y.detach().requires_grad_(True)
                out = func(t, x)
        t2 = time.perf_counter()
        with torch.enable_grad():
            for _ in range(calls):
                torch.autograd.grad(out, (x,) + params, a, retain_graph=True)
        t3 = time.perf_counter()
        return dict(f_s=(t1 - start) / calls, f_graph_s=(t2 - t1) / calls, vjp_s=(t3 - t2) / calls)

    return once


def reference_gradient(spec: dict) -> torch.Tensor:
    """The parameter gradient in float64 by autograd through a tight solve."""
    func = copy.deepcopy(spec["func"]).double()
    tol = spec["ref_tol"]
    sol = ta.solve(func, spec["y0"].double(), spec["t"].double(), rtol=tol, atol=tol, gradient=ta.Direct())
    spec["loss"](sol.ys).backward()
    return flat_grad(func)


def run(quick: bool = False) -> dict:
    """Both problems; ours (default Backsolve, and resetting y at every landing as torchdiffeq
    does) beside torchdiffeq's odeint_adjoint with seminorm; medians of alternating runs."""
    if torchdiffeq is None:
        return dict(name="adjoint", title="Backsolve against torchdiffeq", skipped="torchdiffeq is not installed.")
    repeats = 1 if quick else 3
    sections, headline, metrics = [], {}, {}
    for key, spec in problem_specs(quick).items():
        reference = reference_gradient(spec)
        runs = {
            "torchadjoint Backsolve()": ours(spec, ta.Backsolve()),
            "torchadjoint Backsolve(reset_threshold=0)": ours(spec, ta.Backsolve(reset_threshold=0)),
            "torchdiffeq odeint_adjoint (seminorm)": theirs(spec),
            "unit costs": unit_costs(spec["func"], spec["y0"], (20 if key == "demo" else 5) if quick else (300 if key == "demo" else 30)),
        }
        if len(spec["t"]) == 2:
            # The floor: the same evaluations in a bare loop (steps as many as ours accepted).
            runs["bare dopri5 loop (floor, fixed steps)"] = bare(spec, ours(spec, ta.Backsolve())())
        # Warm-up (first-call initialisation) on the first three output times only.
        short = dict(spec, t=spec["t"][:3])
        warmups = [ours(short, ta.Backsolve()), theirs(short)]
        samples = _alternate(runs, repeats, warmups)
        unit = samples.pop("unit costs")
        cost = {k: common.median([s[k] for s in unit]) for k in ("f_s", "f_graph_s", "vjp_s")}
        stats = {}
        for name, values in samples.items():
            s = {k: common.median([v[k] for v in values]) for k in values[0] if k != "grad" and values[0][k] is not None}
            s["grad_error"] = float((values[-1]["grad"] - reference).norm() / reference.norm())
            s["ideal_s"] = s["fwd_nfe"] * cost["f_s"] + s["bwd_nfe"] * cost["f_graph_s"] + s["bwd_vjp"] * cost["vjp_s"]
            s["ideal_ratio"] = s["total_s"] / s["ideal_s"]
            stats[name] = s
        peer = stats["torchdiffeq odeint_adjoint (seminorm)"]
        rows = []
        for name, s in stats.items():
            rows.append([name, s["fwd_nfe"], s["bwd_nfe"], s["bwd_vjp"], s.get("resets"), s["total_s"],
                         s["bwd_nfe"] / peer["bwd_nfe"], s["total_s"] / peer["total_s"], s["ideal_ratio"],
                         s["grad_error"], s.get("reconstruction")])
        sections.append(dict(
            title=spec["title"],
            notes=(f"Per call: f {1e6 * cost['f_s']:.0f} µs (no graph), {1e6 * cost['f_graph_s']:.0f} µs (building its "
                   f"graph); one VJP {1e6 * cost['vjp_s']:.0f} µs. Medians of {repeats} alternating run(s)."),
            columns=["library / gradient", "fwd nfe", "bwd nfe", "bwd VJPs", "resets", "fwd+bwd s",
                     "bwd nfe / torchdiffeq", "wall / torchdiffeq", "wall / ideal", "grad error", "max drift (× tol)"],
            rows=rows,
        ))
        ours_s = stats["torchadjoint Backsolve()"]
        headline[f"{key}: bwd nfe, ours / torchdiffeq"] = ours_s["bwd_nfe"] / peer["bwd_nfe"]
        headline[f"{key}: bwd VJPs, ours / torchdiffeq"] = ours_s["bwd_vjp"] / peer["bwd_vjp"]
        headline[f"{key}: fwd+bwd wall, ours / torchdiffeq"] = ours_s["total_s"] / peer["total_s"]
        headline[f"{key}: wall / ideal, ours"] = ours_s["ideal_ratio"]
        if "bare dopri5 loop (floor, fixed steps)" in stats:
            headline[f"{key}: wall / ideal, bare loop (floor)"] = stats["bare dopri5 loop (floor, fixed steps)"]["ideal_ratio"]
        metrics[key] = dict(stats=stats, cost=cost)
    return dict(
        name="adjoint",
        title="Backsolve against torchdiffeq's odeint_adjoint (seminorm)",
        notes=(
            "bwd nfe = calls of f in the backward pass; bwd VJPs = vector-Jacobian products. "
            "`Backsolve()` carries one backward solve through every output time; at each it adds the jump "
            "to a_y and gets the derivative after it from the last stage's kept graph (one VJP, no call of f), "
            "and resets the re-solved y to the forward's stored value only where it drifted past the tolerance "
            "(`resets`; each costs a call of f). `reset_threshold=0` resets at every output time, as torchdiffeq "
            "does. `max drift` is the largest scaled difference between the re-solved and the stored y at an "
            "output time. `grad error` is against a float64 autograd-through-the-solver reference at tight tolerance."
        ),
        sections=sections,
        headline=headline,
        metrics=metrics,
    )


def _alternate(runs: Dict[str, Callable[[], dict]], repeats: int, warmups: List[Callable[[], dict]]) -> Dict[str, List[dict]]:
    """The warm-ups once, then ``repeats`` rounds of every callable in alternation."""
    for fn in warmups:
        fn()
    out: Dict[str, List[dict]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            out[name].append(fn())
    return out


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small settings, one run each")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"# {common.machine()}")
    result = run(args.quick)
    if result.get("skipped"):
        print(result["skipped"])
        return
    report.print_sections(result)
    print()
    for k, v in result["headline"].items():
        print(f"{k}: {v:.3f}")


if __name__ == "__main__":
    main()
