"""The compiled path: a whole Runge–Kutta step, and the adjoint's ``f`` with its VJP, as
``torch.compile`` graphs (``solve(..., compile=True)``).

Why: in eager mode every tensor operation costs microseconds of dispatch however small the
state, and a step runs dozens of them (stage inputs, the error estimate and norm, ``f``'s own
layers); on small problems that, not arithmetic, is the cost. Compiled, a step is one call.

What is compiled:

- **Forward** (:class:`CompiledStepper`): one explicit RK step with ``f`` inside — every stage
  evaluation, stage combination, ``y1``, the embedded error estimate and, for the built-in
  RMS norm and seminorm, the error ratio — one graph per step. The accept/reject loop, the
  step-size controller and dense output stay on the host (:mod:`~torchadjoint.integrate`),
  except where the whole loop runs in graphs (:mod:`~torchadjoint.compiled_loop`, which builds
  on this step program). Under grad mode (``Direct``) the same graph records through
  AOTAutograd (except for compiled Direct's own path, :mod:`~torchadjoint.adjoint.direct_compiled`).
- **Backward** (:class:`CompiledVJP`): one evaluation of the augmented adjoint dynamics,
  ``(f(t, y), -a·∂f/∂y, -a·∂f/∂θ)`` by ``torch.func.vjp`` over ``functional_call``, one graph
  per evaluation (``torch.autograd.grad`` would break the graph), for Checkpointed (``y`` read
  along the trajectory) and Backsolve's first evaluations (its start, after a jump);
  explicit backward methods.
- **Backward steps** (:class:`CompiledAdjointStepper`): Backsolve's whole backward step
  (``y`` re-solved in the state), the forward's step program with the augmented dynamics as
  its field; the parameter parts of the stages come out of the graph for the host's
  :class:`~torchadjoint.adjoint.vjp.StageAccumulator` under the seminorm.

On the CPU the default mode compiles with inductor's C++ wrapper (see :func:`_options`).

Times and the step size enter as tensors (one (3,) float64 tensor per step), so a new step size
does not recompile; ``f`` enters as an argument, so the graphs are specialised on its class and
structure, not kept alive by it. Evaluations are counted on the host: a compiled step of ``s``
stages counts its ``s - 1`` new ones (``f0`` is known), exactly as the eager step does.

Compiled programs are cached per (kind, method, field, state structure, dtype, norm, mode), at
most :data:`CACHE_SIZE` of them, least recently used first out; each has its own code object, so
dynamo's per-code recompile budget (one compile per shape, dtype, device and grad mode) is per
program, not shared by all. Where compiling is unavailable or fails (``f`` not traceable,
no C++ compiler, ...), the solve runs eagerly after ONE :class:`CompileWarning` for that ``f``
(its other programs are then not tried).
``stats`` reports ``compiled`` (whether the graphs ran), ``compile_seconds`` (wall time of
the calls that compiled) and ``graphs_compiled``.
"""
from __future__ import annotations

import collections
import itertools
import math
import time
import types
import warnings
from typing import Callable, Optional, Sequence, Tuple

import torch

try:
    # Dynamo's cache entries for a code object, most recently used first: C++ objects valid only until
    # dynamo's caches change (torch._dynamo.reset() frees them), so never kept across calls. Its C half:
    # importing it loads none of dynamo's Python.
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list as _cache_entries
except ImportError:  # another torch: every call goes through dynamo's hook
    _cache_entries = None

from .controller import PIController
from .errors import user_stacklevel
from .pytree import concat_leaves
from .step import StepResult, rk_step
from .tableaux.base import ButcherTableau

#: ``torch.compile`` modes accepted by ``compile=`` (True means "default"). On a GPU,
#: "reduce-overhead" replays the step as a CUDA graph.
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CACHE_SIZE = 32


class CompileWarning(UserWarning):
    """The compiled path could not be used; the solve ran eagerly (the message says why)."""


def compile_setting(value) -> Optional[str]:
    """``compile=`` as given to ``solve``: False/None (eager), True ("default") or a mode name.
    Returns the mode, or None for eager. Raises ValueError/TypeError naming the argument."""
    if value is None or value is False:
        return None
    if value is True:
        return "default"
    if isinstance(value, str):
        if value not in MODES:
            raise ValueError(f"compile={value!r} is not a torch.compile mode; use True, False or one of {list(MODES)}")
        return value
    raise TypeError(f"compile must be True, False or a torch.compile mode name (str), got {type(value).__name__}")


# ---------------------------------------------------------------------------------------------
# The program cache


