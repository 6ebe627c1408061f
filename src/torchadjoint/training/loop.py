"""The training loop: epochs of batches, metrics, checkpoints, resumption, plots.

One call of :func:`train` is one run, single-process or one rank of a ``torchrun`` job.
Only rank 0 writes files; every rank reads the configuration and checkpoint itself, so a
bad option or a damaged checkpoint stops all ranks alike.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import logging
import math
import os
import random
import re
import shlex
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from ..adjoint import ReconstructionWarning
from ..errors import SolveError
from ..models import NeuralODE
from . import checkpoint as ckpt
from . import distributed
from .config import CONFIG_FILE, TrainConfig, check_same, load_config, resolve, save_config
from .errors import TrainingError
from .tasks import TASKS, Task

log = logging.getLogger("torchadjoint.train")

LOG_FILE = "train.log"
METRICS_FILE = "metrics.csv"
NFE_FILE = "nfe.csv"
# Files a run writes; --overwrite removes them first (other files in the folder stay).
RUN_FILES = (ckpt.CHECKPOINT, ckpt.PREVIOUS, ckpt.FINAL_MODEL, CONFIG_FILE, LOG_FILE, METRICS_FILE, NFE_FILE,
             "curves.png", "nfe.png", "trajectories.png", "vector_field.png", "hidden_pca.png",  # digits, spiral
             "density.png", "samples.png", "flow.png",  # cnf
             "reconstructions.png", "latent_trajectories.png")  # latent


@dataclass
class RunResult:
    """What a finished run reports: its folder, the per-epoch metrics (``history``), the
    last epoch's metrics, the files written (rank 0), and the wall time in seconds."""

    folder: str
    history: List[Dict[str, float]]
    iterations: List[Dict[str, float]]
    final: Dict[str, float]
    files: List[str] = field(default_factory=list)
    seconds: float = 0.0


def train(config: TrainConfig) -> RunResult:
    """Run (or resume) the training described by ``config`` (see ``torchadjoint train --help``;
    build one with :func:`torchadjoint.training.default_config`)."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train(config): expected a TrainConfig (see torchadjoint.training.default_config), "
                        f"got {type(config).__name__}")
    # A TrainConfig made directly leaves the task's defaults as None: fill them in here too.
    config = resolve(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(getattr(config, "threads", None) or threads)
    try:
        with distributed.process_group(config.device, config.dist_timeout) as ctx:
            with _logging(config, ctx):
                return _train(config, ctx)
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _logging(config: TrainConfig, ctx: distributed.Context):
    """Rank 0 logs to the console (through tqdm, so bars stay intact) and, once the output
    folder is prepared, to ``OUT/train.log``; other ranks log warnings only."""
    handler = _TqdmHandler()
    prefix = "" if not ctx.distributed else f"[rank {ctx.rank}] "
    handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
    handler.setLevel(logging.INFO if ctx.is_main else logging.WARNING)
    handler.addFilter(lambda record: not getattr(record, "file_only", False))
    old_level, old_propagate = log.level, log.propagate
    log.setLevel(logging.INFO)
    log.propagate = False
    log.addHandler(handler)
    try:
        yield
    finally:
        for h in list(log.handlers):
            if h is handler or getattr(h, "_torchadjoint_run", False):
                log.removeHandler(h)
                h.close()
        log.setLevel(old_level)
        log.propagate = old_propagate


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stdout)
        except ImportError:  # pragma: no cover
            print(self.format(record), flush=True)
        except BrokenPipeError:  # the reader went away (``| head``): the log file still has it
            pass
        except Exception:  # pragma: no cover - logging must never break training
            self.handleError(record)


def _log_to_file(folder: str) -> None:
    handler = logging.FileHandler(os.path.join(folder, LOG_FILE))
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    handler.setLevel(logging.INFO)
    handler._torchadjoint_run = True  # type: ignore[attr-defined]
    log.addHandler(handler)


def _record(message: str, *args) -> None:
    """Log to ``train.log`` only (the console shows the same news its own way)."""
    log.info(message, *args, extra={"file_only": True})


DEFAULT_ROOT = "runs"


def _claim_numbered_folder(task: str) -> str:
    """Create and return ``runs/TASK-N``, N one more than the highest already there: a
    default run never collides with an earlier one (``os.mkdir`` fails rather than share)."""
    pattern = re.compile(rf"{re.escape(task)}-(\d+)$")
    try:
        os.makedirs(DEFAULT_ROOT, exist_ok=True)
        taken = [int(m.group(1)) for m in map(pattern.match, os.listdir(DEFAULT_ROOT)) if m]
    except OSError as exc:
        raise TrainingError(f"cannot create the output folder {DEFAULT_ROOT!r} ({exc.strerror}); choose one with --out") from None
    number = max(taken, default=0) + 1
    while True:
        folder = os.path.join(DEFAULT_ROOT, f"{task}-{number}")
        try:
            os.mkdir(folder)
            return folder
        except FileExistsError:
            number += 1
        except OSError as exc:
            raise TrainingError(f"cannot create the output folder {folder!r} ({exc.strerror}); choose one with --out") from None


def _check_out(folder: str) -> None:
    """``--out`` must be a folder, or a path where one can be made."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise TrainingError(f"--out {folder!r} is a file, not a folder; give a folder (it is created if missing)")
    parent = os.path.dirname(os.path.abspath(folder))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise TrainingError(f"--out {folder!r} cannot be created: {parent!r} is a file, not a folder")


