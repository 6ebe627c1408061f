"""``torchadjoint compare``: every gradient method on one problem, at several tolerances.

For each registered gradient method (``torchadjoint.GRADIENT_METHODS``) and each
tolerance, one solve and one backward pass of the problem's loss; measured: the relative
error of ``(dL/dy0, dL/dθ)`` against a reference gradient, forward and backward function
evaluations (and VJPs), wall time, and peak memory. The reference is analytic where the
problem has one (linear ODEs: autograd through ``torch.linalg.matrix_exp``), otherwise
autograd through the solver (``Direct``) in float64 with dopri8 at rtol 1e-11, atol 1e-13.

A problem is a :class:`Setup`: ``func``, ``y0``, ``t``, ``loss(ys) -> scalar``, ``params``
and optionally ``reference() -> (dL/dy0, dL/dθ...)`` in float64. Built in: ``linear``,
``contracting`` (stiffly decaying linear: backsolve's backward re-solve of ``y`` explodes),
``digits`` (an ODE classifier's block on 64 digit images) and ``spiral`` (the cubic
oscillator fitted at 50 observation times). A user problem is ``path.py:factory`` where
``factory()`` returns a :class:`Setup` or a dict with its fields (``loss`` defaults to the
sum of squares of the final state, ``params`` to ``func``'s parameters).

Cost: function evaluations plus vector-Jacobian products, forward and backward. The
adjoint methods report their backward ``nfe`` and ``nvjp``; autograd through the solver
(``Direct``) evaluates no ``f`` backwards and runs one VJP per recorded forward evaluation.

Peak memory: the most bytes of tensor storage created during one forward + backward pass
and alive at the same time (on CUDA ``torch.cuda.max_memory_allocated``; on the CPU counted
by :class:`TensorMemory`, which sees every storage an operation creates and when it is
freed). It is measured in one extra run, apart from the timed ones, and is the same every
time for the same computation (unlike the process's resident set, which hides memory the
allocator reuses).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import inspect
import json
import math
import os
import statistics
import sys
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from . import CommandError
from .argtypes import positive_int

HELP = "compare every gradient method on a problem: gradient error, function evaluations, time, memory"
DESCRIPTION = """\
Run every gradient method of the registry (backsolve, direct, quadrature, ...) on one
problem at several tolerances, and print a table: the gradient's relative error against
a reference (analytic for the linear problems, else autograd through a float64 dopri8
solve at rtol 1e-11), forward and backward function evaluations, wall time and peak
memory. Saves results.json, results.csv and compare.png (error against cost, time and
memory; each point labelled with its tolerance, warned runs ringed in red) in --out
(default runs/compare/PROBLEM). The cost is function evaluations plus vector-Jacobian
products, forward and backward (autograd through the solver: one VJP per forward
evaluation); peak memory counts the tensor storage alive at once during one pass.