class _Program:
    """One compiled program: ``fn`` the torch.compile'd function, ``eager`` the same function
    uncompiled; ``failed`` the reason compiling failed (then it is never retried).

    Calls go through :meth:`call`. Dynamo compiles (through its frame hook, as for any
    torch.compile'd function), but once a graph is compiled the program calls it itself: it
    checks the graph's guards (dynamo's own, less those on the program's constants: see
    :func:`_skip_closure_guards`; 1.5-5 µs in a hot loop, 13-50 µs between the solver's steps,
    whose kernels evict the caches) and runs the code dynamo generated for them, skipping the
    hook's Python wrappers, which cost about 27 µs per call (a step of benchmark problem 1: 77 ->
    50 µs, its kernels 44 µs). A call no graph's guards admit goes through the hook, which
    compiles (or finds) the graph for it. Global module hooks, which dynamo does not guard on,
    are checked apart (:func:`_global_module_hooks`).

    Dynamo's cache entries are read afresh at every call, never kept from one call to the next:
    they are C++ objects that ``torch._dynamo.reset()`` frees, and checking a kept one's guards
    after a reset read freed memory (a segfault, or the old graphs ran on, or a TypeError turned
    compiling off). Reading them costs about 0.5 µs; only the functions running their code are kept."""

    def __init__(self, build: Callable[[], Callable], mode: str, warn_key: tuple, device: torch.device):
        self.eager = build()
        self.failed: Optional[str] = None
        self.warn_key = warn_key
        traced = _own_code(self.eager)
        code = self._code = traced.__code__
        self._arg_names = code.co_varnames[: code.co_argcount]
        # The frame the guards read: the arguments and the closure's variables (fixed).
        self._closure = {name: cell.cell_contents for name, cell in zip(code.co_freevars, traced.__closure__ or ())}
        self._globals, self._cells, self._defaults = traced.__globals__, traced.__closure__, traced.__defaults__
        options = _options(mode, device, _skip_closure_guards(set(self._closure)))
        self._hooks: Optional[tuple] = None  # the global module hooks when the first graph compiled
        self._global_names: set = set()  # the globals dynamo added for this program's graphs
        # id of a code dynamo generated -> a function running it (the entries are dynamo's); None: use
        # the hook. Always the hook under CUDA graphs: their trees tell one call from the next by
        # what dynamo's wrapper does per call (untested here, without a GPU: the hook is torch's own path).
        self._graphs: Optional[dict] = None if options.get("triton.cudagraphs") else {}
        try:
            self.fn = torch.compile(traced, fullgraph=True, dynamic=False, options=options)
        except Exception as error:  # torch.compile itself unavailable (e.g. an unsupported Python)
            self.fn, self.failed = None, f"{type(error).__name__}: {error}"

    def call(self, *args) -> Tuple[object, int]:
        """``fn(*args)`` and the number of graphs compiled for the call. Raises what compiling
        raised, and GlobalModuleHooksChanged (see :func:`_global_module_hooks`)."""
        hooks = _global_module_hooks()
        if hooks != self._hooks:
            if self._hooks is not None:
                raise GlobalModuleHooksChanged(
                    "a global module hook (torch.nn.modules.module.register_module_forward_hook or its kin) was "
                    "registered or removed after this program's graphs compiled; dynamo does not guard on them, so "
                    "the graphs would run as if nothing had changed")
            self._hooks = hooks
        frame = dict(self._closure)
        frame.update(zip(self._arg_names, args))
        graphs = self._graphs
        if graphs:  # dynamo's entries as they are now (an invalidated one's guards fail, its code is None)
            for entry in _cache_entries(self._code):
                if entry.guard_manager.check(frame):
                    code = entry.code
                    run = graphs.get(id(code))  # by id: hashing a code object hashes its bytecode (µs)
                    if run is not None and run.__code__ is code:
                        return run(*args), 0
                    break  # compiled outside this method: the hook runs it
        before, names = _graphs_compiled(), set(self._globals)
        # Dynamo guards on module hooks only when told to: otherwise a hook registered on f (or
        # removed) after compiling is silently ignored and the old graph runs on. (Global module
        # hooks it never guards on: checked above.)
        # Set and restored by hand: config.patch costs 17 µs, this 4 (where every call takes the hook).
        config = torch._dynamo.config
        skipped = config.skip_nnmodule_hook_guards
        config.skip_nnmodule_hook_guards = False
        held = _module_tensors(args)
        try:
            out = self.fn(*args)
        except BaseException:
            _put_back(held)
            raise
        finally:
            config.skip_nnmodule_hook_guards = skipped
        if graphs is not None:
            self._graphs = self._dynamo_graphs()
        # Dynamo keeps each compiled graph in the globals of the code it traced (this module's):
        # noted, to be let go with the program (see release).
        self._global_names.update(name for name in self._globals.keys() - names if name.startswith("__compiled_fn"))
        return out, _graphs_compiled() - before

    def release(self) -> None:
        """Let go of the graphs dynamo compiled for this program, which it keeps in this module's
        globals: they held the program's code alive, so dynamo's own clean-up (which deletes
        them when that code dies) never ran, and memory grew with every program ever built (one
        per state shape, say). Emptied here, not deleted: dynamo's clean-up then deletes them.
        Called when the program leaves the cache."""
        for name in self._global_names:
            if name in self._globals:
                self._globals[name] = None
        self._global_names.clear()

    def _dynamo_graphs(self) -> Optional[dict]:
        """A function running the code of each of dynamo's cache entries for this program, by the
        code's id (each function holds its code, so no id is reused while it is a key); None where
        the entries cannot be read or called directly (another torch): then every call goes
        through dynamo's hook."""
        try:
            if _cache_entries is None:
                raise ImportError("torch._C._dynamo.eval_frame._debug_get_cache_entry_list")
            kept, entries = self._graphs or {}, _cache_entries(self._code)
            for entry in entries:
                entry.guard_manager.check  # noqa: B018  (an older torch's entries have none: the hook then)
            return {id(entry.code): kept.get(id(entry.code)) or
                    types.FunctionType(entry.code, self._globals, self._code.co_name, self._defaults, self._cells)
                    for entry in entries if entry.code is not None}
        except (ImportError, AttributeError, TypeError, ValueError):
            return None