def _prepare_folder(config: TrainConfig, ctx: distributed.Context) -> tuple:
    """Check the output folder against the options; return ``(config with its folder, the
    checkpoint to resume from or None)``.

    Every rank checks (reads only), then they meet, then rank 0 writes: no rank can see a
    file rank 0 has just written and judge the folder differently. Without ``--out``, rank
    0 claims a new numbered folder and tells the others.
    """
    if config.out is None:
        folder = distributed.broadcast_object(_claim_numbered_folder(config.task) if ctx.is_main else None, ctx)
        config = dataclasses.replace(config, out=folder)
    _check_out(config.out)
    state = None
    if config.resume is not None:
        state = _check_resumable(config)
    else:
        _check_free(config)
    distributed.barrier(ctx)
    if ctx.is_main:
        _claim_folder(config)
    return config, state


def _check_resumable(config: TrainConfig) -> dict:
    """The checkpoint ``--resume`` continues from, checked against the run's saved options."""
    folder = config.out
    if config.overwrite:
        raise TrainingError("--resume and --overwrite contradict each other; give one of them")
    path = config.resume or os.path.join(folder, ckpt.CHECKPOINT)
    if not config.resume and not os.path.isdir(folder):
        raise TrainingError(f"--resume: there is no run in {folder!r} (the folder does not exist); check --out")
    if os.path.isfile(os.path.join(folder, CONFIG_FILE)):
        check_same(load_config(folder), config, repr(folder))
        if not config.resume and not os.path.isfile(path):
            raise TrainingError(
                f"--resume: the run in {folder!r} saved no checkpoint yet (no epoch finished); start it again "
                f"with --overwrite"
            )
    state = ckpt.load_checkpoint(path)
    check_same(state["config"], config, repr(path))
    return state


def _check_free(config: TrainConfig) -> None:
    """A new run refuses a folder that holds another run, unless ``--overwrite``."""
    folder = config.out
    existing = [f for f in (CONFIG_FILE, ckpt.CHECKPOINT) if os.path.isfile(os.path.join(folder, f))]
    if existing and not config.overwrite:
        raise TrainingError(
            f"--out {folder!r} already holds a run ({', '.join(existing)}); continue it with --resume, start it "
            f"again with --overwrite, or choose another --out (leave --out out for a new numbered folder)"
        )


def _claim_folder(config: TrainConfig) -> None:
    """Rank 0: create the folder (emptied of an overwritten run's files), write ``config.json``
    and start ``train.log``."""
    folder = config.out
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise TrainingError(f"--out {folder!r}: cannot create the folder ({exc.strerror})") from None
    if config.resume is None and config.overwrite:
        for name in RUN_FILES:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                os.unlink(path)
    save_config(config, folder)
    _log_to_file(folder)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def _ode_blocks(model: torch.nn.Module) -> List[NeuralODE]:
    return [m for m in model.modules() if isinstance(m, NeuralODE)]


