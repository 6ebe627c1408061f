"""Data-parallel training across processes (``torchrun``): setup, teardown, and solves that
take the same steps on every rank.

Each rank solves the ODE for its own share of the batch. An adaptive solver picks its steps
from an error norm over the state it sees, so left alone every rank would take different
steps, and the result would depend on the number of processes (by about the solver
tolerance). Here the error norm itself is all-reduced: every rank measures the RMS error of
the *global* batch, so all ranks accept, reject and size steps identically, exactly as a
single process solving the whole batch would (up to the order of floating-point sums).
That holds for the forward solve (``norm`` solver option) and for the backward solves of
the adjoint methods (Backsolve's seminorm over ``(y, a_y)``, Checkpointed's over ``a_y``,
Quadrature's RMS over ``(y, a_y)``). These reductions run on a process group of their
own, so they never interleave with DDP's gradient all-reduce.

Backsolve also decides, at each intermediate output time it lands on (the spiral task's
losses), whether to reset the re-solved ``y`` to the forward's value, by the drift of ``y``
there. That decision moves the state, and so the later steps: it too is taken on the drift
RMS over the global batch (``GlobalDrift``), as one process would take it.

DDP averages gradients by default; we sum them instead (a communication hook) and divide
each rank's loss by the *global* batch size. The adjoint's initial condition
``a_y(T) = dL/dy(T)`` is then the same per sample as in a single-process run, which keeps
the backward solve's steps identical too.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from ..adjoint import Backsolve, Direct, GradientMethod
from .errors import TrainingError

log = logging.getLogger("torchadjoint.train")


@dataclass
class Context:
    """Where this process stands: ``rank`` of ``world_size`` processes, on ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    norm_group: Optional[object] = None  # process group for the solver's norm reductions

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> CUDA when available (this process's local GPU), else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainingError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda"):
        raise TrainingError(f"--device {name!r}: this program runs on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


@contextlib.contextmanager
def process_group(device_name: str, timeout_s: float) -> Iterator[Context]:
    """Set up this process's place in the run and tear it down, even on failure.

    Outside ``torchrun`` this is a single process. Under ``torchrun`` it joins the process
    group (NCCL for CUDA, gloo for CPU) with ``timeout_s`` on every collective, so a failing
    rank makes the others raise rather than wait forever, and ``destroy_process_group``
    runs in every case.
    """
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        yield Context(device=resolve_device(device_name))
        return
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(device_name, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend=backend, timeout=timeout)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        norm_group = dist.new_group(backend=backend, timeout=timeout)
        yield Context(rank=rank, world_size=world, local_rank=local_rank, device=device, norm_group=norm_group)
    finally:
        dist.destroy_process_group()


def global_rms(sum_squares: torch.Tensor, count: int, ctx: Context) -> torch.Tensor:
    """sqrt(Σ_ranks sum_squares / Σ_ranks count): a 0-dim tensor, identical on every rank."""
    packed = torch.stack([sum_squares.detach().to(torch.float64), sum_squares.new_tensor(float(count), dtype=torch.float64)])
    dist.all_reduce(packed, group=ctx.norm_group)
    return (packed[0] / packed[1]).sqrt()


class GlobalRMSNorm:
    """Forward-solve error norm: the RMS over the state of every rank (solver ``norm`` option)."""

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def __call__(self, scaled_error: torch.Tensor) -> torch.Tensor:
        return global_rms(scaled_error.pow(2).sum(), scaled_error.numel(), self.ctx)


class GlobalPartsNorm:
    """A backward solve's error norm over every rank: the RMS over the first ``measured``
    parts of the scaled error that an adjoint method passes to a callable ``norm`` (e.g.
    Backsolve's ``(y, a_y, a_θ)`` with ``measured=2``: the seminorm, ``a_θ`` left out)."""

    def __init__(self, ctx: Context, measured: int):
        self.ctx, self.measured = ctx, measured

    def combine_scale(self, value: float) -> float:
        """The adjoint's size (which scales the backward atol, see adjoint.base.adjoint_scale)
        as the largest over every rank: every rank then has the same tolerance."""
        packed = torch.tensor([value], dtype=torch.float64, device=self.ctx.device)
        dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=self.ctx.norm_group)
        return float(packed)

    def __call__(self, parts) -> torch.Tensor:
        measured = parts[: self.measured]
        return global_rms(sum(p.pow(2).sum() for p in measured), sum(p.numel() for p in measured), self.ctx)


class GlobalDrift:
    """Backsolve's reset decision measure over every rank: the RMS scaled drift of the
    re-solved ``y`` over the global batch (replaces ``Backsolve.reset_measure``)."""

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def __call__(self, drift_norm2: torch.Tensor, size: int) -> float:
        return float(global_rms(drift_norm2.pow(2), size, self.ctx))


def _synchronisable() -> dict:
    """``{method class: (default norm it replaces, parts measured)}``, from each method's
    documented ``norm`` callable: Backsolve ``(y, a_y, a_θ)`` seminorm -> 2 parts,
    Checkpointed ``(a_y, a_θ)`` seminorm -> 1, Quadrature ``(y, a_y)`` rms -> 2."""
    from .. import adjoint

    table = {}
    for name, default, measured in (("Backsolve", "seminorm", 2), ("Checkpointed", "seminorm", 1),
                                    ("Quadrature", "rms", 2)):
        cls = getattr(adjoint, name, None)
        if cls is not None:
            table[cls] = (default, measured)
    return table


def synchronised_gradient(method: GradientMethod, ctx: Context) -> GradientMethod:
    """A copy of ``method`` whose backward solve takes the same steps on every rank.

    The adjoint methods get their default norm reduced over all ranks; Direct
    differentiates the forward steps, which the forward norm already synchronises. A
    method with a custom norm, or one unknown here, keeps per-rank backward steps: still
    correct (no collective runs inside its backward solve, and DDP all-reduces the
    gradients after it), but gradients then match a single-process run to the backward
    solve's tolerance rather than to rounding.
    """
    if isinstance(method, Direct):
        return method
    entry = _synchronisable().get(type(method))
    if entry is not None and getattr(method, "norm", None) == entry[0]:
        synced = copy.copy(method)
        synced.norm = GlobalPartsNorm(ctx, entry[1])
        if isinstance(method, Backsolve):
            synced.reset_measure = GlobalDrift(ctx)
        return synced
    if ctx.is_main:
        log.warning(
            "gradient=%r: its backward solve chooses steps per process; gradients agree with a single-process "
            "run to the solver tolerance, not bitwise", method,
        )
    return method


def synchronise_solves(model: torch.nn.Module, ctx: Context):
    """Make every ODE block of ``model`` take the same steps on every rank (forward and
    backward). Returns a function that undoes it (for solves one rank runs alone, such as
    plotting on rank 0)."""
    from ..models import NeuralODE

    saved = []
    for block in model.modules():
        if isinstance(block, NeuralODE):
            saved.append((block, block.gradient, block.options.get("norm", _UNSET)))
            block.options["norm"] = GlobalRMSNorm(ctx)
            block.gradient = synchronised_gradient(block.gradient or Backsolve(), ctx)

    def restore() -> None:
        for block, gradient, norm in saved:
            block.gradient = gradient
            if norm is _UNSET:
                block.options.pop("norm", None)
            else:
                block.options["norm"] = norm

    return restore


_UNSET = object()


def sum_gradients_hook(process_group, bucket):
    """DDP communication hook: all-reduce gradients as a **sum** (the loss on each rank is
    already divided by the global batch size)."""
    group = process_group if process_group is not None else dist.group.WORLD
    future = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return future.then(lambda fut: fut.value()[0])


def all_sum(values, ctx: Context) -> list:
    """Sum a list of floats over ranks (for logging and metrics): a list of floats."""
    if not ctx.distributed:
        return [float(v) for v in values]
    packed = torch.tensor([float(v) for v in values], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(packed)
    return packed.tolist()


def broadcast_object(value, ctx: Context):
    """Rank 0's ``value`` on every rank (a small picklable object, e.g. a folder name)."""
    if not ctx.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


def shard(n: int, ctx: Context) -> slice:
    """This rank's contiguous share of ``n`` items (the shares differ by at most one)."""
    base, extra = divmod(n, ctx.world_size)
    start = ctx.rank * base + min(ctx.rank, extra)
    return slice(start, start + base + (1 if ctx.rank < extra else 0))


def check_batch(batch_size: int, ctx: Context) -> None:
    if batch_size < ctx.world_size:
        raise TrainingError(
            f"--batch-size {batch_size} is smaller than the number of processes ({ctx.world_size}); every "
            f"process needs at least one example per batch"
        )


__all__ = [
    "Context", "process_group", "synchronise_solves", "resolve_device", "GlobalRMSNorm", "GlobalPartsNorm", "GlobalDrift", "synchronised_gradient",
    "sum_gradients_hook", "all_sum", "broadcast_object", "barrier", "shard", "check_batch", "launched_by_torchrun",
]
