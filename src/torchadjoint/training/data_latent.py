"""Irregularly sampled, noisy trajectories of a family of dynamical systems, for the ``latent`` task.

The family: damped rotations in the plane, ``dx/dt = A x`` with
``A = [[-λ, -sω], [sω, -λ]]``, i.e. ``x(t) = r e^{-λt} (cos(sωt + φ), sin(sωt + φ))``, each
trajectory with its own random parameters: direction ``s = ±1``, angular speed
``ω ~ U[OMEGA]``, damping ``λ ~ U[DAMPING]``, radius ``r ~ U[RADIUS]``, phase ``φ ~ U[0, 2π)``.

Time: a grid of ``GRID_POINTS`` times on ``[0, T_END]``; the first ``OBSERVED_FRACTION``
of it is the observed window. Each trajectory is observed at its own random subset of the
window's grid times (each time with probability ``OBSERVE_PROBABILITY``, at least
``MIN_OBSERVED`` of them), with Gaussian noise of std ``NOISE_STD``. Nothing after the
window is ever observed: the models are trained on the window and asked to extrapolate.

The train and test sets come from fixed seeds (not ``--seed``): every run is scored on the
same test trajectories.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GRID_POINTS = 100
T_END = 10.0
OBSERVED_FRACTION = 0.5
OBSERVE_PROBABILITY = 0.4
MIN_OBSERVED = 4
NOISE_STD = 0.05
OMEGA = (0.6, 1.2)
DAMPING = (0.0, 0.15)
RADIUS = (0.7, 1.3)
TRAIN_SIZE, TEST_SIZE = 1000, 200
TRAIN_SEED, TEST_SEED = 20261130, 20261131


@dataclass
class Trajectories:
    """``t`` (G,) the time grid; ``truth`` (N, G, 2) noise-free states; ``values`` (N, G, 2)
    noisy observations (0 where not observed); ``mask`` (N, G) bool, True where observed
    (only inside the window); ``window`` the number of grid times in the observed window."""

    t: torch.Tensor
    truth: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor
    window: int

    def to(self, device=None, dtype=None) -> "Trajectories":
        return Trajectories(self.t.to(device, dtype), self.truth.to(device, dtype), self.values.to(device, dtype),
                            self.mask.to(device), self.window)


def time_grid(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.linspace(0.0, T_END, GRID_POINTS, dtype=dtype)


def damped_rotations(n: int, generator: torch.Generator) -> torch.Tensor:
    """True states of ``n`` random members of the family on the grid: (n, G, 2), float64."""
    def uniform(bounds):
        low, high = bounds
        return low + (high - low) * torch.rand(n, 1, generator=generator, dtype=torch.float64)

    direction = torch.randint(0, 2, (n, 1), generator=generator).to(torch.float64) * 2 - 1
    omega, damping, radius = uniform(OMEGA), uniform(DAMPING), uniform(RADIUS)
    phase = 2 * math.pi * torch.rand(n, 1, generator=generator, dtype=torch.float64)
    t = time_grid()[None]
    angle = direction * omega * t + phase
    amplitude = radius * torch.exp(-damping * t)
    return torch.stack([amplitude * angle.cos(), amplitude * angle.sin()], dim=-1)


def make_trajectories(n: int, seed: int) -> Trajectories:
    """``n`` trajectories with their own observation times and noise, from ``seed`` (float64)."""
    generator = torch.Generator().manual_seed(seed)
    truth = damped_rotations(n, generator)
    window = int(round(OBSERVED_FRACTION * GRID_POINTS))
    mask = torch.rand(n, GRID_POINTS, generator=generator) < OBSERVE_PROBABILITY
    mask[:, window:] = False
    # At least MIN_OBSERVED times per trajectory: the first ones of a random order of the window.
    for i in torch.nonzero(mask.sum(dim=1) < MIN_OBSERVED).flatten().tolist():
        mask[i, torch.randperm(window, generator=generator)[:MIN_OBSERVED]] = True
    noise = NOISE_STD * torch.randn(truth.shape, generator=generator, dtype=torch.float64)
    values = torch.where(mask[..., None], truth + noise, torch.zeros_like(truth))
    return Trajectories(time_grid(), truth, values, mask, window)


def load(dtype: torch.dtype = torch.float32):
    """The train and test sets, cast to ``dtype``."""
    return (make_trajectories(TRAIN_SIZE, TRAIN_SEED).to(dtype=dtype),
            make_trajectories(TEST_SIZE, TEST_SEED).to(dtype=dtype))
