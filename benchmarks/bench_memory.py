"""Peak memory of forward + backward as the number of solver steps grows 100×.

    python benchmarks/bench_memory.py            # intervals 1, 10, 140 (a few minutes)
    python benchmarks/bench_memory.py --quick    # intervals 1, 3, a smaller batch

The problem: ``dy/dt = ω ⊙ J y + 0.05 tanh(y W1) W2``, coordinates rotating in pairs
(frequencies 0.5 … 2) perturbed by a small tanh network (state 128, hidden 16, batch 512,
float32), solved with dopri5 at rtol 1e-5, atol 1e-7 over ``[0, T]``, output only at
``T``; loss on ``y(T)``. The solution keeps oscillating, so the number of steps grows in
proportion to ``T``: ``T = 1, 10, 140`` takes about 100× more function evaluations at the
end than at the start (printed). The state (256 KiB a vector) is large enough that the
constant part of an O(1)-memory method stands well above the allocator's noise (heap
fragmentation from the many small allocations of autograd, a few hundred KiB).

How memory is measured, honestly. Torch's CPU allocations do not go through Python's
allocator, so ``tracemalloc`` does not see them; what the operating system sees does. Each
measurement runs in its own subprocess (nothing left over from another method or size):
it imports, builds the problem, runs forward + backward once on a short interval (so
that one-off initialisation is not counted), then resets the kernel's peak resident-set
counter (``/proc/self/clear_refs``, Linux ≥ 4.0; without it the warm-up is skipped) and
records the current resident set as the baseline. After one forward + backward the peak
(``VmHWM``; not ``ru_maxrss``, which Linux carries over from the parent) minus the baseline is the reported figure: memory that was resident at
the worst moment of the run and not before it. glibc's malloc is told to return every
block of 64 KiB or more to the system as soon as it is freed (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``), so that the resident set follows the live tensors rather
than the allocator's caching. Page granularity is 4 KiB.

Methods are rows of :data:`METHODS` (``name -> solve(func, y0, t, tol) -> ys``); adding a
gradient method or a peer is one line. Configurations whose memory would grow past
:data:`BUDGET_MB` by the trend of the smaller sizes are not run and are marked so.

``run(quick) -> dict`` for :mod:`benchmarks.report`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Callable, Dict, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # ``python benchmarks/bench_memory.py`` from anywhere
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch import nn  # noqa: E402

import torchadjoint as ta  # noqa: E402
from benchmarks.common import reset_peak, status_kib  # noqa: E402

try:
    import torchdiffeq
except ImportError:  # the `bench` extra is not installed
    torchdiffeq = None

TOL = dict(rtol=1e-5, atol=1e-7)
BUDGET_MB = 2000.0


def _torchdiffeq(adjoint: bool) -> Optional[Callable]:
    if torchdiffeq is None:
        return None
    if adjoint:
        return lambda f, y0, t, tol: torchdiffeq.odeint_adjoint(
            f, y0, t, method="dopri5", adjoint_params=tuple(f.parameters()), adjoint_options=dict(norm="seminorm"), **tol)
    return lambda f, y0, t, tol: torchdiffeq.odeint(f, y0, t, method="dopri5", **tol)


def _ours(gradient_name: str, **kwargs) -> Optional[Callable]:
    if gradient_name not in ta.GRADIENT_METHODS:  # not in this version of the library
        return None
    return lambda f, y0, t, tol: ta.solve(f, y0, t, gradient=ta.gradient_method(gradient_name, **kwargs), **tol).ys


# name -> solve(func, y0, t, tol) -> ys (N, *y0.shape), differentiable w.r.t. func's parameters.
# A peer is one more line, e.g. torchode's backsolve adjoint:
#   "torchode / BacksolveAdjoint": lambda f, y0, t, tol: <build and solve a torchode problem>,
METHODS: Dict[str, Optional[Callable]] = {
    "torchadjoint / Backsolve": _ours("backsolve"),
    "torchadjoint / Checkpointed": _ours("checkpointed"),
    "torchadjoint / Direct(checkpoints=16)": _ours("direct", checkpoints=16),
    "torchadjoint / Direct": _ours("direct"),
    "torchdiffeq / odeint_adjoint (seminorm)": _torchdiffeq(adjoint=True),
    "torchdiffeq / odeint": _torchdiffeq(adjoint=False),
}


class Rotating(nn.Module):
    """``f(y) = ω ⊙ J y + 0.05 tanh(y W1) W2``: coordinates rotate in pairs (frequencies
    0.5 … 2), perturbed by a small network (state 128, hidden 16): an oscillation that goes
    on, so the number of steps grows in proportion to the interval."""

    def __init__(self, dim: int = 128, hidden: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("omega", 0.5 + 1.5 * torch.rand(dim // 2, generator=g))
        self.l1 = nn.Linear(dim, hidden)
        self.l2 = nn.Linear(hidden, dim)
        self.nfe = 0

    def forward(self, t, y):
        self.nfe += 1
        pairs = y.unflatten(-1, (-1, 2))
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1) * self.omega[:, None]
        return rotated.flatten(-2) + 0.05 * self.l2(torch.tanh(self.l1(y)))


def problem(batch: int, seed: int = 0):
    torch.manual_seed(seed)
    func = Rotating(seed=seed)
    y0 = torch.randn(batch, 128)
    return func, y0


def child(name: str, T: float, batch: int) -> dict:
    """One measurement (in its own process): peak resident memory of forward + backward."""

    import warnings

    # Backsolve's reconstruction check may warn on the longest interval (the tanh part
    # contracts a little); this benchmark is about memory.
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    solve = METHODS[name]
    func, y0 = problem(batch)
    t = torch.tensor([0.0, T])

    def once(t_):
        for p in func.parameters():
            p.grad = None
        func.nfe = 0
        ys = solve(func, y0, t_, TOL)
        forward_nfe = func.nfe
        ys[-1].pow(2).mean().backward()
        return forward_nfe

    warmed = reset_peak()
    if warmed:
        once(torch.tensor([0.0, 0.1]))
        reset_peak()
    baseline_kb = status_kib("VmRSS")
    forward_nfe = once(t)
    peak_kb = status_kib("VmHWM")  # this process's own peak, reset above
    return dict(peak_mb=(peak_kb - baseline_kb) / 1024, forward_nfe=forward_nfe, warmed=warmed)


def measure(name: str, T: float, batch: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    code = f"from benchmarks.bench_memory import child; import json; print(json.dumps(child({name!r}, {T!r}, {batch!r})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        return dict(error=out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> dict:
    intervals = (1.0, 3.0) if quick else (1.0, 10.0, 140.0)
    batch = 128 if quick else 512
    table: Dict[str, Dict[float, dict]] = {}
    for name, solve in METHODS.items():
        if solve is None:
            continue
        table[name] = {}
        for T in intervals:
            done = [r for r in table[name].values() if "peak_mb" in r]
            if len(done) >= 2:
                # Linear trend in T from the last two sizes: skip what would exceed the budget.
                (T1, r1), (T2, r2) = sorted(((k, v) for k, v in table[name].items() if "peak_mb" in v))[-2:]
                predicted = r2["peak_mb"] + (r2["peak_mb"] - r1["peak_mb"]) / (T2 - T1) * (T - T2)
                if predicted > BUDGET_MB:
                    table[name][T] = dict(skipped=f"~{predicted:.0f} MB predicted")
                    continue
            table[name][T] = measure(name, T, batch)
    rows = []
    headline = {}
    for name, by_T in table.items():
        cells = []
        for T in intervals:
            r = by_T[T]
            cells.append(f"{r['peak_mb']:.1f}" if "peak_mb" in r else r.get("skipped") or r.get("error"))
        first, last = by_T[intervals[0]], by_T[intervals[-1]]
        growth = last["peak_mb"] / first["peak_mb"] if "peak_mb" in first and "peak_mb" in last and first["peak_mb"] > 0 else None
        rows.append([name] + cells + [growth])
        if growth is not None:
            headline[f"{name}: peak memory at T={intervals[-1]:g} / at T={intervals[0]:g}"] = growth
    steps_ref = table.get("torchadjoint / Backsolve", {})
    nfe = [steps_ref.get(T, {}).get("forward_nfe") for T in intervals]
    if nfe[0] and nfe[-1]:
        headline[f"forward nfe at T={intervals[-1]:g} / at T={intervals[0]:g}"] = nfe[-1] / nfe[0]
    return dict(
        name="memory",
        title="Peak memory of forward + backward as the step count grows",
        notes=(
            f"Problem: pairwise rotation + small tanh network, state 128, batch {batch}, float32, dopri5 rtol 1e-5 atol 1e-7 on "
            f"[0, T], one output. Forward function evaluations (Backsolve's forward): "
            + ", ".join(f"T={T:g}: {n}" for T, n in zip(intervals, nfe))
            + ". Peak resident memory above the baseline, MB, each measurement in its own process (see the "
            "module docstring for the method)."
        ),
        sections=[dict(
            title="Peak memory above baseline (MB)",
            columns=["library / gradient"] + [f"T = {T:g}" for T in intervals] + [f"T={intervals[-1]:g} / T={intervals[0]:g}"],
            rows=rows,
        )],
        headline=headline,
        metrics=dict(table={k: {str(T): v for T, v in d.items()} for k, d in table.items()}, forward_nfe=nfe),
    )


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="intervals 1 and 3, batch 128")
    args = parser.parse_args(argv)
    result = run(args.quick)
    print(result["notes"])
    section = result["sections"][0]
    print(" | ".join(section["columns"]))
    for row in section["rows"]:
        print(" | ".join("-" if x is None else (f"{x:.3g}" if isinstance(x, float) else str(x)) for x in row))
    for key, value in result["headline"].items():
        print(f"{key}: {value:.3g}")


if __name__ == "__main__":
    main()
