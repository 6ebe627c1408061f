"""PNG figures of the ``cnf`` task (the Agg canvas helpers of :mod:`.plots`)."""
from __future__ import annotations

from typing import Callable, Tuple

import torch

from .plots import _figure, _save

LIMIT = 5.0  # the plotted square [-LIMIT, LIMIT]² holds (nearly) all the mass of every density
GRID = 120


def _grid() -> Tuple[torch.Tensor, torch.Tensor]:
    axis = torch.linspace(-LIMIT, LIMIT, GRID, dtype=torch.float64)
    g1, g2 = torch.meshgrid(axis, axis, indexing="xy")
    return axis, torch.stack([g1.reshape(-1), g2.reshape(-1)], dim=1)


def plot_densities(learned_log_prob: Callable, true_log_prob: Callable, data: torch.Tensor, path: str,
                   label: str = "") -> Tuple[float, float]:
    """Data points (N, 2), the true density and the learned one as heat maps on the same
    square and colour scale. Returns the mass each density puts on the square (a check:
    about 1 for a flow whose log-determinant matches its map)."""
    axis, points = _grid()
    cell = float(axis[1] - axis[0]) ** 2
    with torch.no_grad():
        learned = torch.cat([learned_log_prob(chunk) for chunk in points.split(4096)]).exp().reshape(GRID, GRID)
    true = true_log_prob(points).exp().reshape(GRID, GRID)
    fig = _figure(14, 4.6)
    top = float(true.max())
    extent = (-LIMIT, LIMIT, -LIMIT, LIMIT)
    ax = fig.add_subplot(1, 3, 1)
    ax.scatter(data[:, 0], data[:, 1], s=1, alpha=0.4, color="k")
    ax.set_title(f"data ({len(data)} samples)")
    for k, (title, values) in enumerate((("true density", true), ("learned density (exact trace)", learned))):
        ax = fig.add_subplot(1, 3, k + 2)
        ax.imshow(values.numpy(), origin="lower", extent=extent, cmap="viridis", vmin=0.0, vmax=top)
        ax.set_title(title)
    for ax in fig.axes:
        ax.set_xlim(-LIMIT, LIMIT)
        ax.set_ylim(-LIMIT, LIMIT)
        ax.set_aspect("equal")
    if label:
        fig.suptitle(label, fontsize=10)
    _save(fig, path)
    return float(learned.sum()) * cell, float(true.sum()) * cell


def plot_samples(data: torch.Tensor, samples: torch.Tensor, path: str, label: str = "") -> str:
    """Data (N, 2) beside samples (M, 2) pushed from the base distribution through the flow."""
    fig = _figure(9.5, 4.6)
    for k, (title, points) in enumerate((("data", data), ("samples: N(0, I) pushed through the flow", samples))):
        ax = fig.add_subplot(1, 2, k + 1)
        ax.scatter(points[:, 0], points[:, 1], s=1, alpha=0.4, color="k" if k == 0 else "tab:blue")
        ax.set_title(title)
        ax.set_xlim(-LIMIT, LIMIT)
        ax.set_ylim(-LIMIT, LIMIT)
        ax.set_aspect("equal")
    if label:
        fig.suptitle(label, fontsize=10)
    return _save(fig, path)


def plot_flow(times: torch.Tensor, states: torch.Tensor, path: str, label: str = "") -> str:
    """The same samples at ``times`` (K,) from the base (t = T) to the data (t = 0):
    ``states`` (K, M, 2); colour marks each sample's starting angle, to follow it."""
    K = len(times)
    fig = _figure(2.6 * K, 3.0)
    colour = torch.atan2(states[0, :, 1], states[0, :, 0])
    for k in range(K):
        ax = fig.add_subplot(1, K, k + 1)
        ax.scatter(states[k, :, 0], states[k, :, 1], s=1, c=colour.numpy(), cmap="hsv", alpha=0.6)
        ax.set_title(f"t = {float(times[k]):.2g}" + (" (base)" if k == 0 else " (data)" if k == K - 1 else ""))
        ax.set_xlim(-LIMIT, LIMIT)
        ax.set_ylim(-LIMIT, LIMIT)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    if label:
        fig.suptitle(label, fontsize=10)
    return _save(fig, path)
