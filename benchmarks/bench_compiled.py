"""The compiled path (``solve(..., compile=True)``) against eager, torchdiffeq and diffrax.

Problems 1 and 2 of bench_peers (the demo 2-50-2 cubic oscillator, batch 20, 1000 outputs;
the MLP 32-128-128-32, batch 256, one output), float32, one thread, dopri5 at the same
tolerances for everyone. For each problem, in one process, alternating the runs (medians):

- forward alone (no graph): our eager and compiled solve, torchdiffeq ``odeint``;
- forward + backward: our Backsolve and Direct, eager and compiled; torchdiffeq
  ``odeint_adjoint`` and ``odeint`` (autograd); diffrax BacksolveAdjoint and
  RecursiveCheckpointAdjoint where JAX is installed (full mode only: its compile takes minutes);
- per-evaluation solver overhead: wall / nfe minus the cost of one eager call of f (forward)
  or of f with one VJP (backward), measured alone in the same run. For a compiled run this
  also counts what compiling saved inside f itself, so it can go below zero;
- compile: ``stats["compile_seconds"]`` (the calls that compiled, forward + backward
  programs), and the first run's extra wall over the median run, which also holds what stats
  cannot see (Direct's backward graph is compiled by AOTAutograd at the first backward).
  Compiled cold: inductor's on-disk graph cache is off for the run (a warm cache compiles
  faster; a fresh machine or a new model pays this);
- break-even: first-run extra / (eager − compiled wall per iteration), in training iterations;
- gradient error: each run's parameter gradient against a float64 solve at rtol = atol = 1e-12
  (torchdiffeq's ``odeint``, autograd through its steps; our Direct without torchdiffeq);
- equal gradient error: at the same tolerances diffrax's BacksolveAdjoint measures the adjoint's
  error against an absolute atol, ours against atol × the adjoint's size (see
  ``torchadjoint.adjoint.base.adjoint_scale``), so the two do not buy the same gradient. Its
  backward tolerances are tightened by powers of two (diffrax's own
  ``BacksolveAdjoint(stepsize_controller=...)``, the forward unchanged) until its gradient error is
  no larger than our compiled Backsolve's, and the two are timed again, alternating.

``run(quick) -> dict`` for :mod:`benchmarks.report` (quick: problem 1 with 50 outputs and
Backsolve only, since compiling dominates); ``python benchmarks/bench_compiled.py`` prints
the tables (``--quick``, ``--no-diffrax``).
"""
from __future__ import annotations

import copy
import math
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

try:
    from benchmarks import bench_peers, common, peer_diffrax, report
except ImportError:  # pragma: no cover
    import bench_peers  # type: ignore
    import common  # type: ignore
    import peer_diffrax  # type: ignore
    import report  # type: ignore

import torchadjoint as ta
from torchadjoint import compiled, compiled_loop

try:
    import torchdiffeq
except ImportError:  # the `bench` extra is not installed
    torchdiffeq = None


class Plain(nn.Module):
    """The benchmark field without its evaluation counter (a Python attribute changed in
    ``forward`` is a side effect torch.compile recompiles on): the same ``net``, shared."""

    def __init__(self, net: nn.Module, cubic: bool):
        super().__init__()
        self.net, self.cubic = net, cubic

    def forward(self, t, y):
        return self.net(y**3 if self.cubic else y)


class Ours:
    """``solve(t) -> ys`` with torchadjoint on the counter-free field; keeps the stats."""

    def __init__(self, func, y0, rtol, atol, gradient_cls, compile: bool):
        self.func, self.y0, self.rtol, self.atol = func, y0, rtol, atol
        self.gradient_cls, self.compile = gradient_cls, compile
        self.stats: Optional[dict] = None

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        sol = ta.solve(self.func, self.y0, t, rtol=self.rtol, atol=self.atol, gradient=self.gradient_cls(),
                       compile=self.compile)
        self.stats = sol.stats
        return sol.ys


