"""Two-dimensional toy densities for the ``cnf`` task, each with its exact log-density.

Every density is a *known* distribution, so the negative log-likelihood of the data under
the true density can be computed on the very test points the flow is scored on, and the
gap between the two is what the flow has left to learn:

- ``8gaussians``: eight isotropic Gaussians (std ``0.5/√2``) centred on a circle of radius
  ``4/√2`` at angles ``kπ/4``, equal weights (the FFJORD toy set, in closed form).
- ``moons``: the two half-moons of scikit-learn's ``make_moons``, centred and scaled by 2,
  *defined* as a mixture of ``MOON_COMPONENTS`` Gaussians per moon, equally spaced in angle
  along each arc, std ``CURVE_STD``: a smooth density along the curves with a closed form.
- ``circles``: two concentric circles (radii 1.25 and 2.5), each a mixture of
  ``CIRCLE_COMPONENTS`` equally spaced Gaussians of std ``CURVE_STD``, half the mass each.
- ``checkerboard``: uniform on the 8 black squares (side 2) of a 4×4 board on
  ``[-4, 4]²``, convolved with an isotropic Gaussian of std ``CHECKER_STD`` (a sample is a
  uniform point plus that noise); the density is a sum of products of normal CDF
  differences, exact.

``sample(n, generator)`` draws ``(n, 2)`` points; ``log_prob(x)`` is ``(n,)`` in nats.
Log-densities are computed in float64 whatever the input dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict

import torch

CURVE_STD = 0.2
MOON_COMPONENTS = 64
CIRCLE_COMPONENTS = 96
CHECKER_STD = 0.1
CHECKER_SIDE = 2.0


@dataclass(frozen=True)
class GaussianMixture:
    """Equal-variance isotropic Gaussian mixture: ``means`` (K, 2), ``weights`` (K,), ``std``."""

    means: torch.Tensor
    weights: torch.Tensor
    std: float

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        return self.means[k] + self.std * torch.randn(n, 2, generator=generator, dtype=torch.float64)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float64)
        sq = (x[:, None, :] - self.means[None]).pow(2).sum(-1)  # (n, K)
        log_components = -sq / (2 * self.std**2) - math.log(2 * math.pi * self.std**2)
        return torch.logsumexp(log_components + self.weights.log()[None], dim=1)


@dataclass(frozen=True)
class SmoothedCheckerboard:
    """Uniform on squares ``lower`` (S, 2) + [0, side]², convolved with N(0, std² I)."""

    lower: torch.Tensor
    side: float
    std: float

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        k = torch.randint(0, len(self.lower), (n,), generator=generator)
        uniform = torch.rand(n, 2, generator=generator, dtype=torch.float64) * self.side
        return self.lower[k] + uniform + self.std * torch.randn(n, 2, generator=generator, dtype=torch.float64)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float64)[:, None, :]
        normal = torch.distributions.Normal(0.0, 1.0)
        # P(a < x - noise < b) per coordinate; log of a difference of CDFs, clamped away from 0.
        mass = normal.cdf((x - self.lower[None]) / self.std) - normal.cdf((x - self.lower[None] - self.side) / self.std)
        per_square = mass.clamp_min(1e-300).log().sum(-1)  # (n, S)
        area = len(self.lower) * self.side**2
        return torch.logsumexp(per_square, dim=1) - math.log(area)


def eight_gaussians() -> GaussianMixture:
    angles = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
    means = (4 / math.sqrt(2)) * torch.stack([angles.cos(), angles.sin()], dim=1)
    return GaussianMixture(means, torch.full((8,), 1 / 8, dtype=torch.float64), 0.5 / math.sqrt(2))


def moons() -> GaussianMixture:
    theta = torch.linspace(0, math.pi, MOON_COMPONENTS, dtype=torch.float64)
    upper = torch.stack([theta.cos(), theta.sin()], dim=1)
    lower = torch.stack([1 - theta.cos(), 0.5 - theta.sin()], dim=1)
    means = 2 * (torch.cat([upper, lower]) - torch.tensor([0.5, 0.25], dtype=torch.float64))
    return GaussianMixture(means, torch.full((2 * MOON_COMPONENTS,), 1 / (2 * MOON_COMPONENTS), dtype=torch.float64),
                           CURVE_STD)


def circles() -> GaussianMixture:
    theta = torch.arange(CIRCLE_COMPONENTS, dtype=torch.float64) * (2 * math.pi / CIRCLE_COMPONENTS)
    ring = torch.stack([theta.cos(), theta.sin()], dim=1)
    means = torch.cat([1.25 * ring, 2.5 * ring])
    return GaussianMixture(means, torch.full((2 * CIRCLE_COMPONENTS,), 1 / (2 * CIRCLE_COMPONENTS), dtype=torch.float64),
                           CURVE_STD)


def checkerboard() -> SmoothedCheckerboard:
    corners = [(x, y) for x in (-4.0, -2.0, 0.0, 2.0) for y in (-4.0, -2.0, 0.0, 2.0)
               if (int((x + 4) / 2) + int((y + 4) / 2)) % 2 == 0]
    return SmoothedCheckerboard(torch.tensor(corners, dtype=torch.float64), CHECKER_SIDE, CHECKER_STD)


DENSITIES: Dict[str, Callable] = {
    "8gaussians": eight_gaussians, "moons": moons, "circles": circles, "checkerboard": checkerboard,
}

# The held-out test set does not depend on --seed: runs with different seeds are scored on
# the same points (as the digits' split).
TEST_SEED = 20261129
TEST_SIZE = 4000


def density(name: str):
    if name not in DENSITIES:
        raise ValueError(f"unknown density {name!r}; choose from {sorted(DENSITIES)}")
    return DENSITIES[name]()


def test_set(name: str, size: int = TEST_SIZE) -> torch.Tensor:
    """The held-out test points of ``name`` (size, 2), float64, drawn from their own seed."""
    return density(name).sample(size, torch.Generator().manual_seed(TEST_SEED))