def _module_tensors(args: tuple) -> list:
    """``(module, its parameters, its buffers)`` for every module among ``args`` and their
    submodules, as dicts of the tensors they hold now (see :func:`_put_back`)."""
    return [(m, dict(m._parameters), dict(m._buffers)) for arg in args if isinstance(arg, torch.nn.Module)
            for m in arg.modules()]


def _put_back(held: list) -> None:
    """Give each module the parameters and buffers :func:`_module_tensors` saw, after a compile
    that failed: whatever the traced code had swapped into the module when it failed (a
    ``functional_call`` not undone), the module keeps its own Parameters. (A module left
    holding other tensors is silently wrong: an optimizer built on ``f.parameters()`` no longer
    trains what ``f`` computes with. The case that did this, a shared submodule, is avoided at
    its source: see :func:`tensor_paths`.)"""
    for module, parameters, buffers in held:
        for now, before in ((module._parameters, parameters), (module._buffers, buffers)):
            now.clear()
            now.update(before)


class GlobalModuleHooksChanged(RuntimeError):
    """The global module hooks changed after a program compiled (the program runs eagerly)."""


def _global_module_hooks() -> tuple:
    """The handles of torch's global module hooks (``register_module_forward_hook`` and its kin).
    Dynamo guards on a module's own hooks (when told to) but not on these: a graph compiled
    before one was registered runs without it, silently. A program notes them when it first
    compiles and refuses to run its graphs once they changed (about 1 µs per call)."""
    module = torch.nn.modules.module
    return tuple(tuple(hooks) for hooks in (
        module._global_forward_pre_hooks, module._global_forward_hooks, module._global_backward_pre_hooks,
        module._global_backward_hooks, module._global_forward_hooks_with_kwargs))


_PROGRAMS: "collections.OrderedDict[tuple, _Program]" = collections.OrderedDict()
_SERIAL = itertools.count()


def _options(mode: str, device: torch.device, guard_filter: Callable) -> dict:
    """``torch.compile``'s options for a program on ``device`` under ``mode`` (the mode's own
    options, from inductor's table), with ``guard_filter`` (see :func:`_skip_closure_guards`).

    On the CPU the default mode gets inductor's C++ wrapper: the code that calls a graph's
    kernels and allocates its buffers is then C++, not Python. Our graphs are small (one
    step of a small network is dozens of kernels of microseconds each), so that wrapper is a
    large share of a call: measured on benchmark problem 1 (a 2-50-2 network), Direct
    forward + backward 19.8 -> 12.6 ms and the forward 5.6 -> 5.0 ms; no change on problem 2,
    whose kernels dominate. Compile time was unchanged."""
    from torch._inductor import list_mode_options

    options = dict(list_mode_options(mode))
    if mode == "default" and device.type == "cpu":
        options["cpp_wrapper"] = True
    options["guard_filter_fn"] = guard_filter
    return options


def _skip_closure_guards(closure_names: set) -> Callable:
    """A ``guard_filter_fn`` that drops dynamo's guards on the program's closure variables.

    A program is built once per cache key from constants (the tableau's coefficients, the
    number of stages, the state's flattener and dtype, the norm's size), which its closure
    holds and nothing reassigns; dynamo cannot know that, and guards on each of them (a
    dopri5 step: about 60 guards of 170, the adjoint's step about 85 of 290). Guards are
    checked on every call, so those were a share of each step's cost. Guards on the arguments
    (``f``, its parameters, the state), on globals and on torch's global state are kept."""

    def keep(entries) -> list:
        return [entry.is_global or _root_name(entry.name) not in closure_names for entry in entries]

    return keep


def _root_name(source: str) -> str:
    """The variable a guard's source starts from: ``"a[1][0]"`` -> ``"a"``, ``"func.net"`` -> ``"func"``."""
    end = 0
    while end < len(source) and (source[end].isalnum() or source[end] == "_"):
        end += 1
    return source[:end]


def _program(key: tuple, build: Callable[[], Callable], mode: str, warn_key: tuple, device: torch.device) -> _Program:
    key = key + (device.type,)
    program = _PROGRAMS.get(key)
    if program is None:
        program = _PROGRAMS[key] = _Program(build, mode, warn_key, device)
        if warn_key in _FAILED:  # another program of this f failed (not traceable): not tried again
            program.failed = _FAILED[warn_key]
        while len(_PROGRAMS) > CACHE_SIZE:
            _PROGRAMS.popitem(last=False)[1].release()
    else:
        _PROGRAMS.move_to_end(key)
    return program


def cached_programs(kind: str) -> list:
    """The cached programs of one kind ("step" or "vjp"), least recently used first: each has
    ``fn`` (compiled) and ``eager``. For benchmarks that time one graph alone."""
    return [program for key, program in _PROGRAMS.items() if key[0] == kind]


def clear_cache() -> None:
    """Forget every compiled program (the next compiled solve compiles again) and which
    functions were warned about."""
    for program in _PROGRAMS.values():
        program.release()
    _PROGRAMS.clear()
    _FAILED.clear()