def _nfe(blocks: List[NeuralODE], direction: str) -> int:
    total = 0
    for block in blocks:
        stats = block.stats.get(direction) if block.stats else None
        total += int(stats["nfe"]) if stats else 0
    return total


def _reconstruction_exceeded(blocks: List[NeuralODE]) -> Optional[tuple]:
    """``(worst error, threshold)`` of the last iteration's re-computed ``y`` when it
    exceeded the gradient method's warning threshold, else None (the warning is summarised
    per epoch, not printed per step). Both are in multiples of the backward tolerance:
    ``stats["backward"]["reconstruction_error_max"]``, the RMS over the state of
    ``(y_back - y_forward) / (atol + rtol·|y_forward|)``."""
    worst = None
    for block in blocks:
        stats = block.stats.get("backward") if block.stats else None
        threshold = getattr(block.gradient, "reconstruction_warning", None)
        error = stats.get("reconstruction_error_max", stats.get("reconstruction_error")) if stats else None
        if error is not None and threshold is not None and not error <= threshold:
            worst = (error, threshold) if worst is None else (max(worst[0], error), threshold)
    return worst


def _progress(iterable, config, ctx, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the "examples" extra
        return _NoBar(iterable)
    # None: a bar on a terminal, none in a log file or a pipe.
    disable = (not ctx.is_main) or (None if config.progress is None else not config.progress)
    return tqdm(iterable, desc=desc, disable=disable, leave=False, unit="batch", dynamic_ncols=True)


class _NoBar:
    def __init__(self, iterable):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass


def _run_epoch(epoch, config, ctx, task: Task, net, model, optimizer, blocks) -> tuple:
    """One pass over the epoch's batches. Returns (training metrics, per-iteration records)."""
    model.train()
    batches = task.epoch_batches(epoch)
    sums: Dict[str, float] = {}
    records = []
    reconstruction = []
    bar = _progress(batches, config, ctx, f"epoch {epoch + 1}/{config.epochs}")
    with warnings.catch_warnings():
        # Summarised once per epoch below instead of once per iteration.
        warnings.simplefilter("ignore", ReconstructionWarning)
        for i, batch in enumerate(bar):
            optimizer.zero_grad(set_to_none=True)
            try:
                loss, batch_sums = task.batch_loss(net, batch)
                loss.backward()
            except SolveError as exc:
                raise TrainingError(_solve_failed(exc, f"epoch {epoch + 1}, iteration {i + 1}", epoch, config, optimizer)) from None
            batch_sums = _global_sums(batch_sums, ctx, f"epoch {epoch + 1}, iteration {i + 1}")
            optimizer.step()
            for key, value in batch_sums.items():
                sums[key] = sums.get(key, 0.0) + value
            record = {
                "epoch": epoch + 1, "iteration": i + 1, "loss": batch_sums["loss"] / max(batch_sums["count"], 1),
                "nfe_forward": _nfe(blocks, "forward"), "nfe_backward": _nfe(blocks, "backward"),
            }
            records.append(record)
            worst = _reconstruction_exceeded(blocks)
            if worst is not None:
                reconstruction.append(worst)
            bar.set_postfix(_bar_text(sums, record), refresh=False)
    bar.close()
    if reconstruction:
        _warn_reconstruction(epoch, reconstruction, len(batches))
    return task.train_metrics(sums), records


def _global_sums(batch_sums: Dict[str, float], ctx: distributed.Context, where: str) -> Dict[str, float]:
    """The whole global batch's sums (one small all-reduce): logs and nfe.csv then read the
    same whatever the number of processes, and every rank sees a bad loss (and stops)."""
    keys = sorted(batch_sums)
    batch_sums = dict(zip(keys, distributed.all_sum([batch_sums[k] for k in keys], ctx)))
    if not math.isfinite(batch_sums["loss"]):
        raise TrainingError(f"the loss became {batch_sums['loss']} at {where}; lower --lr or tighten --rtol/--atol")
    return batch_sums


def _bar_text(sums: Dict[str, float], record: Dict[str, float]) -> Dict[str, object]:
    """The progress bar's postfix: the epoch's running loss (and accuracy), the last iteration's nfe."""
    postfix = {"loss": f"{sums['loss'] / max(sums['count'], 1):.4f}"}
    if "correct" in sums:
        postfix["acc"] = f"{100 * sums['correct'] / max(sums['count'], 1):.1f}%"
    postfix["nfe_f"] = record["nfe_forward"]
    postfix["nfe_b"] = record["nfe_backward"]
    return postfix


def _warn_reconstruction(epoch: int, reconstruction: List[tuple], iterations: int) -> None:
    """One warning for the epoch's iterations whose backward pass re-computed y(t) inexactly
    (``reconstruction``: their ``(error, threshold)``, see :func:`_reconstruction_exceeded`)."""
    log.warning(
        "epoch %d: in %d of %d iterations the backward pass re-computed y(t) with an error of up to %.3g times "
        "the tolerance (stats['backward']['reconstruction_error_max']: the RMS over the state of "
        "(y_back - y_forward) / (atol + rtol*|y_forward|); warning threshold %g); the gradients there are "
        "inexact: tighten --rtol/--atol, or choose --gradient checkpointed or direct",
        epoch + 1, len(reconstruction), iterations, max(w for w, _ in reconstruction), reconstruction[0][1],
    )


def _solve_failed(exc: SolveError, where: str, epoch: int, config, optimizer) -> str:
    """What went wrong inside a solve during training (``where``: the phase), and what to change."""
    lr = optimizer.param_groups[0]["lr"]
    saved = f"; finished epochs are saved in {config.out!r} (continue with --resume)" if epoch > 0 else ""
    return (
        f"the {exc.direction} ODE solve failed at {where}: it stopped at "
        f"t={exc.t:.6g} ({exc.reason}). The learned dynamics have probably become stiff or unstable: lower "
        f"--lr (now {lr:g}), loosen --rtol/--atol (now {config.rtol:g}/{config.atol:g}), add --kinetic "
        f"regularisation, or raise --max-steps (now {config.max_steps}){saved}"
    )


def _format_row(row: Dict[str, float], epochs: int) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}"]
    for key, value in row.items():
        if key in ("epoch", "seconds", "lr", "nfe_forward", "nfe_backward"):
            continue
        label = key.replace("_", " ")
        parts.append(f"{label} {100 * value:.2f}%" if key.endswith("accuracy") else f"{label} {value:.4g}")
    parts.append(f"nfe/iter fwd {row['nfe_forward']:.1f} bwd {row['nfe_backward']:.1f}")
    parts.append(f"lr {row['lr']:.3g}")
    parts.append(f"{row['seconds']:.1f}s")
    return "  ".join(parts)


