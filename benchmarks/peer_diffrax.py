"""diffrax (JAX, JIT-compiled) as a peer on problems 1 and 2 of bench_peers.

The same problem as the PyTorch libraries solve: the weights of the torch module copied
into JAX arrays (same order, same float32 values), the same initial state, output times,
tolerances, method (``diffrax.Dopri5``, automatic first step, integral controller
``PIDController(rtol, atol)``, RMS error norm over all entries as ours) and loss.
Gradients are taken with respect to the field's parameters, as every other row does.

Two gradient methods: ``diffrax / BacksolveAdjoint`` (continuous adjoint, paired with our
Backsolve) and ``diffrax / RecursiveCheckpointAdjoint`` (diffrax's default: autograd through
the solver with recursive checkpointing, paired with our Direct). :meth:`DiffraxProblem.tightened`
adds BacksolveAdjoints whose backward solve runs at tighter tolerances (diffrax's own option,
``BacksolveAdjoint(stepsize_controller=...)``), to compare at equal gradient error.

Counting, honestly: the timed functions are compiled without any instrumentation. Function
evaluations are counted once per problem by separately compiled twins whose vector field
calls ``jax.debug.callback`` on every execution: forward nfe is what a forward solve calls,
backward nfe what a forward + backward call makes beyond that (for RecursiveCheckpointAdjoint
these are the recomputations its checkpointing makes; every backward evaluation of diffrax's
adjoint is one evaluation of f inside one VJP, so its backward VJPs equal its backward nfe).
Compile time (``jax.jit(...).lower(...).compile()``) is reported apart from run time.

JAX is an optional peer (``pip install jax diffrax``, the ``bench`` extra): without it
:data:`AVAILABLE` is False and :data:`MISSING` says why; nothing here raises on import, and
JAX is imported only when a diffrax problem is built (:func:`load`).
XLA is asked for one CPU thread (``XLA_FLAGS``, set before JAX is imported, unless the
caller set its own), as the PyTorch libraries are run with one thread.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

# Found without importing: importing JAX takes seconds, and bench_peers (and the tests that
# import it) should pay for it only when diffrax is actually run.
MISSING: Optional[str] = None
if importlib.util.find_spec("jax") is None or importlib.util.find_spec("diffrax") is None:
    MISSING = "diffrax not measured: jax or diffrax is not installed (pip install jax diffrax)"
AVAILABLE = MISSING is None
jax = jnp = diffrax = None  # set by load()


def load() -> None:
    """Import JAX and diffrax (once), with one XLA CPU thread unless the caller chose."""
    global jax, jnp, diffrax
    if diffrax is not None:
        return
    if "jax" not in sys.modules:  # threads are fixed when XLA's CPU client starts
        os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax as jax_module
    import jax.numpy as jnp_module
    import diffrax as diffrax_module

    jax, jnp, diffrax = jax_module, jnp_module, diffrax_module


ADJOINT = "diffrax / BacksolveAdjoint"
AUTOGRAD = "diffrax / RecursiveCheckpointAdjoint"
NAMES = (ADJOINT, AUTOGRAD)


def torch_layers(func: torch.nn.Module) -> List[tuple]:
    """``func.net`` (an ``nn.Sequential`` of Linear and Tanh) as ``[("linear", W, b) | ("tanh",)]``
    with float32 NumPy copies of the weights, in ``func.parameters()`` order."""
    layers = []
    for layer in func.net:
        if isinstance(layer, torch.nn.Linear):
            layers.append(("linear", layer.weight.detach().cpu().numpy(), layer.bias.detach().cpu().numpy()))
        elif isinstance(layer, torch.nn.Tanh):
            layers.append(("tanh",))
        else:
            raise TypeError(f"the diffrax peer copies Linear and Tanh layers only, not {type(layer).__name__}")
    return layers


def jax_field(func: torch.nn.Module, cubic: bool):
    """``(field(t, y, params) -> dy, params)``: the torch module's network in JAX, with its
    parameters as a list ``[W1, b1, W2, b2, ...]`` (torch's layout: ``y @ W.T + b``).
    ``cubic`` applies the demo problem's ``y**3`` before the network."""
    layers = torch_layers(func)
    params = [jnp.asarray(a) for layer in layers if layer[0] == "linear" for a in layer[1:]]
    kinds = [layer[0] for layer in layers]

    def field(t, y, params):
        x = y ** 3 if cubic else y
        i = 0
        for kind in kinds:
            if kind == "linear":
                x = x @ params[i].T + params[i + 1]
                i += 2
            else:
                x = jnp.tanh(x)
        return x

    return field, params


class Counter:
    """Host-side count of the vector field's executions (``jax.debug.callback`` target)."""

    def __init__(self):
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


class DiffraxProblem:
    """One problem solved with diffrax: compiled forward and forward + backward functions,
    their compile times, and the evaluation counts of each gradient method.

    Args:
        spec: a bench_peers problem (``func``, ``y0``, ``t``, ``rtol``, ``atol``).
        loss: ``"all"`` (mean of squares over every output) or ``"last"`` (over the last).
        cubic: the demo problem's ``y**3`` before the network.
        max_steps: diffrax's step bound (RecursiveCheckpointAdjoint needs a finite one).
    """

    def __init__(self, spec: dict, loss: str, cubic: bool, max_steps: int = 4096):
        load()
        self.rtol, self.atol, self.max_steps = spec["rtol"], spec["atol"], max_steps
        self.field, self.params = jax_field(spec["func"], cubic)
        self.y0 = jnp.asarray(spec["y0"].detach().cpu().numpy())
        self.ts = jnp.asarray(spec["t"].detach().cpu().numpy())
        self.loss_kind = loss
        self.compile_s: Dict[str, float] = {}
        self._compiled: Dict[str, Callable] = {}
        self._forward_nfe: Optional[int] = None
        self.counts: Dict[str, dict] = {}
        self._tightened: Dict[str, float] = {}  # name -> factor on the backward rtol and atol

    def compiled(self, label: str) -> Callable:
        """The compiled forward solve (``"forward"``) or forward + backward (a name in
        :data:`NAMES`), compiled on first use; its compile time goes to ``compile_s``."""
        if label not in self._compiled:
            fn = self._forward_fn(None) if label == "forward" else self._grad_fn(label, None)
            start = time.perf_counter()
            self._compiled[label] = jax.jit(fn).lower(self.params).compile()
            self.compile_s[label] = time.perf_counter() - start
        return self._compiled[label]

    # ---------------------------------------------------------------- building blocks
    def _solve(self, params, adjoint, counter: Optional[Counter]):
        field = self.field
        if counter is not None:
            def field(t, y, params, inner=self.field):  # noqa: E306 - same field, counted
                jax.debug.callback(counter)
                return inner(t, y, params)
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field), diffrax.Dopri5(), self.ts[0], self.ts[-1], None, self.y0, args=params,
            saveat=diffrax.SaveAt(ts=self.ts), stepsize_controller=diffrax.PIDController(rtol=self.rtol, atol=self.atol),
            adjoint=adjoint, max_steps=self.max_steps,
        )
        return sol.ys

    def _loss(self, ys):
        return jnp.mean(ys ** 2) if self.loss_kind == "all" else jnp.mean(ys[-1] ** 2)

    def tightened(self, factor: float) -> str:
        """The name of BacksolveAdjoint with its backward solve at ``factor`` times the
        forward's rtol and atol (the forward unchanged), usable wherever a name in
        :data:`NAMES` is."""
        name = f"{ADJOINT}, backward rtol and atol × {factor:g}"
        self._tightened[name] = factor
        return name

    def _adjoint(self, name: str):
        if name in self._tightened:
            factor = self._tightened[name]
            return diffrax.BacksolveAdjoint(stepsize_controller=diffrax.PIDController(
                rtol=self.rtol * factor, atol=self.atol * factor))
        return diffrax.BacksolveAdjoint() if name == ADJOINT else diffrax.RecursiveCheckpointAdjoint()

    def _forward_fn(self, counter: Optional[Counter]) -> Callable:
        return lambda params: self._solve(params, diffrax.RecursiveCheckpointAdjoint(), counter)

    def _grad_fn(self, name: str, counter: Optional[Counter]) -> Callable:
        adjoint = self._adjoint(name)
        return jax.value_and_grad(lambda params: self._loss(self._solve(params, adjoint, counter)))

    # ---------------------------------------------------------------- measurements
    def forward_nfe(self) -> int:
        """Evaluations of f in one forward solve, counted by an instrumented twin (run once)."""
        if self._forward_nfe is None:
            counter = Counter()
            jax.block_until_ready(jax.jit(self._forward_fn(counter))(self.params))
            jax.effects_barrier()  # every callback has run
            self._forward_nfe = counter.calls
        return self._forward_nfe

    def count(self, name: str) -> dict:
        """Evaluations of f by ``name``: forward (one solve) and backward (a forward +
        backward call minus the forward), from instrumented twins run once."""
        if name not in self.counts:
            fwd_nfe, counter = self.forward_nfe(), Counter()
            jax.block_until_ready(jax.jit(self._grad_fn(name, counter))(self.params))
            jax.effects_barrier()
            bwd_nfe = counter.calls - fwd_nfe
            self.counts[name] = dict(fwd_nfe=fwd_nfe, bwd_nfe=bwd_nfe,
                                     bwd_vjp=bwd_nfe if name.startswith(ADJOINT) else None)
        return self.counts[name]

    def gradient(self, name: str) -> torch.Tensor:
        """The parameter gradient ``name`` computes (its timed function, compiled here if not
        yet; no counting twin), as in :meth:`measure`."""
        _, grads = jax.block_until_ready(self.compiled(name)(self.params))
        return _as_torch(grads)

    def measure(self, name: str) -> Callable[[], dict]:
        """A closure timing one forward solve and one forward + backward call of ``name``;
        returns bench_peers.measure's keys (the gradient in ``func.parameters()`` order)."""
        counts = self.count(name)
        forward, grad_fn = self.compiled("forward"), self.compiled(name)

        def once() -> dict:
            start = time.perf_counter()
            jax.block_until_ready(forward(self.params))
            forward_s = time.perf_counter() - start
            start = time.perf_counter()
            _, grads = jax.block_until_ready(grad_fn(self.params))
            total_s = time.perf_counter() - start
            return dict(counts, fwd_s=forward_s, total_s=total_s, grad=_as_torch(grads),
                        compile_s=self.compile_s["forward"] + self.compile_s[name])

        return once


