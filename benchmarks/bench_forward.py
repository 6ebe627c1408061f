"""Forward-solve speed: torchadjoint's dopri5 against torchdiffeq's (and torchode's) in one run.

Problem: torchdiffeq's demo (``common.demo_problem``: cubic oscillator ``f(y) = MLP(y**3)``,
MLP 2-50-2 tanh, batch 20, float32, 1000 output times on [0, 25]), rtol 1e-6, atol 1e-7,
dopri5, no gradients (``torch.no_grad``). Single thread; the libraries run in alternation
and the medians are compared. Reported per solve and per function evaluation (a batched
call of ``f`` counts once); the per-evaluation time shows the solver's own overhead
around ``f``, which is most of the cost on a problem this small.

torchode controls the step size per batch element (its own error norm per sample), so its
evaluation count differs by design; its first call compiles nothing here (no JIT).

Run: ``python benchmarks/bench_forward.py [--quick]``. Importable: ``run(quick) -> dict``.
"""
from __future__ import annotations

import argparse
from typing import Callable, Dict

import torch

try:  # run as ``python benchmarks/bench_forward.py`` or imported as ``benchmarks.bench_forward``
    from benchmarks import common
except ImportError:  # pragma: no cover
    import common  # type: ignore

import torchadjoint as ta

try:
    import torchdiffeq
except ImportError:  # the `bench` extra is not installed
    torchdiffeq = None
try:
    import torchode as to
except ImportError:
    to = None

RTOL, ATOL = 1e-6, 1e-7
OURS, TORCHDIFFEQ, TORCHODE = "torchadjoint", "torchdiffeq", "torchode"


def solvers(func, y0: torch.Tensor, t: torch.Tensor) -> Dict[str, Callable[[], torch.Tensor]]:
    """One forward dopri5 solve per library, each returning ys (N, *y0.shape)."""
    runs = {OURS: lambda: ta.solve(func, y0, t, method="dopri5", rtol=RTOL, atol=ATOL).ys}
    if torchdiffeq is not None:
        runs[TORCHDIFFEQ] = lambda: torchdiffeq.odeint(func, y0, t, method="dopri5", rtol=RTOL, atol=ATOL)
    if to is not None:
        term = to.ODETerm(func)
        step = to.Dopri5(term=term)
        solver = to.AutoDiffAdjoint(step, to.IntegralController(atol=ATOL, rtol=RTOL, term=term))
        batch = y0.shape[0]
        problem = to.InitialValueProblem(y0=y0.reshape(batch, -1), t_eval=t.expand(batch, -1))

        def torchode_solve():
            return solver.solve(problem).ys.transpose(0, 1).reshape(len(t), *y0.shape)

        runs[TORCHODE] = torchode_solve
    return runs


def run(quick: bool = False) -> dict:
    """Measure and return the numbers, in the form the benchmark driver renders.

    ``metrics``: ``{"machine", "problem", "results": {library: {...}}, "ratios": {...}}``;
    per library ``time_s`` (median wall time per solve), ``nfe`` (calls of f per solve),
    ``time_per_nfe_us``, ``repeats``, ``max_abs_diff_vs_torchdiffeq`` (agreement of the
    outputs). ``ratios`` (also ``headline``): ours / theirs per solve, per evaluation, and in
    evaluations. ``markdown``: the table; ``title``, ``notes``: its heading and set-up.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        func, y0, t = common.demo_problem()
        runs = solvers(func, y0, t)
        results: Dict[str, dict] = {}
        outputs: Dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, fn in runs.items():  # one solve each: evaluation counts and outputs
                func.nfe = 0
                outputs[name] = fn()
                results[name] = {"nfe": func.nfe}
            times = common.alternate(runs, repeats=3 if quick else 15, warmup=1)
        for name, samples in times.items():
            r = results[name]
            r["time_s"] = common.median(samples)
            r["time_per_nfe_us"] = 1e6 * r["time_s"] / r["nfe"]
            r["repeats"] = len(samples)
            if TORCHDIFFEQ in outputs:
                r["max_abs_diff_vs_torchdiffeq"] = float((outputs[name] - outputs[TORCHDIFFEQ]).abs().max())
        ratios = {}
        for peer in (TORCHDIFFEQ, TORCHODE):
            if peer in results:
                ratios[f"time per solve, ours / {peer}"] = results[OURS]["time_s"] / results[peer]["time_s"]
                ratios[f"time per evaluation, ours / {peer}"] = results[OURS]["time_per_nfe_us"] / results[peer]["time_per_nfe_us"]
                ratios[f"evaluations, ours / {peer}"] = results[OURS]["nfe"] / results[peer]["nfe"]
        report = {
            "name": "forward",
            "title": "Forward solve: torchadjoint against torchdiffeq (and torchode)",
            "machine": common.machine(),
            "problem": f"demo problem: batch {y0.shape[0]}, {len(t)} output times on [{float(t[0]):g}, {float(t[-1]):g}], "
                       f"{y0.dtype}, dopri5, rtol {RTOL:g}, atol {ATOL:g}, forward only (no_grad)",
            "results": results,
            "ratios": ratios,
        }
        # For the benchmark driver's page: the table as markdown, the ratios as headline
        # numbers, the raw numbers under "metrics" (not rendered twice).
        return {
            "name": report["name"],
            "title": report["title"],
            "notes": f"{report['problem']}. Medians of {results[OURS]['repeats']} alternating runs, one thread.",
            "markdown": markdown(report, header=False),
            "headline": ratios,
            "metrics": report,
        }
    finally:
        torch.set_num_threads(threads)


def markdown(report: dict, header: bool = True) -> str:
    """The results as a markdown table and a list of ratios (``report``: run()'s metrics)."""
    lines = [f"Forward solve — {report['problem']}", f"Machine: {report['machine']}", ""] if header else []
    lines += [
        "| library | time per solve (ms) | nfe | time per evaluation (µs) | max abs diff vs torchdiffeq |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in report["results"].items():
        diff = r.get("max_abs_diff_vs_torchdiffeq")
        lines.append(f"| {name} | {1e3 * r['time_s']:.1f} | {r['nfe']} | {r['time_per_nfe_us']:.1f} | "
                     f"{'—' if diff is None else f'{diff:.1e}'} |")
    lines.append("")
    for key, value in report["ratios"].items():
        lines.append(f"- {key}: {value:.2f}×")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 timed repeats instead of 15")
    args = parser.parse_args(argv)
    print(markdown(run(quick=args.quick)["metrics"]))


if __name__ == "__main__":
    main()
