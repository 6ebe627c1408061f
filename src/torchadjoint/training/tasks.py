"""The training tasks: what model, what data, what loss, what is measured and plotted.

A task turns the run's configuration into a model and, per epoch, a list of global
batches; for one batch it returns this process's loss (already divided by the *global*
batch size, see :mod:`.distributed`) and sums for the metrics. The loop knows nothing
about digits or spirals. Register a task in ``TASKS``.
"""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..models import NeuralODE, ODEClassifier
from . import data as datasets
from .config import TrainConfig
from .errors import TrainingError
from .distributed import Context, all_sum, shard

Sums = Dict[str, float]


class Task:
    """Base class: ``defaults`` fill every option left unset on the command line."""

    name = ""
    description = ""
    defaults: Dict[str, object] = {}
    # Epoch metrics besides ``train_loss``, in column order; ``*_accuracy`` are fractions.
    metrics: Tuple[str, ...] = ()
    # The metric that the end-of-run summary reports.
    headline = "train_loss"

    def __init__(self, config: TrainConfig, ctx: Context):
        self.config, self.ctx = config, ctx
        self.dtype = getattr(torch, config.dtype)

    @staticmethod
    def solver_kwargs(c: TrainConfig) -> dict:
        options = {"step_size": c.step_size} if c.step_size is not None else {}
        from ..regularisers import kinetic_jacobian

        # --kinetic/--jacobian: the ODE blocks integrate λ_K|f|² + λ_J|∂f/∂y|_F² as a running cost.
        regulariser = kinetic_jacobian(getattr(c, "kinetic", 0.0) or 0.0, getattr(c, "jacobian", 0.0) or 0.0)
        if regulariser is not None:
            options["running_cost"] = regulariser
        options["max_num_steps"] = getattr(c, "max_steps", 10000)
        return dict(method=c.method, rtol=c.rtol, atol=c.atol, gradient=c.gradient, **options)

    @property
    def spec(self) -> dict:
        """Sizes the model takes from the data (saved with the final model)."""
        return {}

    @classmethod
    def make_model(cls, config: TrainConfig, spec: dict) -> nn.Module:
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        return self.make_model(self.config, self.spec)

    def epoch_batches(self, epoch: int) -> List[torch.Tensor]:
        """The global batches of ``epoch`` (every process gets the same list)."""
        raise NotImplementedError

    def batch_loss(self, model: nn.Module, batch: torch.Tensor) -> Tuple[torch.Tensor, Sums]:
        """This process's share of ``batch``: the loss to backpropagate and metric sums."""
        raise NotImplementedError

    def train_metrics(self, sums: Sums) -> Dict[str, float]:
        """Epoch training metrics from the sums over all batches and processes."""
        return {"train_loss": sums["loss"] / max(sums["count"], 1)}

    def evaluate(self, model: nn.Module) -> Dict[str, float]:
        return {}

    def plot(self, model: nn.Module, folder: str) -> List[str]:
        return []


def regularisation(model: nn.Module):
    """The running costs (--kinetic/--jacobian) of the model's ODE blocks in their last call; 0 if none."""
    values = [m.last_running_cost for m in model.modules() if isinstance(m, NeuralODE) and m.last_running_cost is not None]
    return sum(values) if values else 0.0


class DigitsTask(Task):
    name = "digits"
    description = "ODE classifier on scikit-learn's 8x8 handwritten digits (input layer, ODE block, affine, softmax)"
    defaults = dict(epochs=12, batch_size=64, lr=1e-2, lr_decay=0.8, hidden=32, rtol=1e-3, atol=1e-4, T=1.0,
                    gradient="backsolve")
    metrics = ("train_accuracy", "test_loss", "test_accuracy")
    headline = "test_accuracy"

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        digits = datasets.load_digits(self.dtype)
        device = ctx.device
        self.x_train, self.y_train = digits.x_train.to(device), digits.y_train.to(device)
        self.x_test, self.y_test = digits.x_test.to(device), digits.y_test.to(device)
        self.num_classes = digits.num_classes

    @property
    def spec(self):
        return {"in_features": self.x_train.shape[1], "num_classes": self.num_classes}

    @classmethod
    def make_model(cls, config, spec):
        return ODEClassifier(
            spec["in_features"], config.hidden, spec["num_classes"], T=config.T, **cls.solver_kwargs(config)
        )

    def epoch_batches(self, epoch: int) -> List[torch.Tensor]:
        c = self.config
        return datasets.epoch_batches(len(self.x_train), c.batch_size, c.seed, epoch, c.limit_batches)

    def batch_loss(self, model, batch):
        local = batch[shard(len(batch), self.ctx)].to(self.ctx.device)
        x, y = self.x_train[local], self.y_train[local]
        logits = model(x)
        loss_sum = F.cross_entropy(logits, y, reduction="sum")
        correct = (logits.detach().argmax(dim=1) == y).sum()
        # The regulariser is a mean over this process's samples: weighted by its share of the batch.
        loss = loss_sum / len(batch) + regularisation(model) * (len(local) / len(batch))
        return loss, {"loss": float(loss_sum.detach()), "correct": float(correct), "count": len(local)}

    def train_metrics(self, sums):
        count = max(sums["count"], 1)
        return {"train_loss": sums["loss"] / count, "train_accuracy": sums["correct"] / count}

    @torch.no_grad()
    def evaluate(self, model):
        part = shard(len(self.x_test), self.ctx)
        x, y = self.x_test[part], self.y_test[part]
        logits = model(x)
        loss, correct, count = all_sum(
            [F.cross_entropy(logits, y, reduction="sum"), (logits.argmax(dim=1) == y).sum(), len(y)], self.ctx
        )
        return {"test_loss": loss / count, "test_accuracy": correct / count}

    def plot(self, model, folder):
        from .plots import plot_hidden_pca, run_label

        n = min(300, len(self.x_test))
        t = torch.linspace(0.0, self.config.T, 41, dtype=self.dtype, device=self.ctx.device)
        with torch.no_grad():
            states = model.trajectory(self.x_test[:n], t)
        path = os.path.join(folder, "hidden_pca.png")
        plot_hidden_pca(t.cpu(), states.cpu(), self.y_test[:n].cpu(), path, run_label(self.config))
        return [path]