def _measure(solve: Callable, spec: dict, t: torch.Tensor, counted: nn.Module) -> Callable[[], dict]:
    """One forward + backward; nfe from our stats, or from the counting module for peers."""
    params = list(counted.parameters())

    def once() -> dict:
        for p in params:
            p.grad = None
        counted.nfe = 0
        start = time.perf_counter()
        ys = solve(t)
        forward_s = time.perf_counter() - start
        forward_nfe = counted.nfe
        spec["loss"](ys).backward()
        total_s = time.perf_counter() - start
        stats = getattr(solve, "stats", None)
        if stats is not None:
            forward_nfe = stats["forward"]["nfe"]
            backward = stats.get("backward") or {}
            backward_nfe = backward.get("nfe", 0)
            compile_s = stats["forward"].get("compile_seconds", 0.0) + backward.get("compile_seconds", 0.0)
        else:
            backward_nfe, compile_s = counted.nfe - forward_nfe, 0.0
        grad = torch.cat([p.grad.reshape(-1) for p in params]).detach().double()
        return dict(fwd_nfe=forward_nfe, bwd_nfe=backward_nfe, fwd_s=forward_s, total_s=total_s, compile_s=compile_s,
                    grad=grad)

    return once


def _forward_only(solve: Callable, counted: nn.Module) -> Callable[[], dict]:
    def once() -> dict:
        counted.nfe = 0
        start = time.perf_counter()
        with torch.no_grad():
            solve()
        wall = time.perf_counter() - start
        return dict(wall_s=wall, nfe=getattr(solve, "nfe", None) or counted.nfe,
                    compile_s=getattr(solve, "compile_s", 0.0))

    return once


class ForwardOurs:
    def __init__(self, func, y0, t, rtol, atol, compile):
        self.args = (func, y0, t, rtol, atol, compile)
        self.nfe, self.compile_s = None, 0.0

    def __call__(self):
        func, y0, t, rtol, atol, compile = self.args
        sol = ta.solve(func, y0, t, rtol=rtol, atol=atol, compile=compile)
        self.nfe = sol.stats["forward"]["nfe"]
        self.compile_s = sol.stats["forward"].get("compile_seconds", 0.0)


def _alternate(runs: Dict[str, Callable[[], dict]], repeats: int) -> Dict[str, List[dict]]:
    """The first call of each (where compiling happens) kept apart as sample 0; then
    ``repeats`` rounds in alternation."""
    samples: Dict[str, List[dict]] = {name: [] for name in runs}
    for name, fn in runs.items():
        samples[name].append(fn())
    for _ in range(repeats):
        for name, fn in runs.items():
            samples[name].append(fn())
    return samples


def _median(samples: List[dict], key: str) -> float:
    return common.median([s[key] for s in samples[1:]])


def _break_even(extra_s: float, eager_s: float, compiled_s: float) -> float:
    saving = eager_s - compiled_s
    return extra_s / saving if saving > 0 else math.inf