def _csv(rows: List[Dict[str, float]]) -> str:
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return out.getvalue()


def _checkpoint_state(config, task, model, optimizer, scheduler, progress: "_Progress") -> dict:
    """Tensors and plain data only: loads with ``torch.load(weights_only=True)``."""
    return {
        "format": ckpt.FORMAT, "version": ckpt.VERSION, "epoch": progress.epochs_done, "config": config.identity(),
        "spec": task.spec, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "rng": ckpt.rng_states(), "history": progress.history,
        "iterations": progress.iterations, "resumes": progress.resumes,
    }


def solver_text(config: TrainConfig) -> str:
    """The solver and its accuracy setting as a user gave it: ``dopri5 (rtol 0.001, atol
    0.0001)`` for adaptive methods, ``rk4 (step size 0.1)`` for fixed-step ones."""
    if config.step_size is not None:
        return f"{config.method} (step size {config.step_size:g})"
    return f"{config.method} (rtol {config.rtol:g}, atol {config.atol:g})"


@dataclass
class _Progress:
    """What a run has done, carried across resumptions in its checkpoint: one row per
    finished epoch (``history``, metrics.csv), one record per iteration (``iterations``,
    nfe.csv), and the iteration counts after which it was resumed (``resumes``, marked in
    nfe.png)."""

    history: List[Dict[str, float]] = field(default_factory=list)
    iterations: List[Dict[str, float]] = field(default_factory=list)
    resumes: List[int] = field(default_factory=list)
    epochs_done: int = 0


