"""Built-in data sets and the order they are visited in.

Every random choice about data (shuffling, sub-trajectory starts) is drawn from a
generator seeded by ``(seed, epoch)``, never from the global RNG: epoch ``e`` visits the
same batches whether the run was interrupted before it or not, and whatever the number
of processes (each process takes its share of the same global batch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List

import torch

# The split of the digits into train and test does not depend on --seed: test accuracies of
# runs with different seeds are measured on the same images.
DIGITS_SPLIT_SEED = 20240229
DIGITS_TEST_FRACTION = 0.2

SPIRAL_A = ((-0.1, 2.0), (-2.0, -0.1))
SPIRAL_Y0 = (2.0, 0.0)
SPIRAL_T_END = 25.0
SPIRAL_POINTS = 1000


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A generator for one epoch's random choices, a pure function of its arguments."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 7 + stream)


@dataclass
class Digits:
    """scikit-learn's bundled 8×8 handwritten digits, pixels scaled to [0, 1].

    ``x_train`` (1437, 64), ``y_train`` (1437,) int64 labels 0–9; ``x_test`` (360, 64),
    ``y_test`` (360,).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    num_classes = 10


def load_digits(dtype: torch.dtype = torch.float32) -> Digits:
    """Load the digits (bundled with scikit-learn: no download) and split them 80/20."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:  # pragma: no cover - depends on the installation
        raise RuntimeError(
            'the digits task needs scikit-learn: pip install -e ".[examples]" (or pip install scikit-learn)'
        ) from None
    images, labels = sklearn_digits(return_X_y=True)
    x = torch.as_tensor(images, dtype=dtype) / 16.0
    y = torch.as_tensor(labels, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    n_test = int(round(DIGITS_TEST_FRACTION * len(x)))
    test, train = order[:n_test], order[n_test:]
    return Digits(x[train], y[train], x[test], y[test])


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, limit: int = 0) -> List[torch.Tensor]:
    """Shuffled index batches (each (batch_size,)) of one epoch over ``n`` examples.

    The last incomplete batch is dropped (every step sees a full global batch, so the
    loss scale does not depend on where the data ends); the shuffling differs per epoch,
    so every example is still visited. ``limit > 0`` keeps only the first ``limit`` batches.
    """
    order = torch.randperm(n, generator=epoch_generator(seed, epoch))
    batches = list(order[: n - n % batch_size].split(batch_size)) if n >= batch_size else [order]
    return batches[:limit] if limit > 0 else batches


@dataclass
class Spiral:
    """The cubic oscillator ``dy/dt = (y**3) A``, ``y(0) = (2, 0)``, observed at
    ``SPIRAL_POINTS`` times on ``[0, SPIRAL_T_END]``: ``t`` (1000,), ``y`` (1000, 2)."""

    t: torch.Tensor
    y: torch.Tensor


def cubic_oscillator(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The true dynamics: ``y`` (..., 2) -> ``(y**3) A`` (..., 2)."""
    A = torch.tensor(SPIRAL_A, dtype=y.dtype, device=y.device)
    return (y**3) @ A


def load_spiral(dtype: torch.dtype = torch.float32) -> Spiral:
    """Generate the observations with the library's own solver (dopri5, tight tolerances,
    in float64), then cast to ``dtype``."""
    from ..solve import solve

    t = torch.linspace(0.0, SPIRAL_T_END, SPIRAL_POINTS, dtype=torch.float64)
    y0 = torch.tensor(SPIRAL_Y0, dtype=torch.float64)
    with torch.no_grad():
        ys = solve(cubic_oscillator, y0, t, method="dopri5", rtol=1e-9, atol=1e-10).ys
    return Spiral(t.to(dtype), ys.to(dtype))


def subtrajectory_batches(
    n_points: int, length: int, batch_size: int, iterations: int, seed: int, epoch: int
) -> Iterator[torch.Tensor]:
    """Random start indices of sub-trajectories, ``iterations`` batches of (batch_size,)
    indices in ``[0, n_points - length]``."""
    generator = epoch_generator(seed, epoch)
    for _ in range(iterations):
        yield torch.randint(0, n_points - length + 1, (batch_size,), generator=generator)