def problem(key: str, spec: dict, repeats: int, with_diffrax: bool, gradients=(ta.Backsolve, ta.Direct)) -> dict:
    counted = spec["func"]
    func = Plain(counted.net, cubic=key == "demo")
    y0, t, rtol, atol = spec["y0"], spec["t"], spec["rtol"], spec["atol"]
    params = tuple(counted.parameters())
    costs = bench_peers.f_costs(counted, y0, 200 if key == "demo" else 50)()
    f_us, vjp_us = 1e6 * costs["f_s"], 1e6 * costs["vjp_s"]

    # Forward alone.
    fwd_runs: Dict[str, Callable[[], dict]] = {
        "torchadjoint eager": _forward_only(ForwardOurs(func, y0, t, rtol, atol, False), counted),
        "torchadjoint compiled": _forward_only(ForwardOurs(func, y0, t, rtol, atol, True), counted),
    }
    if torchdiffeq is not None:
        fwd_runs["torchdiffeq odeint"] = _forward_only(
            lambda: torchdiffeq.odeint(counted, y0, t, rtol=rtol, atol=atol, method="dopri5"), counted)
    compiled.clear_cache()  # each phase compiles its own programs: first-run extras are whole
    fwd = _alternate(fwd_runs, repeats)
    fwd_rows = []
    for name, s in fwd.items():
        wall, nfe = _median(s, "wall_s"), s[-1]["nfe"]
        fwd_rows.append([name, nfe, 1e3 * wall, 1e6 * wall / nfe - f_us, s[0].get("compile_s", 0.0),
                         s[0]["wall_s"] - wall])

    floor = _loop_floor(func, y0, t, rtol, atol, fwd["torchadjoint compiled"])

    # Forward + backward.
    runs: Dict[str, Callable[[], dict]] = {}
    for gradient in gradients:
        for flag in (False, True):
            label = f"torchadjoint {gradient.__name__} {'compiled' if flag else 'eager'}"
            runs[label] = _measure(Ours(func, y0, rtol, atol, gradient, flag), spec, t, counted)
    if torchdiffeq is not None:
        runs["torchdiffeq odeint_adjoint"] = _measure(
            lambda t: torchdiffeq.odeint_adjoint(counted, y0, t, rtol=rtol, atol=atol, method="dopri5",
                                                 adjoint_params=params), spec, t, counted)
        runs["torchdiffeq odeint"] = _measure(
            lambda t: torchdiffeq.odeint(counted, y0, t, rtol=rtol, atol=atol, method="dopri5"), spec, t, counted)
    diffrax_note, peer = None, None
    if with_diffrax:
        diffrax_note = peer_diffrax.skip_note("cpu")
        peer = peer_diffrax.make_problem(spec, key, "cpu")
        if peer is not None:
            runs.update({name: peer.measure(name) for name in peer_diffrax.NAMES})
    else:
        diffrax_note = "diffrax not measured in quick mode (its compile takes minutes)"
    compiled.clear_cache()
    both = _alternate(runs, repeats)
    rows, metrics = [], {}
    reference, reference_by = _reference_gradient(func, spec)
    error_of = lambda grad: float((grad - reference).norm() / reference.norm())  # noqa: E731
    for name, s in both.items():
        fwd_s, total_s = _median(s, "fwd_s"), _median(s, "total_s")
        fwd_nfe, bwd_nfe = s[-1]["fwd_nfe"], s[-1]["bwd_nfe"]
        bwd_s = total_s - fwd_s
        # Backward nfe = calls of f with one VJP each, of the eager torch f measured above.
        torch_adjoint = name.startswith("torchadjoint Backsolve") or name == "torchdiffeq odeint_adjoint"
        bwd_over = 1e6 * bwd_s / bwd_nfe - vjp_us if bwd_nfe and torch_adjoint else None
        compile_s = s[0].get("compile_s", 0.0)
        first_extra = s[0]["total_s"] - total_s
        grad_error = error_of(s[-1]["grad"])
        metrics[name] = dict(fwd_nfe=fwd_nfe, bwd_nfe=bwd_nfe, fwd_s=fwd_s, total_s=total_s, compile_s=compile_s,
                             first_extra_s=first_extra, grad_error=grad_error)
        torch_field = not name.startswith("diffrax")  # f's eager cost says nothing of XLA's
        rows.append([name, fwd_nfe, bwd_nfe, 1e3 * fwd_s, 1e3 * total_s, 1e6 * fwd_s / fwd_nfe,
                     1e6 * fwd_s / fwd_nfe - f_us if torch_field else None,
                     1e6 * bwd_s / bwd_nfe if bwd_nfe else None, bwd_over, compile_s, first_extra, grad_error])
    breakeven = []
    for gradient in (g.__name__ for g in gradients):
        eager, fast = metrics[f"torchadjoint {gradient} eager"], metrics[f"torchadjoint {gradient} compiled"]
        iters = _break_even(fast["first_extra_s"], eager["total_s"], fast["total_s"])
        breakeven.append([gradient, 1e3 * eager["total_s"], 1e3 * fast["total_s"], eager["total_s"] / fast["total_s"],
                          fast["compile_s"], fast["first_extra_s"], iters])
        metrics[f"{gradient} break-even iterations"] = iters
    fwd_eager = next(r for r in fwd_rows if r[0] == "torchadjoint eager")
    fwd_fast = next(r for r in fwd_rows if r[0] == "torchadjoint compiled")
    breakeven.append(["forward alone", fwd_eager[2], fwd_fast[2], fwd_eager[2] / fwd_fast[2], fwd_fast[4], fwd_fast[5],
                      _break_even(fwd_fast[5], 1e-3 * fwd_eager[2], 1e-3 * fwd_fast[2])])
    diffrax_fwd = [metrics[name]["fwd_s"] for name in metrics if name.startswith("diffrax")]
    floor["diffrax_fwd_ms"] = 1e3 * min(diffrax_fwd) if diffrax_fwd else None
    kernels = _kernel_floor(func, y0, t, metrics)
    equal = None
    if peer is not None and "torchadjoint Backsolve compiled" in runs:
        equal = _equal_error(peer, runs["torchadjoint Backsolve compiled"], metrics["torchadjoint Backsolve compiled"],
                             error_of, repeats)
        metrics["equal gradient error"] = equal["metrics"]
    return dict(title=spec["title"], f_us=f_us, vjp_us=vjp_us, fwd_rows=fwd_rows, rows=rows, breakeven=breakeven,
                metrics=metrics, diffrax_note=diffrax_note, floor=floor, kernels=kernels, reference_by=reference_by,
                equal=equal)


