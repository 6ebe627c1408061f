"""Direct (autograd through our steps) against autograd through torchdiffeq: graph size and time.

Counts every autograd node the forward solve records (walking ``grad_fn`` from the outputs)
per call of f, and times forward + backward, alternating the two libraries in one process
(medians). Problem 1's field (torchdiffeq's demo: cubic oscillator 2-50-2, batch 20) on
[0, 5] with 10 outputs: fixed-step Euler (step 0.01) and rk4 (step 0.05), and dopri5 at
rtol 1e-6, atol 1e-7. f's own nodes are the same in both libraries; the difference per call is
what each solver adds.

``run(quick) -> dict`` for :mod:`benchmarks.report`.
"""
from __future__ import annotations

import time
from typing import Callable, Dict

import torch

try:
    from benchmarks import common, report
except ImportError:  # pragma: no cover
    import common  # type: ignore
    import report  # type: ignore

import torchadjoint as ta

try:
    import torchdiffeq
except ImportError:  # the `bench` extra is not installed
    torchdiffeq = None

CASES = {
    "euler": dict(step_size=0.01),
    "rk4": dict(step_size=0.05),
    "dopri5": dict(rtol=1e-6, atol=1e-7),
}


def graph_nodes(root: torch.Tensor) -> int:
    """Autograd nodes reachable from ``root.grad_fn``."""
    seen, stack = set(), [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions)
    return len(seen)


def solvers(method: str, options: dict) -> Dict[str, Callable]:
    out = {"torchadjoint / Direct": lambda f, y0, t: ta.solve(f, y0, t, method=method, gradient=ta.Direct(), **options).ys}
    if torchdiffeq is not None:
        kwargs = dict(options=dict(step_size=options["step_size"])) if "step_size" in options else options
        out["torchdiffeq / odeint"] = lambda f, y0, t: torchdiffeq.odeint(f, y0, t, method=method, **kwargs)
    return out


def run(quick: bool = False) -> dict:
    repeats = 3 if quick else 15
    func, y0, _ = common.demo_problem(batch=20)
    t = torch.linspace(0.0, 1.0 if quick else 5.0, 10)
    params = list(func.parameters())
    rows, headline, metrics = [], {}, {}
    for method, options in CASES.items():
        runs = solvers(method, options)
        counts: Dict[str, dict] = {}
        for name, solve in runs.items():
            func.nfe = 0
            ys = solve(func, y0, t)
            counts[name] = dict(nfe=func.nfe, nodes=graph_nodes(ys.sum()))
        times = {name: [] for name in runs}
        for _ in range(repeats + 1):  # the first round warms up, untimed
            for name, solve in runs.items():
                for p in params:
                    p.grad = None
                start = time.perf_counter()
                solve(func, y0, t).pow(2).mean().backward()
                times[name].append(time.perf_counter() - start)
        ours = "torchadjoint / Direct"
        for name in runs:
            c = counts[name]
            wall = common.median(times[name][1:])
            c.update(nodes_per_f=c["nodes"] / c["nfe"], wall_s=wall)
            rows.append([method, name, c["nfe"], c["nodes"], c["nodes_per_f"], 1e3 * wall,
                         counts[ours]["nodes_per_f"] / c["nodes_per_f"], common.median(times[ours][1:]) / wall])
        metrics[method] = counts
        if "torchdiffeq / odeint" in counts:
            theirs = counts["torchdiffeq / odeint"]
            headline[f"{method}: autograd nodes per call of f, Direct / torchdiffeq"] = counts[ours]["nodes_per_f"] / theirs["nodes_per_f"]
            headline[f"{method}: fwd+bwd wall, Direct / torchdiffeq odeint"] = counts[ours]["wall_s"] / theirs["wall_s"]
    return dict(
        name="direct_graph",
        title="Direct against autograd through torchdiffeq: autograd nodes per call of f, and time",
        notes=(
            f"Problem 1's field (cubic oscillator 2-50-2 tanh, batch 20), t in [0, {float(t[-1]):g}] with 10 outputs, "
            "float32, loss = mean of squares over the outputs. `nodes` = every autograd node the forward records "
            "(walked from the outputs' grad_fn), f's own included (the same in both libraries). Wall: forward + "
            f"backward, median of {repeats} alternating runs, one thread."
        ),
        sections=[dict(
            title="Graph size and time",
            columns=["method", "library", "nfe", "nodes", "nodes per call of f", "fwd+bwd ms",
                     "ours/theirs nodes per f", "ours/theirs wall"],
            rows=rows,
        )],
        headline=headline,
        metrics=metrics,
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    result = run()
    print(report.table(result["sections"][0]["columns"], result["sections"][0]["rows"]))
