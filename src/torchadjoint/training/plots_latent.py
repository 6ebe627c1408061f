"""PNG figures of the ``latent`` task (the Agg canvas helpers of :mod:`.plots`)."""
from __future__ import annotations

import torch

from .plots import _figure, _save


def plot_reconstructions(t, t_window, truth, values, mask, samples, latent, gru, path: str, label: str = "") -> str:
    """One row per test trajectory, one column per coordinate: the observed points, the true
    curve, the latent ODE's posterior-mean prediction with a band of ±2 std over posterior
    samples, and the GRU baseline. ``t`` (G,); ``truth``, ``latent``, ``gru`` (B, G, 2);
    ``values``/``mask`` the window's observations (B, W, 2)/(B, W); ``samples`` (S, B, G, 2)."""
    B = truth.shape[0]
    fig = _figure(11, 2.4 * B)
    mean, spread = samples.mean(dim=0), samples.std(dim=0)
    for b in range(B):
        seen = mask[b]
        for d in range(2):
            ax = fig.add_subplot(B, 2, 2 * b + d + 1)
            ax.axvspan(float(t[0]), t_window, color="0.93", zorder=0)
            ax.plot(t, truth[b, :, d], color="tab:green", lw=2, alpha=0.5, label="truth")
            ax.fill_between(t, mean[b, :, d] - 2 * spread[b, :, d], mean[b, :, d] + 2 * spread[b, :, d],
                            color="tab:blue", alpha=0.2, lw=0, label="latent ODE ±2 std (posterior)")
            ax.plot(t, latent[b, :, d], color="tab:blue", lw=1.2, label="latent ODE")
            ax.plot(t, gru[b, :, d], color="tab:red", lw=1.0, ls="--", label="GRU baseline")
            window_t = t[: mask.shape[1]]
            ax.plot(window_t[seen], values[b, seen, d], "k.", ms=4, label="observed")
            ax.set_ylabel(f"trajectory {b + 1}: x{d + 1}")
            if b == 0 and d == 0:
                ax.legend(fontsize=7, loc="lower left", ncol=2)
            if b == B - 1:
                ax.set_xlabel("t (shaded: observed window; after it: extrapolation)")
    if label:
        fig.suptitle(label, fontsize=10)
    return _save(fig, path)


def plot_latent_trajectories(t, zs, window: int, path: str, label: str = "") -> str:
    """Latent states ``zs`` (G, B, latent) of a few test trajectories projected on their two
    principal components; solid inside the observed window, dotted after it."""
    G, B, L = zs.shape
    flat = zs.reshape(G * B, L).double()
    centred = flat - flat.mean(dim=0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    proj = (centred @ v[:2].T).reshape(G, B, 2)
    fig = _figure(6, 5.5)
    ax = fig.add_subplot(1, 1, 1)
    for b in range(B):
        line, = ax.plot(proj[:window, b, 0], proj[:window, b, 1], "-", lw=1.4, label=f"trajectory {b + 1}")
        ax.plot(proj[window - 1:, b, 0], proj[window - 1:, b, 1], ":", lw=1.2, color=line.get_color())
        ax.plot(proj[0, b, 0], proj[0, b, 1], "o", color=line.get_color(), ms=4)
    ax.set_title(f"latent z(t), t in [{float(t[0]):g}, {float(t[-1]):g}] (PCA; dot: z0; dotted: extrapolation)")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=8)
    if label:
        fig.suptitle(label, fontsize=10)
    return _save(fig, path)