def _reference_gradient(func: nn.Module, spec: dict) -> Tuple[torch.Tensor, str]:
    """The parameter gradient (in ``func.parameters()`` order, float64) of a float64 solve at
    rtol = atol = 1e-12: torchdiffeq's ``odeint`` (autograd through its steps: a peer's
    independent code), or our Direct where torchdiffeq is not installed; and which it was."""
    twin = copy.deepcopy(func).double()
    y0, t = spec["y0"].double(), spec["t"].double()
    if torchdiffeq is not None:
        ys, by = torchdiffeq.odeint(twin, y0, t, rtol=1e-12, atol=1e-12, method="dopri5"), "torchdiffeq odeint"
    else:
        ys, by = ta.solve(twin, y0, t, rtol=1e-12, atol=1e-12, gradient=ta.Direct()).ys, "torchadjoint Direct"
    spec["loss"](ys).backward()
    return torch.cat([p.grad.reshape(-1) for p in twin.parameters()]), f"{by}, float64, rtol = atol = 1e-12"


#: diffrax's backward tolerances are tightened by 2^-k, k = 0 … EQUAL_ERROR_STEPS, at most.
EQUAL_ERROR_STEPS = 8


def _equal_error(peer, ours: Callable[[], dict], ours_metrics: dict, error_of: Callable, repeats: int) -> dict:
    """Our compiled Backsolve against diffrax's BacksolveAdjoint with its backward rtol and atol
    tightened by the first power of two that brings its gradient error down to ours, the two
    timed again in alternation. Where a halving gains less than 10 % (the backward's tolerance
    no longer governs its error: the forward's, or output times that fix its steps) the most
    accurate factor tried stands in, unmatched. Returns rows [run, backward tolerances ×, bwd
    nfe, grad error, fwd+bwd ms, ours / it] and metrics."""
    target, best = ours_metrics["grad_error"], None  # best: (error, factor) of the most accurate so far
    for k in range(EQUAL_ERROR_STEPS + 1):
        factor = 2.0 ** -k
        error = error_of(peer.gradient(peer.tightened(factor)))
        if error <= target:
            best = (error, factor)
            break
        if best is not None and error > 0.9 * best[0]:
            break
        if best is None or error < best[0]:
            best = (error, factor)
    factor = best[1]
    name = peer.tightened(factor)
    samples = _alternate({"ours": ours, name: peer.measure(name)}, repeats)
    ours_s, peer_s = _median(samples["ours"], "total_s"), _median(samples[name], "total_s")
    peer_error = error_of(samples[name][-1]["grad"])
    rows = [["torchadjoint Backsolve compiled", 1, samples["ours"][-1]["bwd_nfe"], error_of(samples["ours"][-1]["grad"]),
             1e3 * ours_s, None],
            [name, factor, samples[name][-1]["bwd_nfe"], peer_error, 1e3 * peer_s, ours_s / peer_s]]
    return dict(rows=rows, metrics=dict(peer=name, factor=factor, matched=peer_error <= target,
                                        ours_ms=1e3 * ours_s, peer_ms=1e3 * peer_s, ratio=ours_s / peer_s))