def _as_torch(grads) -> torch.Tensor:
    """JAX's gradient (a list of arrays, in ``func.parameters()`` order) as one float64 torch vector."""
    return torch.cat([torch.from_numpy(jax.device_get(g).copy()).reshape(-1) for g in grads]).double()


def make_problem(spec: dict, key: str, device) -> Optional[DiffraxProblem]:
    """The diffrax twin of bench_peers' problem ``key``; None when diffrax is not installed or
    the device is not the CPU (the JAX installed by the bench extra is CPU-only)."""
    global AVAILABLE, MISSING
    if not AVAILABLE or torch.device(device).type != "cpu":
        return None
    try:
        load()
    except ImportError as exc:  # found but broken: skipped, and said so, like a missing peer
        AVAILABLE, MISSING = False, f"diffrax not measured: {exc} (pip install jax diffrax)"
        return None
    return DiffraxProblem(spec, loss="all" if key == "demo" else "last", cubic=key == "demo")


def make_runs(spec: dict, key: str, device) -> Dict[str, Callable[[], dict]]:
    """name -> measurement closure for bench_peers' alternation (see :func:`make_problem`;
    empty where it is None)."""
    problem = make_problem(spec, key, device)
    return {} if problem is None else {name: problem.measure(name) for name in NAMES}


def skip_note(device) -> Optional[str]:
    """Why diffrax has no rows in this run, or None when it has."""
    if not AVAILABLE:
        return MISSING
    if torch.device(device).type != "cpu":
        return "diffrax not measured on this device: the bench extra installs JAX for the CPU only"
    return None
