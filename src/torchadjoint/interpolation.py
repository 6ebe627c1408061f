"""Dense output: the state at times inside an accepted step, without shortening it.

Every interpolant here is ``y(t0 + θh) = y0 + h W(θ) @ K`` with weights polynomial in ``θ``:
``W(θ) = [θ, θ², …, θ^P] @ Dᵀ`` for a matrix ``D`` (s', P) (:func:`weight_polynomials`),
the tableau's continuous extension or cubic Hermite through ``y0, y1, f0, f1``.

Two evaluators of the same ``D``:

- :class:`DenseOutput`, for the integration loop's outputs (up to thousands per solve, tens
  per step): the fractions and weights are computed in float64 with numpy on the host, the
  states in ONE torch product per step (:meth:`~DenseOutput.states`) or per batch of steps
  (:meth:`~DenseOutput.states_of_steps`). Each eager op costs microseconds of dispatch
  whatever its size (more between two compiled steps, whose code evicts the caches): the
  torch version below, a dozen ops a step, cost ~50 µs a step on benchmark problem 1, as
  much as the compiled step itself.
- :func:`interpolate` / :func:`dense_weights`, torch throughout, for the one-off states of
  the checkpointed adjoint, the event search and the quadrature's nodes.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch

from .tableaux.base import TableauTensors


def _hermite_polynomials(b: torch.Tensor) -> torch.Tensor:
    """Cubic Hermite through y0, y1, f0, f1 as ``D`` (s + 1, 3) over ``[k_1 … k_s, f1]``.

    With ``y1 - y0 = h Σ b_i k_i`` and ``f0 = k_1``: ``y(θ) = y0 + (3θ² - 2θ³)(y1 - y0)
    + h (θ - 2θ² + θ³) f0 + h (θ³ - θ²) f1``; the rows hold these coefficients of θ, θ², θ³."""
    s = b.shape[0]
    d = b.new_zeros(s + 1, 3)
    d[:s, 1], d[:s, 2] = 3 * b, -2 * b  # (y1 - y0)'s share
    d[0] += torch.tensor([1.0, -2.0, 1.0], dtype=b.dtype, device=b.device)  # f0 = k_1
    d[s] = torch.tensor([0.0, -1.0, 1.0], dtype=b.dtype, device=b.device)  # f1
    return d


def weight_polynomials(coeffs: TableauTensors) -> torch.Tensor:
    """``D`` (s', P): the weight of ``K_j`` at ``θ`` is ``Σ_p D[j, p] θ^(p+1)``.

    ``s' = s`` for FSAL methods with their own continuous extension (``K`` = stages),
    ``s + 1`` otherwise (``K`` = stages with ``f1`` appended)."""
    return _hermite_polynomials(coeffs.b) if coeffs.dense is None else coeffs.dense


def dense_weights(coeffs: TableauTensors, theta: torch.Tensor) -> torch.Tensor:
    """Weights ``W`` (m, s') so that ``y(t0 + θh) = y0 + h W @ K`` for fractions ``θ`` (m,)."""
    d = weight_polynomials(coeffs)
    # θ, θ², …, θ^P as one running product (one op, not P powers and a stack).
    powers = theta[:, None].expand(-1, d.shape[1]).cumprod(dim=1)
    return powers @ d.T


def interpolate(
    coeffs: TableauTensors,
    y0: torch.Tensor,
    y1: torch.Tensor,
    stages: torch.Tensor,
    f1: Optional[torch.Tensor],
    h: float,
    fractions: Sequence[float],
    linear: bool = False,
) -> torch.Tensor:
    """States at ``t0 + θh`` for each ``θ`` in ``fractions`` (in [0, 1]): shape (m, n).

    ``f1`` (n,) must be given when the weights need it (``dense_weights`` has s + 1
    columns). ``linear=True`` interpolates linearly between ``y0`` and ``y1``.
    """
    theta = torch.tensor(fractions, dtype=y0.dtype, device=y0.device)
    if linear:
        return torch.lerp(y0[None, :], y1[None, :], theta[:, None])
    w = dense_weights(coeffs, theta)
    k = stages if w.shape[1] == stages.shape[0] else torch.cat([stages, f1[None, :]])
    return torch.addmm(y0[None, :], w, k, alpha=h)


def needs_f1(coeffs: TableauTensors, stages: int) -> bool:
    """Whether :func:`interpolate` needs ``f(t1, y1)`` for this tableau."""
    return coeffs.dense is None or coeffs.dense.shape[0] > stages


def host_weight_polynomials(tableau) -> np.ndarray:
    """:func:`weight_polynomials` in float64 numpy, from the tableau's own numbers.

    Not from ``tableau.as_tensors``: under ``torch.func`` transforms every tensor made is a
    wrapper without storage, which numpy cannot read. Mirrors the tableaux's casts: an FSAL
    method's ``f1`` is its last stage, so the row of ``f1`` is folded into it
    (:meth:`~torchadjoint.tableaux.base.ButcherTableau.as_tensors`; a test checks the two agree)."""
    if tableau.dense is None:
        b = np.asarray(tableau.b, dtype=np.float64)
        d = np.zeros((b.shape[0] + 1, 3))
        d[:-1, 1], d[:-1, 2] = 3 * b, -2 * b  # as _hermite_polynomials
        d[0] += (1.0, -2.0, 1.0)
        d[-1] = (0.0, -1.0, 1.0)
        return d
    d = np.array(tableau.dense, dtype=np.float64)
    if tableau.fsal:
        d = np.concatenate([d[:-2], d[-2:-1] + d[-1:]])
    return d


# The numpy dtype a weight matrix is rounded to on the host (no torch op for the cast).
_NUMPY_DTYPES = {torch.float64: np.float64, torch.float32: np.float32}


class DenseOutput:
    """One solve's interpolant for many fractions at once (see the module docstring).

    ``tableau``: the method; ``dtype``/``device``: the state's. The weights are computed in
    float64 from the tableau's float64 coefficients and rounded once to ``dtype`` (never less
    accurate than evaluating them in ``dtype``). Nothing is differentiated through the
    weights: fractions and ``h`` are host floats, as they always were.
    """

    def __init__(self, tableau, dtype: torch.dtype, device: torch.device, linear: bool = False):
        self.linear, self.dtype, self.device = linear, dtype, torch.device(device)
        polynomials = host_weight_polynomials(tableau)
        self.needs_f1 = polynomials.shape[0] > tableau.stages and not linear
        self._polynomials_t = np.ascontiguousarray(polynomials.T)  # (P, s')
        self._columns = polynomials.shape[0]
        self._numpy_dtype = _NUMPY_DTYPES.get(dtype)
        self._on_host = self.device.type == "cpu"

    def weights(self, fractions: np.ndarray) -> np.ndarray:
        """``W`` (..., s') float64 for fractions ``θ`` (...): ``y(t0 + θh) = y0 + h W @ K``."""
        theta = fractions.reshape(-1)
        # θ, θ², … by running products (a float power is ~5x slower), into one 2-D array for
        # one 2-D product (numpy's stacked matmul would loop over the leading axes).
        powers = np.empty((theta.shape[0], self._polynomials_t.shape[0]))
        powers[:, 0] = theta
        for p in range(1, powers.shape[1]):
            np.multiply(powers[:, p - 1], theta, out=powers[:, p])
        return (powers @ self._polynomials_t).reshape(*fractions.shape, self._columns)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        """``array`` (float64) as a tensor of the state's dtype on its device: a host-side
        rounding and at most one copy to the device."""
        if self._numpy_dtype is None:  # no numpy twin (bfloat16): round in torch
            tensor = torch.from_numpy(array).to(self.dtype)
        else:
            tensor = torch.from_numpy(array.astype(self._numpy_dtype, copy=False))
        # From pageable memory the copy has read `array` when it returns (CUDA stages it),
        # so it need not wait for the device.
        return tensor if self._on_host else tensor.to(self.device, non_blocking=True)

    def states(self, y0: torch.Tensor, y1: torch.Tensor, stages: torch.Tensor, f1: Optional[torch.Tensor],
               h: float, fractions: np.ndarray, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """States (m, n) at ``t0 + θh`` for ``θ`` in ``fractions`` (m,) float64, from the step
        ``(y0, y1)`` (n,) with ``stages`` (s, n) and, where :attr:`needs_f1`, ``f1`` (n,).
        ``out``: an (m, n) tensor to write them into (the loop's output buffer)."""
        if self.linear:
            return torch.lerp(y0, y1, self._tensor(fractions[:, None]), out=out)
        # h goes into the weights in float64: one rounding less than alpha=h in dtype.
        w = self._tensor(self.weights(fractions) * h)
        k = stages if self._columns == stages.shape[0] else torch.cat([stages, f1[None, :]])
        return torch.addmm(y0, w, k) if out is None else torch.addmm(y0, w, k, out=out)

    def states_of_steps(self, y0s: Sequence[torch.Tensor], stages: Sequence[torch.Tensor],
                        f1s: Sequence[Optional[torch.Tensor]], hs: np.ndarray, fractions: np.ndarray) -> torch.Tensor:
        """:meth:`states` of ``c`` steps in one batched product: (c, m, n), step ``i``'s states
        at its fractions ``fractions[i]`` ((c, m) float64; a step with fewer than ``m`` pads
        its row with any fraction in [0, 1]). Step ``i`` is ``y0s[i]`` (n,), ``stages[i]``
        (s, n), ``f1s[i]`` (n,) or None, ``hs[i]``; ``y0s``, ``stages`` and ``f1s`` may also
        come stacked, as (c, n), (c, s, n) and (c, n) tensors. Not for ``linear``."""
        w = self.weights(fractions) * hs[:, None, None]  # (c, m, s')
        k = stages if isinstance(stages, torch.Tensor) else torch.stack(list(stages))
        if self._columns != k.shape[1]:
            f1s = f1s if isinstance(f1s, torch.Tensor) else torch.stack(list(f1s))
            k = torch.cat([k, f1s[:, None, :]], dim=1)
        y0s = y0s if isinstance(y0s, torch.Tensor) else torch.stack(list(y0s))
        return torch.baddbmm(y0s[:, None, :], self._tensor(w), k)


class Placement(NamedTuple):
    """Where output rows fall among ``c`` consecutive steps (see :func:`place_outputs`).

    ``last`` (c,): rows ``j0 … last[i] - 1`` lie up to step ``i``'s end; ``on_end`` (c,):
    row ``last[i] - 1`` lies on that end; ``steps`` (k,): the steps with rows strictly
    inside, whose rows are ``window`` (k, m), padded with the rows that follow them (clipped
    to the last row) where ``kept`` (k, m) is False; ``fractions`` (k, m) their θ (padding
    clipped to 1); ``hs`` (k,) the steps' lengths."""

    last: np.ndarray
    on_end: np.ndarray
    steps: np.ndarray
    window: np.ndarray
    kept: np.ndarray
    fractions: np.ndarray
    hs: np.ndarray


def place_outputs(out_s: np.ndarray, keys: np.ndarray, direction: float, starts: np.ndarray, j0: int) -> Placement:
    """The rows ``j0 …`` of outputs at ``out_s`` (N,) float64 (``keys``: ``direction * out_s``,
    increasing) among the steps from ``starts[i]`` to ``starts[i + 1]`` ((c + 1,) float64,
    along ``direction``): which step each lies in, and its fraction of it. Each step's rows
    padded to the longest (no scatter into a ragged array), as :meth:`DenseOutput.states_of_steps`
    takes them."""
    begins, ends = starts[:-1], starts[1:]
    last = j0 + np.searchsorted(keys[j0:], direction * ends, side="right")
    first = np.empty_like(last)
    first[0], first[1:] = j0, last[:-1]
    on_end = (last > first) & (out_s[np.maximum(last - 1, 0)] == ends)
    inside = last - on_end - first  # rows strictly inside step i
    steps = np.flatnonzero(inside)
    place = np.arange(int(inside[steps].max()) if steps.size else 0)
    window = np.minimum(first[steps, None] + place, len(out_s) - 1)
    hs = (ends - begins)[steps]
    fractions = np.minimum((out_s[window] - begins[steps, None]) / hs[:, None], 1.0)
    return Placement(last, on_end, steps, window, place < inside[steps, None], fractions, hs)