def _kernel_floor(func, y0: torch.Tensor, t: torch.Tensor, metrics: dict) -> List[list]:
    """What torch's own compiled kernels cost for the evaluations each run makes, with no
    solver around them: ten dependent calls of f (or of f with its VJP) in one
    torch.compile'd graph, per call (dynamo's per-call cost paid once for ten). A forward
    evaluation costs f; a backward one (Backsolve) f with its VJP; autograd through a call of f
    (Direct) at least the same. Rows: [run, evaluations, kernels ms, our compiled ms,
    diffrax's peer, diffrax ms, kernels / diffrax]."""
    from torch.func import functional_call, vjp

    chain = 10
    names = [name for name, _ in func.named_parameters()]

    def evaluations(t0, y):
        for _ in range(chain):
            y = y + 1e-3 * func(t0, y)
        return y

    def with_vjps(t0, y, a, params):
        def f_of(y, *params):
            return functional_call(func, dict(zip(names, params)), (t0, y))

        a_theta = [torch.zeros_like(p) for p in params]
        for _ in range(chain):
            fy, pull = vjp(f_of, y, *params)
            grads = pull(a)
            y, a = y + 1e-3 * fy, a + 1e-3 * grads[0]
            # The parameter products are summed and returned: unused, inductor would drop their
            # kernels (the weight-gradient matrix products), and the floor would leave them out.
            a_theta = [s + 1e-3 * g for s, g in zip(a_theta, grads[1:])]
        return y, a, a_theta

    params = tuple(p.detach() for p in func.parameters())
    with torch.no_grad():
        f_chain = torch.compile(evaluations, fullgraph=True, dynamic=False)
        f_chain(t[0], y0)
        f_s = common.median(common.alternate(dict(run=lambda: f_chain(t[0], y0)), repeats=100, warmup=0)["run"]) / chain
        vjp_chain = torch.compile(with_vjps, fullgraph=True, dynamic=False)
        a0 = torch.ones_like(y0)
        vjp_chain(t[0], y0, a0, params)
        vjp_s = common.median(common.alternate(dict(run=lambda: vjp_chain(t[0], y0, a0, params)), repeats=50,
                                                      warmup=0)["run"]) / chain
    rows = []
    pairs = [("forward", "torchadjoint Backsolve compiled", None),
             ("Backsolve fwd+bwd", "torchadjoint Backsolve compiled", "diffrax / BacksolveAdjoint"),
             ("Direct fwd+bwd", "torchadjoint Direct compiled", "diffrax / RecursiveCheckpointAdjoint")]
    for run, ours, peer in pairs:
        if ours not in metrics:
            continue
        m = metrics[ours]
        if run == "forward":
            count, kernels_s, ours_s = m["fwd_nfe"], m["fwd_nfe"] * f_s, m["fwd_s"]
            peers = [name for name in metrics if name.startswith("diffrax")]
            peer_s = min((metrics[name]["fwd_s"] for name in peers), default=None)
            peer = "diffrax (faster forward)" if peers else None
        elif run.startswith("Backsolve"):
            count = m["fwd_nfe"] + m["bwd_nfe"]
            kernels_s, ours_s = m["fwd_nfe"] * f_s + m["bwd_nfe"] * vjp_s, m["total_s"]
            peer_s = metrics[peer]["total_s"] if peer in metrics else None
        else:
            count, kernels_s, ours_s = m["fwd_nfe"], m["fwd_nfe"] * vjp_s, m["total_s"]
            peer_s = metrics[peer]["total_s"] if peer in metrics else None
        rows.append([run, count, 1e3 * kernels_s, 1e3 * ours_s, peer if peer_s else None,
                     1e3 * peer_s if peer_s else None, kernels_s / peer_s if peer_s else None])
    return rows