def _own_code(fn: Callable) -> Callable:
    """``fn`` with a code object of its own. Dynamo keeps compiled graphs, and its recompile
    budget (8), per code object: programs built by the same factory would otherwise share it,
    and a ninth (method, shape) would silently run eagerly."""
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{next(_SERIAL)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def _graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process (its own counter; read around each call)."""
    from torch._dynamo.utils import counters  # imported here: torch._dynamo loads only when compiling

    return counters["stats"]["unique_graphs"]


def _field_key(func) -> object:
    """What a program is specialised on, of ``f``: its class (a module) or its code (a function)."""
    if isinstance(func, torch.nn.Module):
        return type(func)
    return getattr(func, "__code__", type(func))


_FAILED: dict = {}  # (field key, mode) -> why the first of its programs failed: warned once, not retried


def _warn(program: _Program, what: str) -> None:
    """The one :class:`CompileWarning` for ``f`` (and mode) when a program of it cannot be compiled."""
    if program.warn_key in _FAILED:
        return
    _FAILED[program.warn_key] = program.failed
    if program.failed.startswith("GlobalModuleHooksChanged"):
        cause = ("Its compiled programs stay off in this process (torchadjoint.compiled.clear_cache() forgets them); "
                 "register global module hooks before the first compiled solve.")
    elif program.failed.startswith("FailOnRecompileLimitHit"):
        limit = torch._dynamo.config.recompile_limit
        cause = (f"This program reached dynamo's recompile limit (torch._dynamo.config.recompile_limit = {limit}): "
                 f"it compiles once per grad mode and per change of anything its guards check (a shape, a dtype, "
                 f"a Python attribute of f that changes between calls); raise the limit, or keep those fixed.")
    else:
        cause = ("Common causes: f calls something torch.compile cannot trace (Python side effects such as a counter "
                 "on the module, .item(), data-dependent control flow), or no C++ compiler for inductor.")
    warnings.warn(
        f"compile=True: {what} could not be compiled ({program.failed}); running it eagerly instead (same results, "
        f"no speed-up). This is said once for this f; pass compile=False to silence it. {cause}",
        CompileWarning,
        stacklevel=user_stacklevel(),
    )


def _reason(error: Exception) -> str:
    """One line saying why compiling failed: the error's type and first line, and for an
    error inductor wraps (``BackendCompilerFailed``, whose own first line is only
    "backend='inductor' raised:") the wrapped error's too."""
    def line(e: BaseException) -> str:
        text = str(e).strip()
        return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"

    inner = getattr(error, "inner_exception", None)
    return line(error) + (f" {line(inner)}" if isinstance(inner, BaseException) else "")


class _Runner:
    """Calls a program, timing the calls that compiled, falling back to eager on failure."""

    def __init__(self, program: _Program, what: str):
        self.program, self.what = program, what
        self.stats = dict(compiled=program.failed is None, compile_seconds=0.0, graphs_compiled=0)

    def __call__(self, *args):
        program = self.program
        if program.failed is None and program.warn_key in _FAILED:  # another program of f failed since
            program.failed = _FAILED[program.warn_key]
        if program.failed is None:
            start = time.perf_counter()
            try:
                out, new = program.call(*args)
            except Exception as error:
                program.failed = _reason(error)
                _warn(program, self.what)
                self.stats["compiled"] = False
                return None
            if new:
                self.stats["compile_seconds"] += time.perf_counter() - start
                self.stats["graphs_compiled"] += new
            return out
        self.stats["compiled"] = False
        return None


# ---------------------------------------------------------------------------------------------
# f inside a graph


def _traced_field(func, flattener, dtype) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``F(t: 0-dim float64 tensor, y: (n,)) -> (n,)``: the user's ``func`` on flat states,
    written to be traced (no output checks: the solve's first, eager evaluation made them)."""
    if flattener.is_tensor:
        shape = torch.Size(flattener.shapes[0])
        return lambda t, y: func(t.to(dtype), y.view(shape)).reshape(-1)
    return lambda t, y: concat_leaves(flattener.leaves_of(func(t.to(dtype), flattener.unflatten(y))))


# ---------------------------------------------------------------------------------------------
# Forward: one whole step


def _build_step(tableau: ButcherTableau, field_of: Callable, rms_entries: Optional[int]):
    """The step program: ``(func, extra, times (3,) = [t0, h, t1] float64, y0, f0, rtol, atol,
    side0=None) -> (y1, f1 or None, error or None, ratio or None, stages (s, n), sides, last input,
    integrated)``. ``field_of(func, extra)`` gives the field ``F(t, y) -> (dy/dt (n,), side)``;
    ``sides`` holds the side outputs of stages 1 … s-1 (the adjoint's parameter parts, a tuple of
    tensors per stage; None for a forward field), ``last input`` the last stage's input (n,).
    Coefficients are constants.

    ``side0``, the first stage's side output, asks for the sides integrated over the step with
    the step's own weights: ``integrated = ((h Σ_i b_i side_i[j], ...), ‖h Σ_i e_i side_i‖ or None)``
    (e: the embedded error weights; the 2-norm over every part), what
    :class:`~torchadjoint.adjoint.vjp.StageAccumulator` adds for an accepted step. Computed here,
    where the parts are made, it costs the host no kernel per stage and part; None without
    ``side0``."""
    s, c, a, b, fsal = tableau.stages, [float(x) for x in tableau.c], tableau.a, tableau.b, tableau.fsal
    b_error = tableau.b_error

    def combine(weights, ks):
        total = None
        for w, k in zip(weights, ks):
            if w != 0:
                total = k * float(w) if total is None else total + k * float(w)
        return total

    def step(func, extra, times, y0, f0, rtol, atol, side0=None):
        field = field_of(func, extra)
        t0, h, t1 = times[0], times[1], times[2]
        h_y = h.to(y0.dtype)
        ks, sides = [f0], []
        yi = y0
        for i in range(1, s):
            increment = combine(a[i], ks)
            yi = y0 if increment is None else y0 + h_y * increment
            k, side = field(t1 if c[i] == 1 else t0 + c[i] * h, yi)
            ks.append(k)
            sides.append(side)
        if fsal:
            y1, f1 = yi, ks[-1]
        else:
            y1, f1 = y0 + h_y * combine(b, ks), None
        error = ratio = None
        if b_error is not None:
            # Only the controller reads it, detached (no graph through it under Direct).
            error = (h_y * combine(b_error, ks)).detach()
            if rms_entries is not None:
                scaled = error / (torch.maximum(y0.detach().abs(), y1.detach().abs()) * rtol + atol)
                if 0 <= rms_entries < scaled.shape[0]:
                    scaled = scaled[:rms_entries]
                ratio = torch.linalg.vector_norm(scaled) / math.sqrt(max(scaled.shape[0], 1))
        integrated = None if side0 is None else integrate_sides(h, (side0, *sides), y0.dtype)
        return y1, f1, error, ratio, torch.stack(ks), tuple(sides), yi, integrated

    def integrate_sides(h, stage_sides, state_dtype):
        # Per part j, its values at every stage, at the state's precision at least (as the
        # accumulator sums them: see StageAccumulator.on_accept).
        parts = [[x.to(torch.promote_types(x.dtype, state_dtype)) for x in part] for part in zip(*stage_sides)]
        gained = tuple(h.to(part[0].dtype) * combine(b, part) for part in parts)
        if b_error is None:
            return gained, None
        norms = [torch.linalg.vector_norm(h.to(part[0].dtype) * combine(b_error, part)) for part in parts]
        return gained, torch.linalg.vector_norm(torch.stack([n.to(norms[0].dtype) for n in norms]))

    return step


def _forward_field_of(flattener, dtype) -> Callable:
    """``field_of`` for :func:`_build_step`: the user's ``f`` itself, no side output."""

    def field_of(func, extra):
        field = _traced_field(func, flattener, dtype)
        return lambda t, y: (field(t, y), None)

    return field_of


def tensor_paths(func: torch.nn.Module, tensors: Sequence[torch.Tensor]) -> Tuple[Tuple[str, ...], ...]:
    """For each of ``tensors`` (parameters or buffers of ``func``), the names under which the
    modules holding it hold it, one per (module, attribute): what :func:`_bound` replaces, so
    that every use of the tensor sees the replacement (weights tied between two modules), and
    none is replaced twice (one module shared under two names). With one name per tensor and
    ``functional_call``'s own tying, a shared submodule was left holding torch.func's wrapped
    tensors after the call, in place of its Parameters (torch 2.13)."""
    held: dict = {}  # id(tensor) -> {(id(module), attribute): path}
    named = itertools.chain(func.named_parameters(remove_duplicate=False), func.named_buffers(remove_duplicate=False))
    for path, x in named:
        owner, _, attribute = path.rpartition(".")
        held.setdefault(id(x), {}).setdefault((id(func.get_submodule(owner)), attribute), path)
    return tuple(tuple(held[id(x)].values()) for x in tensors)


def _bound(func, paths: Tuple[Tuple[str, ...], ...], tensors: Sequence[torch.Tensor]) -> Callable:
    """``func`` (a module) as ``(t, y) -> f`` computed with ``tensors`` in place of its own, at
    ``paths`` (see :func:`tensor_paths`)."""
    from torch.func import functional_call

    replaced = {path: x for names, x in zip(paths, tensors) for path in names}
    return lambda t, y: functional_call(func, replaced, (t, y), strict=False, tie_weights=False)


def _parametrised_field_of(flattener, dtype, paths: Tuple[Tuple[str, ...], ...]) -> Callable:
    """``field_of`` for :func:`_build_step` with tensors of ``f`` (a module) passed in as
    ``extra``, by path (:func:`tensor_paths`): ``torch.func.vjp`` can then differentiate with
    respect to them, and inside a ``while_loop`` they are the body's inputs (dynamo lifts a
    module's own tensors into a loop body one attribute at a time: ``self.a`` and ``self.a.T``
    become two inputs aliasing each other, which ``while_loop`` refuses). No paths: ``f`` itself."""
    if not paths:
        return _forward_field_of(flattener, dtype)

    def field_of(func, tensors):
        field = _traced_field(_bound(func, paths, tensors), flattener, dtype)
        return lambda t, y: (field(t, y), None)

    return field_of


def tolerance_tensors(rtol, atol, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``rtol`` and ``atol`` (floats or tensors) as new tensors of ``like``'s dtype and device,
    the compiled programs' arguments (copies: two views of one tensor, a user's tolerances, would
    alias inside a ``while_loop``)."""
    return tuple(torch.as_tensor(v, dtype=like.dtype, device=like.device).clone() for v in (rtol, atol))


class CompiledStepper:
    """A drop-in for :func:`~torchadjoint.step.rk_step` that runs the step as one compiled
    graph (see the module docstring). ``stats``: compiled, compile_seconds, graphs_compiled.
    ``extra``: the program's second argument (the adjoint's parameters; () for a forward step)."""

    def __init__(self, func, program: _Program, controller: Optional[PIController], what: str, extra: tuple = ()):
        self.func, self.controller, self.extra = func, controller, extra
        self.run = _Runner(program, what)
        self.stats = self.run.stats
        self._ratio_on_host = controller is not None and controller.rms_entries is None  # a user's norm
        self._tolerances: Optional[tuple] = None

    def _tolerance_tensors(self, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        rtol, atol = (1.0, 1.0) if self.controller is None else (self.controller.rtol, self.controller.atol)
        cached = self._tolerances
        if cached is None or cached[0] is not rtol or cached[1] is not atol:  # rtol may be clamped before the solve
            self._tolerances = cached = (rtol, atol, *tolerance_tensors(rtol, atol, like))
        return cached[2], cached[3]

    def __call__(self, f, t0: float, y0: torch.Tensor, f0: torch.Tensor, h: float, t1: float, tableau, coeffs) -> StepResult:
        rtol, atol = self._tolerance_tensors(y0)
        times = torch.tensor((t0, h, t1), dtype=torch.float64, device=y0.device)
        out = self.run(self.func, self.extra, times, y0, f0, rtol, atol, *self.first_side())
        if out is None:  # compiling failed (warned once): the eager step, counted by the loop
            return rk_step(f, t0, y0, f0, h, t1, tableau, coeffs)
        y1, f1, error, ratio, stages, sides, last_input, integrated = out
        if ratio is not None:
            ratio = float(ratio)  # the step's one host-device synchronisation, as in eager
        elif self._ratio_on_host:
            ratio = self.controller.error_ratio(error.detach(), y0.detach(), y1.detach())
        self.evaluated(tableau, t0, h, t1, stages, sides, last_input, integrated)
        return StepResult(y1, f1, error, stages, error_ratio=ratio, evaluations=tableau.stages - 1)

    def first_side(self) -> tuple:
        """The step program's ``side0`` argument, as a 0- or 1-tuple: none for a forward step."""
        return ()

    def evaluated(self, tableau, t0: float, h: float, t1: float, stages: torch.Tensor, sides: tuple,
                  last_input: torch.Tensor, integrated: Optional[tuple]) -> None:
        """Told what the graph evaluated (stages 1 … s-1): nothing to do for a forward step."""


class CompiledSteps:
    """The compiled path of one solve: hands :func:`~torchadjoint.integrate.integrate` a
    :class:`CompiledStepper` for its tableau and controller (None where the method is not an
    explicit Runge–Kutta method: implicit and multistep methods keep their own steppers)."""

    def __init__(self, func, flattener, dtype, mode: str, device: torch.device):
        self.func, self.flattener, self.dtype, self.mode, self.device = func, flattener, dtype, mode, device

    def stepper(self, tableau, controller):
        """The compiled step; the eager step where the program failed to compile (warned once);
        None for a method that is not an explicit Runge–Kutta method (its own stepper runs)."""
        if not isinstance(tableau, ButcherTableau):
            return None
        func, flattener, dtype, mode = self.func, self.flattener, self.dtype, self.mode
        entries = None if controller is None else controller.rms_entries
        field = _field_key(func)
        key = ("step", tableau, field, flattener.spec, dtype, entries, mode)
        program = _program(key, lambda: _build_step(tableau, _forward_field_of(flattener, dtype), entries), mode,
                           (field, mode), self.device)
        what = f"the {tableau.name} step"
        if program.failed is not None:
            _warn(program, what)
            return _EagerStepper()
        return CompiledStepper(func, program, controller, what)


class _EagerStepper:
    """:func:`~torchadjoint.step.rk_step` itself, with stats saying the step was not compiled."""

    def __init__(self):
        self.stats = dict(compiled=False, compile_seconds=0.0, graphs_compiled=0)

    def __call__(self, *args) -> StepResult:
        return rk_step(*args)


def compiled_steps(problem, options) -> Optional[CompiledSteps]:
    """The compiled path for a forward solve of ``problem`` under ``options``, or None (eager)."""
    mode = getattr(options, "compile", None)
    if not mode:
        return None
    return CompiledSteps(problem.func, problem.flattener, problem.dtype, mode, problem.device)


# ---------------------------------------------------------------------------------------------
# Backward: f and its vector-Jacobian product in one graph


def _build_vjp(flattener, dtype, paths: Tuple[Tuple[str, ...], ...]):
    """``(func, t: 0-dim float64, y (n,), a (n,), params) -> (f, -a·∂f/∂y, (-a·∂f/∂θ_j, ...))``;
    ``paths``: the params' in ``func`` (:func:`tensor_paths`)."""
    from torch.func import vjp

    def augmented(func, t, y, a, params):
        def f_of(y, *params):
            if not paths:  # gradients for y alone: f is called as it is (any callable)
                return _traced_field(func, flattener, dtype)(t, y)
            return _traced_field(_bound(func, paths, params), flattener, dtype)(t, y)

        fy, pull = vjp(f_of, y, *params)
        grads = pull(a.neg())  # negated cotangent: the negated products directly
        return fy, grads[0], grads[1:]

    return augmented


class CompiledVJP:
    """``(t: float, y (n,), a (n,)) -> (f (n,), -a·∂f/∂y (n,), (-a·∂f/∂θ_j, ...))`` as one compiled
    graph, for :class:`~torchadjoint.adjoint.vjp.AdjointDynamics`. ``stats`` as for the step."""

    def __init__(self, func, flattener, dtype, params, mode: str, device: torch.device):
        self.func, self.params, self.dtype, self.program_mode = func, tuple(params), dtype, mode
        self.names = tensor_paths(func, self.params) if isinstance(func, torch.nn.Module) else ()
        field = _field_key(func)
        key = ("vjp", field, flattener.spec, dtype, self.names, mode)
        program = _program(key, lambda: _build_vjp(flattener, dtype, self.names), mode, (field, mode), device)
        if program.failed is not None:
            _warn(program, "the adjoint's f and its vector-Jacobian product")
        self.program = program
        self.run = _Runner(program, "the adjoint's f and its vector-Jacobian product")
        self.stats = self.run.stats

    def __call__(self, t: float, y: torch.Tensor, a: torch.Tensor):
        t = torch.tensor(t, dtype=torch.float64, device=y.device)
        out = self.run(self.func, t, y, a, self.params)
        if out is None:  # compiling failed (warned once): the same program, eagerly
            out = self.program.eager(self.func, t, y, a, self.params)
        return out


def compile_dynamics(dynamics, problem, options) -> Optional[dict]:
    """Switch an :class:`~torchadjoint.adjoint.vjp.AdjointDynamics` to the compiled path when
    ``options.compile`` asks for it; returns its stats dict (to merge into the backward's) or None.

    ``torch.func.functional_call`` differentiates with respect to a module's parameters, so ``f``
    must be an ``nn.Module`` whose parameters include every tensor gradients are wanted for;
    otherwise the backward runs eagerly, with a :class:`CompileWarning`. The jumps at output
    times then re-evaluate ``f`` (a kept graph cannot be reused across a compiled call), and the
    per-evaluation check for undeclared tensors requiring grad is not made (the forward's check
    at ``t_0`` still is). Implicit and multistep backward methods stay eager (None).
    """
    mode = getattr(options, "compile", None)
    if not mode:
        return None
    if not isinstance(options.method, ButcherTableau) or getattr(options.method, "implicit", False):
        # An implicit or multistep backward method differentiates F itself (Newton's
        # Jacobian), which torch.func cannot do through a compiled graph: eager, as its
        # forward steps are.
        return None
    func = problem.func
    own = {id(p) for p in func.parameters()} if isinstance(func, torch.nn.Module) else set()
    if not all(id(p) in own for p in dynamics.params):
        narrow = getattr(func, "narrow_dtype", None)  # set by solve.widened
        if problem.integrals:
            # The user's f may well be a module: the running cost wrapped it (and the cost) into a
            # function, and "make f a module" would be advice they cannot follow.
            why = ("a running cost rides along: f and the cost are solved as one wrapping function, which is no "
                   "nn.Module (the compiled vector-Jacobian product differentiates a module's own parameters); the "
                   "forward is compiled. To compile the backward too, integrate the cost in a module of your own "
                   "(state (y, c), dc/dt = the cost) instead of passing running_cost.")
        elif narrow is not None:
            why = (f"the {narrow} state is integrated in float32 through a function wrapped around f, which is no "
                   f"nn.Module (the compiled vector-Jacobian product differentiates a module's own parameters); the "
                   f"forward is compiled. A float32 state compiles the backward too.")
        else:
            why = ("f is not an nn.Module holding every tensor in params (the compiled vector-Jacobian product "
                   "differentiates a module's own parameters); the forward is compiled. Make f a module that "
                   "registers them as parameters to compile the backward too.")
        warnings.warn(f"compile=True: the backward pass runs eagerly because {why}", CompileWarning,
                      stacklevel=user_stacklevel())
        return dict(compiled=False, compile_seconds=0.0, graphs_compiled=0)
    compiled = CompiledVJP(func, problem.flattener, problem.dtype, dynamics.params, mode, problem.device)
    if compiled.program.failed is not None:  # warned: the eager dynamics, as without compile
        return compiled.stats
    dynamics.compiled_vjp = compiled
    dynamics.keep_graph_at = frozenset()
    return compiled.stats


# ---------------------------------------------------------------------------------------------
# Backward: a whole step of the adjoint equations


def _adjoint_field_of(flattener, dtype, names: Tuple[Tuple[str, ...], ...], n: int, theta_in_state: bool) -> Callable:
    """``field_of`` for :func:`_build_step` over Backsolve's state ``z = [y, a_y(, a_θ)]``
    ((2n,) or (2n + p,)): ``F(t, z) = [f, -a·∂f/∂y(, -a·∂f/∂θ)]``, as
    :class:`~torchadjoint.adjoint.vjp.AdjointDynamics` computes it. The side output is
    ``(-a·∂f/∂θ_j, ...)`` when ``a_θ`` is accumulated outside the state, None otherwise."""
    augmented = _build_vjp(flattener, dtype, names)

    def field_of(func, params):
        def field(t, z):
            fy, vjp_y, vjp_p = augmented(func, t, z[:n], z[n : 2 * n], params)
            if theta_in_state:
                return torch.cat([fy, vjp_y] + [g.reshape(-1).to(z.dtype) for g in vjp_p]), None
            return torch.cat([fy, vjp_y]), vjp_p

        return field

    return field_of


class CompiledAdjointStepper(CompiledStepper):
    """One step of Backsolve's backward solve (every stage's ``f`` and VJP, the stage
    combinations, the error estimate and norm) as one compiled graph. What the eager
    :class:`~torchadjoint.adjoint.vjp.AdjointDynamics` does per evaluation is done here per
    step, from the graph's outputs: counting, recording the parameter parts for its
    :class:`~torchadjoint.adjoint.vjp.StageAccumulator`, and keeping the last evaluation for
    error reports."""

    def __init__(self, dynamics, program: _Program, controller: Optional[PIController], what: str):
        super().__init__(dynamics.compiled_vjp.func, program, controller, what, extra=dynamics.compiled_vjp.params)
        self.dynamics = dynamics

    def first_side(self) -> tuple:
        """The parameter parts of the step's first stage, when ``a_θ`` is accumulated beside the
        state and they are known: the graph then integrates the step's parts itself."""
        accumulator = self.dynamics.accumulator
        first = None if accumulator is None else accumulator.first_stage()
        return () if first is None else (first,)

    def evaluated(self, tableau, t0: float, h: float, t1: float, stages: torch.Tensor, sides: tuple,
                  last_input: torch.Tensor, integrated: Optional[tuple]) -> None:
        dynamics, c, n = self.dynamics, tableau.c, self.dynamics.n
        stage_time = lambda i: t1 if c[i] == 1 else t0 + c[i] * h  # noqa: E731  (as rk_step evaluates them)
        dynamics.nfe += tableau.stages - 1
        dynamics.nvjp += tableau.stages - 1
        if integrated is not None:
            dynamics.accumulator.took_step(t0, t1, (stage_time(len(sides)), sides[-1] if sides else None), *integrated)
        elif dynamics.accumulator is not None:
            for i, side in enumerate(sides, start=1):
                dynamics.accumulator.record(stage_time(i), side)
        if not sides:  # one stage (Euler): the step evaluated nothing beyond f0, whose call set `last`
            return
        last = stages[-1]
        vjp_p = sides[-1] if sides[-1] is not None else (last[2 * n :],)
        dynamics.last = (stage_time(tableau.stages - 1), last[:n], last_input[n : 2 * n], last[n : 2 * n], vjp_p)


class CompiledAdjointSteps:
    """The compiled path of Backsolve's backward solve (``y`` re-solved in the state): hands
    :func:`~torchadjoint.integrate.integrate` a :class:`CompiledAdjointStepper` for an
    explicit Runge–Kutta method (None for others: they keep their own steppers)."""

    def __init__(self, dynamics, flattener, dtype, mode: str, device: torch.device):
        self.dynamics, self.flattener, self.dtype, self.mode, self.device = dynamics, flattener, dtype, mode, device

    def stepper(self, tableau, controller):
        if not isinstance(tableau, ButcherTableau) or getattr(tableau, "implicit", False):
            return None
        dynamics, flattener, dtype, mode = self.dynamics, self.flattener, self.dtype, self.mode
        vjp = dynamics.compiled_vjp
        entries = None if controller is None else controller.rms_entries
        field = _field_key(vjp.func)
        n, inside = dynamics.n, dynamics.theta_in_state
        key = ("adjoint step", tableau, field, flattener.spec, dtype, vjp.names, n, inside, entries, mode)
        program = _program(key, lambda: _build_step(tableau, _adjoint_field_of(flattener, dtype, vjp.names, n, inside),
                                                    entries), mode, (field, mode), self.device)
        what = f"the backward {tableau.name} step"
        if program.failed is not None:
            _warn(program, what)
            return _EagerStepper()
        return CompiledAdjointStepper(dynamics, program, controller, what)


def compiled_adjoint_steps(dynamics, problem) -> Optional[CompiledAdjointSteps]:
    """The compiled backward steps for ``dynamics`` once :func:`compile_dynamics` has compiled
    its evaluations and ``y`` is re-solved in the state (Backsolve); None otherwise (eager
    steps; Checkpointed reads ``y`` along a stored trajectory, on the host)."""
    vjp = dynamics.compiled_vjp
    if vjp is None or dynamics.along:
        return None
    return CompiledAdjointSteps(dynamics, problem.flattener, problem.dtype, vjp.program_mode, problem.device)


def combined_stats(*parts: Optional[dict]) -> dict:
    """The compile stats of several programs of one pass as one: compiled only if all were."""
    parts = [p for p in parts if p]
    return dict(compiled=all(p["compiled"] for p in parts),
                compile_seconds=sum((p["compile_seconds"] for p in parts), 0.0),
                graphs_compiled=sum(p["graphs_compiled"] for p in parts))
