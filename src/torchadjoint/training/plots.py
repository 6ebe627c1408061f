"""PNG figures of a run. Matplotlib's Agg canvas is used directly (no pyplot): no display is
needed and no global backend state of the user's session is touched."""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import torch

# What the spiral task's "trajectory loss" is, where a reader of its plots looks.
TRAJECTORY_LOSS = "trajectory loss: mean |learned − true| over the whole spiral, solved from y(0)"


def run_label(config) -> str:
    """One line naming the run: task, solver and its accuracy, gradient method (plot titles)."""
    from .loop import solver_text

    return f"{config.task} — solver {solver_text(config)}, gradient {config.gradient}"


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_curves(rows: Sequence[Dict[str, float]], path: str, label: str = "") -> str:
    """Loss per epoch (train and, where measured, test/trajectory), and accuracy if any;
    ``label`` (the run, see :func:`run_label`) as the figure's title."""
    epochs = [r["epoch"] for r in rows]
    accuracy_keys = [k for k in ("train_accuracy", "test_accuracy") if rows and rows[0].get(k) is not None]
    loss_keys = [k for k in ("train_loss", "test_loss", "trajectory_loss") if rows and rows[0].get(k) is not None]
    fig = _figure(10 if accuracy_keys else 5.5, 4)
    ax = fig.add_subplot(1, 2 if accuracy_keys else 1, 1)
    names = {"trajectory_loss": TRAJECTORY_LOSS, "train_loss": "train loss (mean over the epoch's batches)"}
    for key in loss_keys:
        ax.plot(epochs, [r[key] for r in rows], marker="o", label=names.get(key, key.replace("_", " ")))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if accuracy_keys:
        ax = fig.add_subplot(1, 2, 2)
        for key in accuracy_keys:
            ax.plot(epochs, [100 * r[key] for r in rows], marker="o", label=key.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    if label:
        fig.suptitle(label, fontsize=10)
    return _save(fig, path)


def plot_nfe(iterations: Sequence[Dict[str, float]], path: str, label: str = "", resumes: Sequence[int] = ()) -> str:
    """Forward and backward function evaluations at every training iteration; a red dashed
    line after each iteration in ``resumes`` (where the run was resumed)."""
    fig = _figure(7, 4)
    ax = fig.add_subplot(1, 1, 1)
    x = list(range(1, len(iterations) + 1))
    ax.plot(x, [r["nfe_forward"] for r in iterations], label="forward", lw=1)
    ax.plot(x, [r["nfe_backward"] for r in iterations], label="backward", lw=1)
    boundaries = [i for i in range(1, len(iterations)) if iterations[i]["epoch"] != iterations[i - 1]["epoch"]]
    for b in boundaries:
        ax.axvline(b + 0.5, color="0.85", lw=0.8, zorder=0)
    for k, r in enumerate(resumes):
        ax.axvline(r + 0.5, color="tab:red", ls="--", lw=1.0, label="resumed" if k == 0 else None)
    ax.set_xlabel("iteration (grey lines: epochs)")
    ax.set_ylabel("function evaluations")
    ax.set_title(f"function evaluations per iteration\n{label}" if label else "function evaluations per iteration",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_spiral_trajectories(t: torch.Tensor, true: torch.Tensor, learned: torch.Tensor, path: str, label: str = "") -> str:
    """Phase plane and both coordinates over time: ``t`` (N,), ``true``/``learned`` (N, 2);
    each coordinate has one colour, true solid and learned dashed."""
    fig = _figure(12, 4)
    ax = fig.add_subplot(1, 2, 1)
    ax.plot(true[:, 0], true[:, 1], "-", color="tab:green", lw=2.2, alpha=0.6, label="true")
    ax.plot(learned[:, 0], learned[:, 1], "k--", lw=1.1, label="learned")
    ax.set_xlabel("y1")
    ax.set_ylabel("y2")
    ax.set_title("phase plane")
    ax.set_aspect("equal", adjustable="datalim")
    ax.legend()
    ax = fig.add_subplot(1, 2, 2)
    for i, color in enumerate(("tab:green", "tab:orange")):
        ax.plot(t, true[:, i], "-", color=color, lw=2.2, alpha=0.5, label=f"y{i + 1} true")
        ax.plot(t, learned[:, i], "--", color=color, lw=1.2, label=f"y{i + 1} learned")
    ax.set_xlabel("t")
    error = float((learned - true).abs().mean())
    ax.set_title(f"trajectories from y(0) (trajectory loss {error:.3g})")
    ax.legend(ncol=2, fontsize=8)
    if label:
        fig.suptitle(label, fontsize=10)
    return _save(fig, path)


def plot_vector_fields(learned: Callable, true: Callable, trajectory: torch.Tensor, path: str, size: int = 21,
                       label: str = "") -> str:
    """The learned and the true vector field on a grid around the data (``trajectory`` (N, 2),
    drawn in green on both)."""
    lim = float(trajectory.abs().max()) * 1.1
    axis = torch.linspace(-lim, lim, size)
    g1, g2 = torch.meshgrid(axis, axis, indexing="xy")
    points = torch.stack([g1.reshape(-1), g2.reshape(-1)], dim=1)
    fig = _figure(11, 5)
    for k, (name, field) in enumerate((("learned", learned), ("true", true))):
        v = field(points.to(trajectory.dtype)).reshape(size, size, 2)
        ax = fig.add_subplot(1, 2, k + 1)
        ax.streamplot(axis.numpy(), axis.numpy(), v[..., 0].numpy(), v[..., 1].numpy(), color="0.5", density=1.0)
        ax.plot([], [], "-", color="0.5", label=f"{name} vector field (streamlines)")
        ax.plot(trajectory[:, 0], trajectory[:, 1], "g-", lw=1, alpha=0.7, label="observed data (true trajectory)")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_title(f"{name} vector field")
        ax.set_xlabel("y1")
        ax.set_ylabel("y2")
        ax.legend(loc="lower left", fontsize=7)
    if label:
        fig.suptitle(label, fontsize=10)
    return _save(fig, path)


def plot_hidden_pca(t: torch.Tensor, states: torch.Tensor, labels: torch.Tensor, path: str, label: str = "") -> str:
    """Hidden-state trajectories ``states`` (N times, B examples, H) projected on their two
    principal components, coloured by class ``labels`` (B,)."""
    N, B, H = states.shape
    flat = states.reshape(N * B, H).double()
    centred = flat - flat.mean(dim=0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    proj = (centred @ v[:2].T).reshape(N, B, 2)
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    fig = _figure(7, 6)
    ax = fig.add_subplot(1, 1, 1)
    for b in range(B):
        color = cmap(int(labels[b]) % 10)
        ax.plot(proj[:, b, 0], proj[:, b, 1], "-", color=color, lw=0.6, alpha=0.5)
        ax.plot(proj[-1, b, 0], proj[-1, b, 1], "o", color=color, ms=3)
    for c in range(int(labels.max()) + 1):
        ax.plot([], [], "o-", color=cmap(c % 10), label=str(c))
    ax.set_title(f"hidden state y(t), t in [{float(t[0]):g}, {float(t[-1]):g}] (PCA; dots: y(T))")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(title="digit", fontsize=8, ncol=2)
    if label:
        fig.suptitle(label, fontsize=10)
    return _save(fig, path)


def plot_run(rows: Sequence[Dict[str, float]], iterations: Sequence[Dict[str, float]], folder: str, label: str = "",
             resumes: Sequence[int] = ()) -> List[str]:
    """The plots every task gets: ``curves.png`` and ``nfe.png`` (``label``: the run, in titles)."""
    import os

    paths = []
    if rows:
        paths.append(plot_curves(rows, os.path.join(folder, "curves.png"), label))
    if iterations:
        paths.append(plot_nfe(iterations, os.path.join(folder, "nfe.png"), label, resumes))
    return paths