def _loop_floor(func, y0: torch.Tensor, t: torch.Tensor, rtol: float, atol: float, samples: List[dict]) -> dict:
    """Where the compiled forward's time goes: its loop graph calls (the steps run inside them,
    see torchadjoint.compiled_loop) made again alone, with the same arguments, as the solver
    makes them (``program.call``: dynamo's guards checked, its code run) and through dynamo's
    frame hook (``program.fn``, what a torch.compile'd function costs per call), and the rest of
    the wall (the host: the solve's set-up, the first evaluation of f, the outputs)."""
    calls = []
    real = compiled_loop.GraphLoop._call

    def kept(loop, *args):  # the arguments of each graph call of one solve
        calls.append((loop.program, (loop.func, loop.tensors) + args))
        return real(loop, *args)

    compiled_loop.GraphLoop._call = kept
    try:
        with torch.no_grad():
            sol = ta.solve(func, y0, t, rtol=rtol, atol=atol, compile=True)
    finally:
        compiled_loop.GraphLoop._call = real
    with torch.no_grad():
        each = dict(call=lambda: [program.call(*args) for program, args in calls],
                    hook=lambda: [program.fn(*args) for program, args in calls])
        times = common.alternate(each, repeats=100, warmup=2)
    graphs_s, hook_s = common.median(times["call"]), common.median(times["hook"])
    wall = _median(samples, "wall_s")
    return dict(steps=sol.stats["forward"]["steps"], calls=len(calls), graphs_ms=1e3 * graphs_s,
                hook_ms=1e3 * hook_s, wall_ms=1e3 * wall, host_ms=1e3 * (wall - graphs_s))