def _train(config: TrainConfig, ctx: distributed.Context) -> RunResult:
    """One run on one rank: prepare the folder, build (or restore) the model and optimiser,
    train the remaining epochs, write the final model and plots."""
    started = time.perf_counter()
    distributed.check_batch(config.batch_size, ctx)
    # The task checks its options against its data before any file is written.
    task = TASKS[config.task](config, ctx)
    config, state = _prepare_folder(config, ctx)
    task.config = config  # now with its output folder
    _seed_everything(config.seed)
    model = task.build_model().to(device=ctx.device, dtype=task.dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    # Per-epoch decay, independent of the total number of epochs: a run can be extended.
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.lr_decay)
    if state is not None:
        progress = _restore(state, config, model, optimizer, scheduler)
    else:
        progress = _Progress()
        if ctx.is_main:
            log.info("training %s: %s", config.task, task.description)
    if ctx.is_main:
        log.info(
            "model: %d parameters; solver %s, gradient %s; %d process(es) on %s; output %s",
            sum(p.numel() for p in model.parameters()), solver_text(config), config.gradient, ctx.world_size,
            ctx.device, config.out,
        )
    net, restore = _across_processes(model, config, ctx)
    _train_epochs(config, ctx, task, net, model, optimizer, scheduler, progress)
    if restore is not None:
        restore()  # rank 0 solves alone from here on (plots)
    files = _write_outputs(config, task, model, progress) if ctx.is_main else []
    distributed.barrier(ctx)
    seconds = time.perf_counter() - started
    final = progress.history[-1] if progress.history else {}
    if ctx.is_main and final:
        _log_done(task, final, seconds, config.out)
    return RunResult(config.out, progress.history, progress.iterations, final, [f for f in files if os.path.exists(f)],
                     seconds)


def _restore(state: dict, config: TrainConfig, model, optimizer, scheduler) -> _Progress:
    """Load the checkpoint ``state`` into the model, optimiser, scheduler and random
    generators; return the run's progress so far, this resumption marked."""
    folder = config.out
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise TrainingError(f"the checkpoint does not fit this model: {exc}") from None
    try:
        ckpt.restore_rng_states(state["rng"])
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as exc:
        raise TrainingError(f"the checkpoint's random states are damaged ({type(exc).__name__}: {exc}); resume "
                            f"from another checkpoint (e.g. --resume {shlex.quote(os.path.join(folder, ckpt.PREVIOUS))})") from None
    iterations = list(state["iterations"])
    progress = _Progress(list(state["history"]), iterations,
                         [int(i) for i in state.get("resumes", [])] + [len(iterations)], int(state["epoch"]))
    log.info("resuming %s after epoch %d (from %s), up to epoch %d", folder, progress.epochs_done,
             config.resume or os.path.join(folder, ckpt.CHECKPOINT), config.epochs)
    return progress


def _across_processes(model: torch.nn.Module, config: TrainConfig, ctx: distributed.Context) -> tuple:
    """``(net, restore)``: what the batches go through (``model`` itself, or under torchrun
    its DistributedDataParallel wrapper with the ranks' solves kept in step), and the
    function that undoes the solve synchronisation (None when single-process)."""
    if ctx.distributed and (config.kinetic or config.jacobian) and ctx.is_main:
        log.warning("--kinetic/--jacobian under torchrun: the regulariser's integral is a per-process mean (and "
                    "--jacobian draws its noise per process), so the solver's steps agree with a single-process run "
                    "to about the tolerance, not exactly")
    if not ctx.distributed:
        return model, None
    from torch.nn.parallel import DistributedDataParallel

    restore = distributed.synchronise_solves(model, ctx)
    net = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    net.register_comm_hook(None, distributed.sum_gradients_hook)
    return net, restore