problems:
  linear       dy/dt = A y, state (4, 6), 10 output times on [0, 2]; analytic gradient
  contracting  dy/dt = A y with eigenvalues of A in [-8, -0.5], t in [0, 3]: the
               dynamics contract forwards, so backsolve's backward re-solve of y explodes
  digits       the ODE block of a digits classifier: 64 images -> y(0) (64, 16),
               MLP field 16-32-16, T = 1, cross-entropy of an affine read-out of y(T)
  spiral       the cubic-oscillator field MLP(y**3) 2-50-2 from y(0) = (2, 0), L1 loss
               against the true spiral at 50 observation times on [0, 10]
  latent       the decoder of the latent ODE of `torchadjoint train latent`: z0 (50, 6),
               MLP 6-32-6, loss at the 50 observation times of its time series
  PATH.py:NAME your own: NAME() returns a dict with func, y0, t and optionally loss(ys),
               params, reference() (see torchadjoint.commands.compare.Setup)"""
EPILOG = """\
examples:
  torchadjoint compare linear
  torchadjoint compare contracting --tolerances 1e-4,1e-6,1e-8
  torchadjoint compare digits --methods backsolve,quadrature --repeats 5 --out runs/cmp
  torchadjoint compare my_model.py:make_problem --dtype float32"""

BUILTIN = ("linear", "contracting", "digits", "spiral", "latent")
REFERENCE_OPTIONS = dict(method="dopri8", rtol=1e-11, atol=1e-13)


@dataclass
class Setup:
    """One problem: ``func(t, y)``, ``y0`` (any shape), ``t`` (N,), ``loss(ys) -> scalar``
    with ``ys`` (N, *y0.shape); ``params`` the tensors ``func`` depends on (gradients
    wanted); ``reference() -> tuple`` the exact ``(dL/dy0, *dL/dparams)`` when known."""

    func: Callable
    y0: torch.Tensor
    t: torch.Tensor
    loss: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda ys: ys[-1].pow(2).sum())
    params: Optional[List[torch.Tensor]] = None
    reference: Optional[Callable[[], Sequence[torch.Tensor]]] = None
    description: str = ""

    def __post_init__(self):
        # ``params=model.parameters()`` is a generator: kept as given it would be used up by
        # the reference gradient, and every method would then see no parameters.
        if self.params is not None:
            self.params = list(self.params)


# ----------------------------------------------------------------------------- problems


class LinearField(nn.Module):
    """``f(t, y) = y Aᵀ`` for ``y`` (batch, n)."""

    def __init__(self, A: torch.Tensor):
        super().__init__()
        self.A = nn.Parameter(A.clone())

    def forward(self, t, y):
        return y @ self.A.T


def _linear_setup(A: torch.Tensor, y0: torch.Tensor, t: torch.Tensor, w: torch.Tensor, description: str) -> Setup:
    func = LinearField(A)

    def loss(ys):
        return (ys * w.to(ys.dtype)).sum()

    def reference():
        A64 = func.A.detach().double().requires_grad_(True)
        x0 = y0.detach().double().requires_grad_(True)
        t64 = t.double()
        ys = torch.stack([x0 @ torch.linalg.matrix_exp(A64 * (ti - t64[0])).T for ti in t64])
        return torch.autograd.grad((ys * w.double()).sum(), (x0, A64))

    return Setup(func, y0, t, loss, [func.A], reference, description)


def linear_problem() -> Setup:
    g = torch.Generator().manual_seed(0)
    n = 6
    A = 0.4 * torch.randn(n, n, generator=g, dtype=torch.float64)
    y0 = torch.randn(4, n, generator=g, dtype=torch.float64)
    t = torch.linspace(0.0, 2.0, 10, dtype=torch.float64)
    w = torch.randn(10, 4, n, generator=g, dtype=torch.float64)
    return _linear_setup(A, y0, t, w, "dy/dt = A y, state (4, 6), 10 outputs on [0, 2], loss Σ w·y(t_i); analytic reference")


def contracting_problem() -> Setup:
    g = torch.Generator().manual_seed(1)
    n = 6
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    rates = torch.linspace(0.5, 8.0, n, dtype=torch.float64)
    A = -(Q * rates) @ Q.T
    y0 = torch.randn(4, n, generator=g, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    w = torch.randn(3, 4, n, generator=g, dtype=torch.float64)
    return _linear_setup(A, y0, t, w, "dy/dt = A y, eigenvalues of A in [-8, -0.5], t in [0, 3]; analytic reference")


class MLPField(nn.Module):
    """``f(t, y) = W2 tanh(W1 y + b1) + b2``; ``cubic`` feeds ``y**3`` instead of ``y``."""

    def __init__(self, dim: int, hidden: int, cubic: bool = False):
        super().__init__()
        self.cubic = cubic
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, dim))

    def forward(self, t, y):
        return self.net(y**3 if self.cubic else y)


def digits_problem() -> Setup:
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - depends on the installation
        raise CommandError('the digits problem needs scikit-learn: pip install -e ".[examples]"') from None
    images, labels = load_digits(return_X_y=True)
    torch.manual_seed(0)
    x = torch.as_tensor(images[:64], dtype=torch.float64) / 16.0
    y = torch.as_tensor(labels[:64])
    encoder = nn.Linear(64, 16).double()
    readout = nn.Linear(16, 10).double()
    func = MLPField(16, 32).double()
    with torch.no_grad():
        y0 = encoder(x)

    def loss(ys):
        return nn.functional.cross_entropy(readout.to(ys.dtype)(ys[-1]), y)

    return Setup(func, y0, torch.tensor([0.0, 1.0], dtype=torch.float64), loss, None, None,
                 "ODE block of a digits classifier: y(0) (64, 16), MLP 16-32-16, T = 1, cross-entropy")


def spiral_problem() -> Setup:
    from ..solve import solve

    A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=torch.float64)
    t = torch.linspace(0.0, 10.0, 50, dtype=torch.float64)
    y0 = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    with torch.no_grad():
        target = solve(lambda s, y: (y**3) @ A, y0, t, rtol=1e-10, atol=1e-12).ys
    torch.manual_seed(0)
    func = MLPField(2, 50, cubic=True).double()

    def loss(ys):
        return (ys - target.to(ys.dtype)).abs().mean()

    return Setup(func, y0, t, loss, None, None, "cubic-oscillator field MLP(y**3) 2-50-2, L1 loss at 50 times on [0, 10]")


def latent_problem() -> Setup:
    from ..training.tasks_latent import compare_problem

    return Setup(**compare_problem())


PROBLEMS: Dict[str, Callable[[], Setup]] = {
    "linear": linear_problem,
    "contracting": contracting_problem,
    "digits": digits_problem,
    "spiral": spiral_problem,
    "latent": latent_problem,
}


def load_problem(spec: str) -> Setup:
    """A built-in problem by name, or ``path.py:factory`` (a user's module)."""
    if spec in PROBLEMS:
        return PROBLEMS[spec]()
    if ":" not in spec:
        raise CommandError(f"unknown problem {spec!r}; choose from {', '.join(BUILTIN)} or give PATH.py:FACTORY")
    path, name = spec.rsplit(":", 1)
    factory = getattr(_import_file(path), name, None)
    if not callable(factory):
        raise CommandError(f"{path} has no callable {name!r}")
    return _made_by(factory, name, path)


def _import_file(path: str):
    """The user's module at ``path``, imported with its own folder on ``sys.path`` (for its
    sibling imports); what goes wrong is one line saying where, not our traceback."""
    if not os.path.isfile(path):
        raise CommandError(f"problem file {path!r} does not exist (expected PATH.py:FACTORY)")
    module_spec = importlib.util.spec_from_file_location(f"_torchadjoint_compare_{abs(hash(path))}", path)
    if module_spec is None or module_spec.loader is None:
        raise CommandError(f"cannot import {path!r} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # the user's file: one line saying where, not our traceback
        raise CommandError(f"importing {path} raised {type(exc).__name__}: {exc}") from None
    finally:
        sys.path.pop(0)
    return module


def _made_by(factory: Callable, name: str, path: str) -> Setup:
    """Call the user's ``factory()`` (named ``name`` in ``path``) and check what it returned:
    a :class:`Setup`, or a dict of its fields."""
    try:
        inspect.signature(factory).bind()
    except TypeError:
        raise CommandError(f"{name}{inspect.signature(factory)} in {path} must be callable with no arguments: it is called "
                           f"as {name}() and returns the problem") from None
    except ValueError:  # no signature to inspect (a builtin): just call it
        pass
    try:
        made = factory()
    except Exception as exc:
        raise CommandError(f"{name}() in {path} raised {type(exc).__name__}: {exc}") from None
    if isinstance(made, dict):
        unknown = sorted(set(made) - set(Setup.__dataclass_fields__))
        missing = [k for k in ("func", "y0", "t") if k not in made]
        if unknown or missing:
            raise CommandError(
                f"{name}() returned a dict with unknown keys {unknown} or missing keys {missing}; it needs func, y0, t "
                f"and may have loss, params, reference, description"
            )
        made = Setup(**made)
    if isinstance(made, Setup):
        return _checked(made, f"{name}() in {path}")
    raise CommandError(f"{name}() must return a dict (func, y0, t[, loss, params, reference]) or a Setup, got {type(made).__name__}")


def _checked(setup: Setup, where: str) -> Setup:
    """``setup`` if its state and times are what the measurements need, else a CommandError."""
    if not isinstance(setup.y0, torch.Tensor):
        raise CommandError(f"{where}: y0 must be one tensor (tuple and dict states are not supported by compare), "
                           f"got {type(setup.y0).__name__}")
    if not isinstance(setup.t, torch.Tensor) or setup.t.dim() != 1 or setup.t.numel() < 2:
        shape = tuple(setup.t.shape) if isinstance(setup.t, torch.Tensor) else type(setup.t).__name__
        raise CommandError(f"{where}: t must be a 1-D tensor of at least 2 output times, got {shape}; "
                           f"e.g. torch.linspace(0.0, 1.0, 10)")
    return setup


def problem_params(setup: Setup) -> List[torch.Tensor]:
    if setup.params is not None:
        return list(setup.params)
    return [p for p in setup.func.parameters() if p.requires_grad] if isinstance(setup.func, nn.Module) else []


def _working_copy(setup: Setup, cast: Callable) -> tuple:
    """``(func, params)`` to solve with, cast by ``cast`` (``lambda x: x.double()``, or a
    ``.to(dtype=..., device=...)``; it is applied to a module and to tensors alike): an
    ``nn.Module`` field is deep-copied and cast, so the user's stays as it was, and each
    of its parameters in ``problem_params`` is replaced by the copy's; a parameter that is
    not the module's becomes a cast, detached copy that requires grad."""
    params = problem_params(setup)
    if not isinstance(setup.func, nn.Module):
        return setup.func, params
    func = cast(copy.deepcopy(setup.func))
    index = {id(p): i for i, p in enumerate(setup.func.parameters())}
    copies = list(func.parameters())
    return func, [copies[index[id(p)]] if id(p) in index else cast(p.detach()).requires_grad_(True) for p in params]


# ----------------------------------------------------------------------------- measuring


class TensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storage created inside the ``with`` block and alive at once.

    Every operation's fresh outputs (not views, not in-place results) are counted when
    created and uncounted when their storage is freed (a finalizer on the storage, whose
    Python object lives exactly as long as the storage). Deterministic: the same
    computation reads the same. Slows each operation down: not for timed runs."""

    def __init__(self):
        super().__init__()
        self.live: Dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        results = out if isinstance(out, (tuple, list)) else (out,)
        for declared, result in zip(func._schema.returns, results):
            if declared.alias_info is None:  # a new tensor, not a view or an argument
                for x in (result if isinstance(result, (tuple, list)) else (result,)):
                    if isinstance(x, torch.Tensor):
                        self._created(x)
        return out

    def _created(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        self.live[key] = size = storage.nbytes()
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._freed, key)

    def _freed(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


class PeakMemory:
    """Peak memory (bytes) created over a ``with`` block: the CUDA allocator's peak, or
    :class:`TensorMemory` on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak: Optional[int] = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.counter = TensorMemory().__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.counter.__exit__(*exc)
            self.peak = self.counter.peak
        return False


def _flat(grads: Sequence[Optional[torch.Tensor]], like: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(torch.zeros_like(x) if g is None else g).detach().double().reshape(-1).cpu() for g, x in zip(grads, like)])


def reference_gradient(setup: Setup) -> torch.Tensor:
    """``(dL/dy0, dL/dθ)`` flat in float64: analytic if the problem has it, else Direct."""
    params = problem_params(setup)
    if setup.reference is not None:
        given = list(setup.reference())
        wanted = [setup.y0] + params
        if len(given) != len(wanted) or any(g is not None and g.numel() != x.numel() for g, x in zip(given, wanted)):
            raise CommandError(
                f"reference() returned {len(given)} gradient(s) of sizes {[None if g is None else g.numel() for g in given]}; "
                f"expected (dL/dy0, dL/dparam_1, ...) of sizes {[x.numel() for x in wanted]}")
        return _flat(given, wanted)
    from ..adjoint import Direct
    from ..solve import solve

    func, params64 = _working_copy(setup, lambda x: x.double())
    y0 = setup.y0.detach().double().requires_grad_(True)
    sol = solve(func, y0, setup.t.double(), gradient=Direct(), params=params64, **REFERENCE_OPTIONS)
    grads = torch.autograd.grad(setup.loss(sol.ys), [y0] + params64, allow_unused=True)
    return _flat(grads, [y0] + params64)


@dataclass
class Row:
    """One (method, tolerance) measurement. ``bwd_nfe``/``bwd_vjp``: the backward pass's
    evaluations of ``f`` and vector-Jacobian products (autograd through the solver: 0 and
    one per forward evaluation); ``wall_s`` the median over ``walls`` (one per repeat)."""

    method: str
    tol: float
    error: Optional[float] = None
    fwd_nfe: Optional[int] = None
    bwd_nfe: Optional[int] = None
    bwd_vjp: Optional[int] = None
    wall_s: Optional[float] = None
    peak_mb: Optional[float] = None
    note: str = ""
    walls: List[float] = field(default_factory=list)

    @property
    def cost(self) -> Optional[int]:
        """Function evaluations plus vector-Jacobian products, forward and backward."""
        if self.fwd_nfe is None:
            return None
        return self.fwd_nfe + (self.bwd_nfe or 0) + (self.bwd_vjp or 0)

    @property
    def warned(self) -> bool:
        """The run warned (e.g. a reconstruction it could not trust) or its gradient is not finite."""
        return "warned" in self.note or "non-finite" in self.note


def _backward_counts(stats: dict, gradient) -> tuple:
    """``(backward nfe, backward VJPs)`` of one pass."""
    backward, forward = stats.get("backward"), stats.get("forward") or {}
    if backward:
        return backward.get("nfe"), backward.get("nvjp")
    if gradient.records_graph and forward.get("nfe") is not None:
        # Autograd through the recorded steps: no f evaluation, one VJP per forward evaluation.
        return 0, forward["nfe"]
    return None, None


def measure(setup: Setup, name: str, tol: float, reference: torch.Tensor, *, dtype: torch.dtype, device: torch.device,
            solver: str = "dopri5", atol_ratio: float = 1e-2, repeats: int = 3) -> Row:
    """Solve forward and backward with gradient method ``name`` at ``rtol = tol``,
    ``atol = atol_ratio · tol``: ``repeats`` timed runs (median wall time), then one run
    that measures peak memory (apart: counting memory slows operations down)."""
    from ..adjoint import gradient_method
    from ..solve import solve

    func, params = _working_copy(setup, lambda x: x.to(dtype=dtype, device=device))
    t = setup.t.to(dtype=dtype, device=device)
    row = Row(name, tol)
    notes = set()

    def one_pass():
        y0 = setup.y0.detach().to(dtype=dtype, device=device).requires_grad_(True)
        gradient = gradient_method(name)
        sol = solve(func, y0, t, method=solver, gradient=gradient, params=params, rtol=tol, atol=atol_ratio * tol)
        grads = torch.autograd.grad(setup.loss(sol.ys), [y0] + params, allow_unused=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return y0, gradient, sol, grads

    for _ in range(repeats):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                start = time.perf_counter()
                y0, gradient, sol, grads = one_pass()
                row.walls.append(time.perf_counter() - start)
        except Exception as exc:  # a failing method is a result, not a crash of the comparison
            row.note = f"failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:80]}"
            return row
        notes.update(type(w.message).__name__ for w in caught if issubclass(w.category, UserWarning))
    peak, memory_note = _peak_memory(one_pass, device)
    g = _flat(grads, [y0] + params)
    row.error = float((g - reference).norm() / reference.norm().clamp_min(1e-300))
    if not math.isfinite(row.error):
        row.note = "non-finite gradient"
    row.fwd_nfe = (sol.stats.get("forward") or {}).get("nfe")
    row.bwd_nfe, row.bwd_vjp = _backward_counts(sol.stats, gradient)
    row.wall_s = statistics.median(row.walls)
    row.peak_mb = None if peak is None else peak / 2**20
    if notes:
        row.note = (row.note + " " if row.note else "") + "warned: " + ", ".join(sorted(notes))
    if memory_note:
        row.note = (row.note + " " if row.note else "") + memory_note
    return row


def _peak_memory(one_pass: Callable[[], object], device: torch.device) -> tuple:
    """``(peak bytes or None, note)`` of one more ``one_pass()`` (its warnings silenced:
    the timed runs reported them)."""
    memory = PeakMemory(device)
    try:
        with warnings.catch_warnings(), memory:
            warnings.simplefilter("ignore")
            one_pass()
    except Exception as exc:  # e.g. a function that cannot run under the counting mode
        return None, f"memory not measured ({type(exc).__name__})"
    return memory.peak, ""


def compare(setup: Setup, methods: Optional[Sequence[str]] = None, tolerances: Sequence[float] = (1e-3, 1e-5, 1e-7), *,
            dtype: torch.dtype = torch.float64, device="cpu", solver: str = "dopri5", atol_ratio: float = 1e-2,
            repeats: int = 3, progress: Optional[Callable[[Row], None]] = None) -> List[Row]:
    """Every method (default: all of ``GRADIENT_METHODS``) at every tolerance: a list of :class:`Row`."""
    from ..adjoint import GRADIENT_METHODS

    names = sorted(GRADIENT_METHODS) if methods is None else list(methods)
    unknown = [m for m in names if m not in GRADIENT_METHODS]
    if unknown:
        raise CommandError(f"unknown gradient method(s) {unknown}; choose from {sorted(GRADIENT_METHODS)}")
    device = torch.device(device)
    try:
        reference = reference_gradient(setup)
    except CommandError:
        raise
    except Exception as exc:  # the user's func, y0 or loss: one line saying what failed, not a traceback
        raise CommandError(
            f"the reference gradient could not be computed ({type(exc).__name__}: "
            f"{(str(exc).splitlines() or [''])[0][:200]}); check that func(t, y0) runs, returns y0's shape, and that "
            f"loss(ys) returns a scalar") from None
    # One discarded run first: the first solve of a process pays for lazy initialisation.
    measure(setup, names[0], max(tolerances), reference, dtype=dtype, device=device, solver=solver, atol_ratio=atol_ratio,
            repeats=1)
    rows = []
    for tol in tolerances:
        for name in names:
            row = measure(setup, name, tol, reference, dtype=dtype, device=device, solver=solver,
                          atol_ratio=atol_ratio, repeats=repeats)
            rows.append(row)
            if progress is not None:
                progress(row)
    return rows


def summary(rows: Sequence[Row]) -> List[str]:
    """Per tolerance, one line: the cheapest, the least memory, and the most accurate of
    the runs that neither failed nor warned, and which did."""
    lines = []
    for tol in dict.fromkeys(r.tol for r in rows):
        at = [r for r in rows if r.tol == tol]
        good = [r for r in at if r.error is not None and not r.warned and not r.note.startswith("failed")]
        parts = [f"tol {tol:g}:"]
        if good:
            cheapest = min(good, key=lambda r: r.cost if r.cost is not None else math.inf)
            accurate = min(good, key=lambda r: r.error)
            parts.append(f"fewest evaluations {cheapest.method} ({cheapest.cost});")
            with_memory = [r for r in good if r.peak_mb is not None]
            if with_memory:
                small = min(with_memory, key=lambda r: r.peak_mb)
                parts.append(f"least memory {small.method} ({small.peak_mb:.3g} MB);")
            parts.append(f"most accurate {accurate.method} ({accurate.error:.2g})")
        else:
            parts.append("no method ran without a warning")
        bad = [r.method for r in at if r not in good]
        if bad:
            parts.append(f"; not to be trusted here: {', '.join(bad)} (see note)")
        lines.append(" ".join(parts).replace(" ;", ";"))
    return lines


# ----------------------------------------------------------------------------- output

COLUMNS = ("method", "tol", "grad rel. error", "fwd nfe", "bwd nfe", "bwd VJPs", "cost", "wall s", "peak MB", "note")


def _cell(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


def table(rows: Sequence[Row]) -> str:
    """The rows as an aligned text table (cost: f evaluations + VJPs, forward and backward;
    wall s: the median over the repeats)."""
    cells = [[r.method, r.tol, r.error, r.fwd_nfe, r.bwd_nfe, r.bwd_vjp, r.cost, r.wall_s, r.peak_mb, r.note] for r in rows]
    text = [[_cell(c) for c in row] for row in cells]
    widths = [max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(COLUMNS)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(COLUMNS, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in text]
    return "\n".join(lines)


PANELS = (
    ("cost", "f evaluations + VJPs (forward + backward)"),
    ("wall_s", "wall time (s), forward + backward (median)"),
    ("peak_mb", "peak memory (MB) of one forward + backward"),
)


def plot(rows: Sequence[Row], path: str, title: str) -> str:
    """Gradient error against cost, wall time and peak memory (log-log), one line per
    method over the tolerances, each point labelled with its tolerance and warned runs
    ringed in red: a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(16, 4.8))
    any_warned = False
    for name in dict.fromkeys(r.method for r in rows):
        ok = [r for r in rows if r.method == name and r.error is not None and math.isfinite(r.error)]
        for ax, (key, _) in zip(axes, PANELS):
            points = [(getattr(r, key), max(r.error, 1e-17), r) for r in ok if getattr(r, key) is not None]
            if not points:
                continue
            (line,) = ax.plot([x for x, _, _ in points], [y for _, y, _ in points], marker="o", label=name)
            for x, y, r in points:
                ax.annotate(f"{r.tol:g}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6,
                            color=line.get_color())
                if r.warned:
                    any_warned = True
                    ax.plot([x], [y], marker="o", ms=13, mfc="none", mec="red", mew=1.5, ls="none")
    for ax, (_, xlabel) in zip(axes, PANELS):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("relative gradient error")
        ax.grid(True, which="both", alpha=0.3)
    if any_warned:
        axes[0].plot([], [], marker="o", ms=10, mfc="none", mec="red", ls="none", label="warned: not to be trusted")
    axes[0].legend(fontsize=8, title="method (labels: rtol)", title_fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save(rows: Sequence[Row], folder: str, meta: dict) -> List[str]:
    """``results.json`` (everything, each repeat's wall time included) and ``results.csv``."""
    os.makedirs(folder, exist_ok=True)
    records = [dict(r.__dict__, cost=r.cost, warned=r.warned) for r in rows]
    json_path = os.path.join(folder, "results.json")
    with open(json_path, "w") as fh:
        json.dump(dict(meta, rows=records), fh, indent=1)
    csv_path = os.path.join(folder, "results.csv")
    keys = [k for k in (list(records[0]) if records else list(Row.__dataclass_fields__)) if k != "walls"]
    with open(csv_path, "w") as fh:
        fh.write(",".join(keys) + "\n")
        for rec in records:
            fh.write(",".join("" if rec[k] is None else json.dumps(rec[k]) if isinstance(rec[k], str) else str(rec[k])
                              for k in keys) + "\n")
    return [json_path, csv_path]


def default_folder(problem: str) -> str:
    """``runs/compare/PROBLEM`` (``FILE-FACTORY`` for ``path/FILE.py:FACTORY``): one folder per problem."""
    if ":" in problem and problem not in PROBLEMS:
        path, name = problem.rsplit(":", 1)
        problem = f"{os.path.splitext(os.path.basename(path))[0]}-{name}"
    return os.path.join("runs", "compare", problem)


# ----------------------------------------------------------------------------- command line


def _tolerances(text: str) -> List[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 1e-3,1e-5, got {text!r}") from None
    if not values or not all(0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"tolerances must be numbers in (0, 1), got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("problem", nargs="?", default="linear",
                        help=f"{', '.join(BUILTIN)} (default linear), or PATH.py:FACTORY")
    parser.add_argument("--methods", default="all",
                        help="comma-separated gradient methods (default: all in the registry)")
    parser.add_argument("--tolerances", type=_tolerances, default=[1e-3, 1e-5, 1e-7],
                        help="comma-separated rtol values (default 1e-3,1e-5,1e-7); atol = --atol-ratio x rtol")
    parser.add_argument("--atol-ratio", type=float, default=1e-2, help="atol / rtol (default 1e-2)")
    parser.add_argument("--solver", default="dopri5", help="the Runge-Kutta method (default dopri5)")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                        help="dtype of the runs (default float64; the reference is always float64)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="timed runs per measurement; the table shows the median wall time (default 3)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 gives steadier times on a busy machine)")
    parser.add_argument("--out", default=None,
                        help="folder for results.json, results.csv and compare.png (default runs/compare/PROBLEM)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")


def run(args: argparse.Namespace) -> int:
    from ..adjoint import GRADIENT_METHODS
    from ..tableaux import METHODS

    if args.solver not in METHODS or not METHODS[args.solver].adaptive:
        adaptive = sorted(k for k, v in METHODS.items() if v.adaptive)
        raise CommandError(f"--solver must be an adaptive method (tolerances are swept), one of {adaptive}; got {args.solver!r}")
    if not (args.atol_ratio > 0 and math.isfinite(args.atol_ratio)):
        raise CommandError(f"--atol-ratio must be a positive number, got {args.atol_ratio}")
    methods = None if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    if methods is not None:
        unknown = [m for m in methods if m not in GRADIENT_METHODS]
        if unknown or not methods:
            raise CommandError(f"--methods: unknown gradient method(s) {unknown}; choose from {sorted(GRADIENT_METHODS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CommandError("--device cuda was asked for but CUDA is not available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = args.out or default_folder(args.problem)
    if os.path.exists(out) and not os.path.isdir(out):
        raise CommandError(f"--out {out!r} is a file, not a folder")
    setup = load_problem(args.problem)
    print(f"problem: {args.problem}: {setup.description or 'user problem'}")
    print(f"solver {args.solver}, dtype {args.dtype}, device {args.device}, atol = {args.atol_ratio:g} x rtol, "
          f"{torch.get_num_threads()} thread(s)")
    rows = compare(setup, methods, args.tolerances, dtype=getattr(torch, args.dtype), device=args.device,
                   solver=args.solver, atol_ratio=args.atol_ratio, repeats=args.repeats,
                   progress=lambda r: print(f"  {r.method} at tol {r.tol:g}: error {_cell(r.error)} {r.note}", flush=True))
    print()
    print(table(rows))
    print(f"\ncost: f evaluations + VJPs; wall s: median of {args.repeats}; peak MB: tensor memory of one pass")
    print("\n".join(summary(rows)))
    meta = dict(problem=args.problem, description=setup.description, solver=args.solver, dtype=args.dtype,
                device=args.device, atol_ratio=args.atol_ratio, repeats=args.repeats, threads=torch.get_num_threads())
    try:
        paths = save(rows, out, meta)
    except OSError as exc:
        raise CommandError(f"--out {out!r}: cannot write the results ({exc.strerror})") from None
    if not args.no_plot:
        paths.append(plot(rows, os.path.join(out, "compare.png"),
                          f"{args.problem} ({args.solver}, {args.dtype}): gradient error against cost, time and memory"))
    print("\nwrote " + ", ".join(paths))
    return 0