def run(quick: bool = False, with_diffrax: Optional[bool] = None) -> dict:
    torch.set_num_threads(1)
    repeats = 3 if quick else 7
    with_diffrax = (not quick) if with_diffrax is None else with_diffrax
    specs = bench_peers.problem_specs(quick)
    if quick:  # compiling dominates: one problem, one gradient method (about 3 programs)
        specs = {"demo": specs["demo"]}
    gradients = (ta.Backsolve,) if quick else (ta.Backsolve, ta.Direct)
    compiled.clear_cache()
    sections, headline, metrics = [], {}, {}
    # Compile cold: without inductor's on-disk cache of generated code.
    with torch._inductor.config.patch(fx_graph_cache=False):
        for key, spec in specs.items():
            result = problem(key, spec, repeats, with_diffrax, gradients)
            metrics[key] = result["metrics"]
            cost = f"f alone {result['f_us']:.1f} µs, f + VJP {result['vjp_us']:.1f} µs (eager)"
            sections.append(dict(
                title=f"{result['title']}: forward alone", notes=f"Per-evaluation overhead = wall / nfe − {cost}.",
                columns=["library", "nfe", "wall ms", "overhead µs / eval", "compile s", "first-run extra s"],
                rows=result["fwd_rows"]))
            sections.append(dict(
                title=f"{result['title']}: forward + backward",
                notes=(f"µs / eval: wall / nfe, all in. Overhead per evaluation: forward wall / forward nfe − f alone, "
                       f"backward wall / backward nfe − f + VJP ({cost}); for the continuous adjoints only (autograd "
                       f"through the steps makes no backward evaluations; diffrax's f is XLA's, not eager torch). "
                       f"compile s: our stats' compile_seconds (forward + backward), diffrax's jit compile. "
                       f"`grad error`: ‖g − g_ref‖ / ‖g_ref‖, g_ref from {result['reference_by']}. "
                       + (result["diffrax_note"] or "")),
                columns=["library / method", "fwd nfe", "bwd nfe", "fwd ms", "fwd+bwd ms", "fwd µs / eval",
                         "fwd overhead µs / eval", "bwd µs / eval", "bwd overhead µs / eval", "compile s",
                         "first-run extra s", "grad error"],
                rows=result["rows"]))
            sections.append(dict(
                title=f"{result['title']}: when compiling pays off",
                notes="Break-even = first-run extra / (eager − compiled wall per iteration); inf: compiled is not faster.",
                columns=["run", "eager ms", "compiled ms", "eager / compiled", "compile s (stats)", "first-run extra s",
                         "break-even iterations"],
                rows=result["breakeven"]))
            floor = result["floor"]
            ratio = (floor["graphs_ms"] / floor["diffrax_fwd_ms"]) if floor["diffrax_fwd_ms"] else None
            sections.append(dict(
                title=f"{result['title']}: where the compiled forward's time goes",
                notes=("The steps run inside loop graphs (a torch.while_loop each, as many steps as its buffers "
                       "hold); their calls, made again alone with the same arguments, are what the solve cannot go "
                       "below with those graphs; the rest of the wall is the host's (set-up, the first evaluation "
                       "of f, the outputs). graphs ms: called as the solver calls them (dynamo's guards checked, "
                       "the code dynamo generated run directly); through dynamo's hook: the same calls made as to a "
                       "torch.compile'd function. graphs / diffrax: over diffrax's fastest forward in this run."),
                columns=["steps", "graph calls", "graphs ms", "through dynamo's hook ms", "compiled wall ms", "host ms",
                         "diffrax fwd ms", "graphs / diffrax"],
                rows=[[floor["steps"], floor["calls"], floor["graphs_ms"], floor["hook_ms"], floor["wall_ms"],
                       floor["host_ms"], floor["diffrax_fwd_ms"], ratio]]))
            sections.append(dict(
                title=f"{result['title']}: torch's compiled kernels alone against diffrax",
                notes=("kernels ms: the evaluations of f each run makes, with no solver around them, each timed "
                       "as ten dependent calls in one torch.compile'd graph (per call): f for a forward evaluation, "
                       "f with its VJP (torch.func) for a backward one, and for each forward evaluation of Direct "
                       "(autograd through a call of f is a forward and a VJP). Where kernels / diffrax exceeds a target ratio, the target lies "
                       "below what torch's kernels on this machine can do, whatever the solver around them."),
                columns=["run", "evaluations", "kernels ms", "ours compiled ms", "diffrax run", "diffrax ms",
                         "kernels / diffrax"],
                rows=result["kernels"]))
            equal = result["equal"]
            if equal is not None:
                sections.append(dict(
                    title=f"{result['title']}: Backsolve against diffrax's BacksolveAdjoint at equal gradient error",
                    notes=("At the same tolerances diffrax's BacksolveAdjoint judges the adjoint's error against an "
                           "absolute atol, ours against atol × the adjoint's size (max |∂L/∂y(t_i)|), so the two do "
                           "not buy the same gradient (`grad error` above). Here diffrax's backward rtol and atol "
                           "(BacksolveAdjoint(stepsize_controller=PIDController(...)), its forward unchanged) are "
                           "tightened by the first power of two that brings its gradient error to ours or below, "
                           "and the two runs are timed again, alternating. grad error as above."
                           + ("" if equal["metrics"]["matched"] else
                              " Not matched: halving diffrax's backward tolerances stopped reducing its gradient "
                              "error (by 10 % or more) before it reached ours; its most accurate run is shown.")),
                    columns=["run", "backward rtol, atol ×", "bwd nfe", "grad error", "fwd+bwd ms", "ours / it"],
                    rows=equal["rows"]))
                headline[f"{key}: Backsolve compiled / diffrax BacksolveAdjoint at equal gradient error"] = \
                    equal["metrics"]["ratio"]
            for row in result["kernels"]:
                if row[6] is not None:
                    headline[f"{key}: {row[0]}, torch kernels alone / diffrax"] = row[6]
            headline[f"{key}: compiled forward, host share of wall"] = floor["host_ms"] / floor["wall_ms"]
            if ratio is not None:
                headline[f"{key}: loop graphs alone / diffrax forward"] = ratio
            for row in result["breakeven"]:
                headline[f"{key}: {row[0]} eager / compiled wall"] = row[3]
                headline[f"{key}: {row[0]} break-even iterations"] = row[6]
    return dict(
        name="compiled",
        title="The compiled path: solve(..., compile=True) against eager, torchdiffeq and diffrax",
        notes=(f"{common.machine()}. float32, dopri5, medians of {repeats} alternating runs after a first (compiling) "
               "run; compiled cold (inductor's on-disk graph cache off)."),
        sections=sections,
        headline=headline,
        metrics=metrics,
    )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-diffrax", action="store_true")
    args = parser.parse_args()
    result = run(quick=args.quick, with_diffrax=False if args.no_diffrax else None)
    print(result["notes"])
    report.print_sections(result)