def _train_epochs(config, ctx, task: Task, net, model, optimizer, scheduler, progress: _Progress) -> None:
    """Train from ``progress.epochs_done`` to ``config.epochs``; after each epoch evaluate,
    and rank 0 saves the checkpoint, metrics.csv and nfe.csv. An interrupt or a failure is
    logged with what is saved and how to continue, and raised again."""
    folder = config.out
    blocks = _ode_blocks(model)
    start_epoch = progress.epochs_done
    if start_epoch >= config.epochs and ctx.is_main:
        log.info("the run already has %d epoch(s) (--epochs %d): nothing to train", start_epoch, config.epochs)
    epoch = saved_epochs = start_epoch
    try:
        for epoch in range(start_epoch, config.epochs):
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            train_metrics, records = _run_epoch(epoch, config, ctx, task, net, model, optimizer, blocks)
            scheduler.step()
            model.eval()
            try:
                eval_metrics = task.evaluate(model)
            except SolveError as exc:
                raise TrainingError(_solve_failed(exc, f"the evaluation after epoch {epoch + 1}", epoch, config, optimizer)) from None
            row = {"epoch": epoch + 1, **train_metrics, **eval_metrics}
            row["nfe_forward"] = sum(r["nfe_forward"] for r in records) / max(len(records), 1)
            row["nfe_backward"] = sum(r["nfe_backward"] for r in records) / max(len(records), 1)
            row["lr"] = lr
            row["seconds"] = time.perf_counter() - t0
            progress.history.append(row)
            progress.iterations.extend(records)
            progress.epochs_done = epoch + 1
            if ctx.is_main:
                state = _checkpoint_state(config, task, model, optimizer, scheduler, progress)
                ckpt.save_atomic(state, os.path.join(folder, ckpt.CHECKPOINT), keep_previous=ckpt.PREVIOUS)
                saved_epochs = epoch + 1
                ckpt.write_text_atomic(_csv(progress.history), os.path.join(folder, METRICS_FILE))
                ckpt.write_text_atomic(_csv(progress.iterations), os.path.join(folder, NFE_FILE))
                log.info(_format_row(row, config.epochs))
    except KeyboardInterrupt:
        if ctx.is_main:
            log.warning("interrupted in epoch %d: %d finished epoch(s) are saved in %s; continue with: "
                        "torchadjoint train --out %s --resume", epoch + 1, saved_epochs, folder, shlex.quote(folder))
        raise
    except TrainingError as exc:
        if ctx.is_main:
            _record("stopped: %s", exc)
        raise


def _write_outputs(config: TrainConfig, task: Task, model, progress: _Progress) -> List[str]:
    """Rank 0, after the last epoch: the final model (``model.pt``) and the plots; returns
    the run's files."""
    folder = config.out
    final_path = os.path.join(folder, ckpt.FINAL_MODEL)
    history = progress.history
    record = {"format": ckpt.MODEL_FORMAT, "config": config.identity(), "spec": task.spec,
              "state_dict": model.state_dict(), "metrics": history[-1] if history else {}}
    ckpt.save_atomic(record, final_path)
    files = [os.path.join(folder, f) for f in (CONFIG_FILE, METRICS_FILE, NFE_FILE, ckpt.CHECKPOINT)]
    files.append(final_path)
    if config.plots:
        from .plots import plot_run, run_label

        model.eval()
        files += plot_run(history, progress.iterations, folder, run_label(config), progress.resumes)
        files += task.plot(model, folder)
    return files


def _log_done(task: Task, final: Dict[str, float], seconds: float, folder: str) -> None:
    head = task.headline
    value = final.get(head, math.nan)
    shown = f"{100 * value:.2f}%" if head.endswith("accuracy") else f"{value:.4g}"
    log.info("done: %s %s after %d epoch(s), %.1f s; outputs in %s", head.replace("_", " "), shown,
             final["epoch"], seconds, folder)