class CubicField(nn.Module):
    """``f(t, y) = W2 tanh(W1 y**3 + b1) + b2`` for ``y`` (..., 2): the network of the
    classic neural-ODE spiral example, which is shown the cubic features of the state."""

    def __init__(self, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 2))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(y**3)


class SpiralTask(Task):
    name = "spiral"
    description = "learn the dynamics of a 2-d spiral (cubic oscillator) from random sub-trajectories"
    # Sub-trajectories of 10 observations (0.25 time units): the backward solve lands on
    # every observation, so its cost grows with their number.
    defaults = dict(
        epochs=15, batch_size=32, lr=1e-2, lr_decay=0.8, hidden=50, rtol=1e-4, atol=1e-5, seq_len=10,
        iterations=50, gradient="backsolve",
    )
    metrics = ("trajectory_loss",)
    headline = "trajectory_loss"

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        spiral = datasets.load_spiral(self.dtype)
        self.t, self.y = spiral.t.to(ctx.device), spiral.y.to(ctx.device)
        if not 2 <= config.seq_len <= len(self.t):
            raise TrainingError(f"--seq-len must be between 2 and {len(self.t)}, got {config.seq_len}")

    @classmethod
    def make_model(cls, config, spec):
        return NeuralODE(CubicField(config.hidden), **cls.solver_kwargs(config))

    def epoch_batches(self, epoch: int) -> List[torch.Tensor]:
        c = self.config
        iterations = c.iterations if c.limit_batches <= 0 else min(c.iterations, c.limit_batches)
        return list(datasets.subtrajectory_batches(len(self.t), c.seq_len, c.batch_size, iterations, c.seed, epoch))

    def batch_loss(self, model, batch):
        L = self.config.seq_len
        starts = batch[shard(len(batch), self.ctx)].to(self.ctx.device)
        steps = torch.arange(L, device=self.ctx.device)
        target = self.y[starts[None, :] + steps[:, None]]  # (L, B_local, 2)
        # Time-invariant dynamics: every sub-trajectory uses the same relative times.
        t = self.t[:L] - self.t[0]
        pred = model(self.y[starts], t)  # (L, B_local, 2): a loss term at every observation
        loss_sum = (pred - target).abs().sum()
        per_batch = len(batch) * L * 2
        loss = loss_sum / per_batch + regularisation(model) * (len(starts) / len(batch))
        return loss, {"loss": float(loss_sum.detach()) / (L * 2), "count": len(starts)}

    @torch.no_grad()
    def predict(self, model) -> torch.Tensor:
        """The learned trajectory from y(0) at all observation times: (1000, 2)."""
        return model(self.y[0], self.t)

    def evaluate(self, model):
        """``trajectory_loss``: mean |learned - true| over all 1000 observations and both
        coordinates, the learned trajectory solved from the true y(0) alone."""
        pred = self.predict(model)
        return {"trajectory_loss": float((pred - self.y).abs().mean())}

    def plot(self, model, folder):
        from .plots import plot_spiral_trajectories, plot_vector_fields, run_label

        pred = self.predict(model)
        paths = [os.path.join(folder, "trajectories.png"), os.path.join(folder, "vector_field.png")]
        label = run_label(self.config)
        plot_spiral_trajectories(self.t.cpu(), self.y.cpu(), pred.cpu(), paths[0], label)
        field = model.func

        def learned(y):
            with torch.no_grad():
                return field(torch.zeros((), dtype=self.dtype, device=self.ctx.device), y.to(self.ctx.device, self.dtype)).cpu()

        plot_vector_fields(learned, lambda y: datasets.cubic_oscillator(None, y), self.y.cpu(), paths[1], label=label)
        return paths


# The tasks of their own files subclass Task: imported once it is defined.
from .tasks_cnf import CNFTask  # noqa: E402
from .tasks_latent import LatentTask  # noqa: E402

TASKS: Dict[str, type] = {task.name: task for task in (DigitsTask, SpiralTask, CNFTask, LatentTask)}


def load_trained(path: str, map_location="cpu") -> nn.Module:
    """The model saved at the end of a run (``OUT/model.pt`` or the folder ``OUT``).

    The file is read with ``torch.load(weights_only=True)``: one that holds anything but
    tensors and plain data is refused (:class:`TrainingError`), since loading it could run
    code stored in it."""
    from .checkpoint import FINAL_MODEL, MODEL_FORMAT, UnsafeFileError, safe_load
    from .config import FIELDS

    if os.path.isdir(path):
        path = os.path.join(path, FINAL_MODEL)
    try:
        record = safe_load(path, map_location=map_location)
    except UnsafeFileError as exc:
        raise TrainingError(f"refusing model file: {exc}") from None
    if not isinstance(record, dict) or record.get("format") != MODEL_FORMAT:
        raise TrainingError(f"{path} is not a model saved by torchadjoint train (no {MODEL_FORMAT!r} record)")
    config = TrainConfig(**{k: v for k, v in record["config"].items() if k in FIELDS})
    model = TASKS[config.task].make_model(config, record["spec"]).to(getattr(torch, config.dtype))
    model.load_state_dict(record["state_dict"])
    return model
