"""Runge–Kutta order conditions (Butcher's rooted trees), and continuous extensions built from them.

A method with stages ``K_j = f(t0 + c_j h, y0 + h Σ_l a_jl K_l)`` and output
``y0 + h Σ_j w_j K_j`` matches the Taylor series of the exact solution at ``t0 + θh`` up to
order ``q`` exactly when, for every rooted tree ``t`` with ``|t| ≤ q`` nodes,

    Σ_j w_j Φ_j(t) = θ^|t| / γ(t),

where ``Φ_j`` is the elementary weight of stage ``j`` (``Φ_j(•) = 1``; for
``t = [t_1 … t_m]``, ``Φ_j(t) = Π_i (A Φ(t_i))_j``) and ``γ`` the tree's density
(Hairer, Nørsett & Wanner, *Solving ODEs I*, §II.2). With ``θ = 1`` these are the
conditions on ``b``; for ``θ ∈ (0, 1)`` on a dense output.

Trees are nested sorted tuples of their root's subtrees: ``()`` is the single node.
Everything is float64 NumPy (it runs once, when a tableau is built).
"""
from __future__ import annotations

import functools
import itertools
import math
from collections import Counter
from typing import Callable, List, Sequence, Tuple

import numpy as np

Tree = tuple


@functools.lru_cache(maxsize=None)
def rooted_trees(n: int) -> Tuple[Tree, ...]:
    """All rooted trees with ``n`` nodes (1, 1, 2, 4, 9, 20, 48, 115, … of them)."""
    if n < 1:
        raise ValueError(f"a tree has at least one node, got n={n}")
    if n == 1:
        return ((),)
    found = set()
    for sizes in _partitions(n - 1, n - 1):
        for children in itertools.product(*(rooted_trees(k) for k in sizes)):
            found.add(tuple(sorted(children)))
    return tuple(sorted(found))


def _partitions(m: int, largest: int):
    if m == 0:
        yield ()
        return
    for part in range(min(m, largest), 0, -1):
        for rest in _partitions(m - part, part):
            yield (part,) + rest


@functools.lru_cache(maxsize=None)
def tree_order(t: Tree) -> int:
    """Number of nodes ``|t|``."""
    return 1 + sum(tree_order(child) for child in t)


@functools.lru_cache(maxsize=None)
def tree_density(t: Tree) -> int:
    """``γ(t)``: ``|t|`` times the densities of the subtrees."""
    return tree_order(t) * math.prod(tree_density(child) for child in t)


@functools.lru_cache(maxsize=None)
def tree_symmetry(t: Tree) -> int:
    """``σ(t)``: order of the tree's automorphism group."""
    return math.prod(math.factorial(k) * tree_symmetry(child) ** k for child, k in Counter(t).items())


def trees_up_to(order: int) -> List[Tree]:
    return [t for n in range(1, order + 1) for t in rooted_trees(n)]


def elementary_weights(a: np.ndarray) -> Callable[[Tree], np.ndarray]:
    """``Φ(t)``: (s,) elementary weights of every stage for the stage matrix ``a`` (s, s).

    The nodes ``c`` enter through ``A·1 = c`` (the tableau checks its rows sum to ``c``)."""
    a = np.asarray(a, dtype=np.float64)

    @functools.lru_cache(maxsize=None)
    def phi(t: Tree) -> np.ndarray:
        v = np.ones(a.shape[0])
        for child in t:
            v = v * (a @ phi(child))
        return v

    return phi


def order_residuals(a: np.ndarray, weights: np.ndarray, max_order: int, theta: float = 1.0) -> List[float]:
    """Largest ``|Σ_j w_j Φ_j(t) - θ^|t|/γ(t)|`` over the trees of each order 1 … ``max_order``."""
    phi = elementary_weights(a)
    weights = np.asarray(weights, dtype=np.float64)
    return [
        max(abs(float(weights @ phi(t)) - theta**n / tree_density(t)) for t in rooted_trees(n))
        for n in range(1, max_order + 1)
    ]


def satisfied_order(a: np.ndarray, weights: np.ndarray, max_order: int = 10, theta: float = 1.0, tol: float = 1e-10) -> int:
    """The largest ``q ≤ max_order`` such that the weights satisfy every condition up to order ``q``."""
    q = 0
    for residual in order_residuals(a, weights, max_order, theta):
        if residual > tol:
            break
        q += 1
    return q


def stage_matrix(a_rows: Sequence[Sequence[float]]) -> np.ndarray:
    """The (s, s) strictly lower-triangular matrix from a tableau's rows."""
    s = len(a_rows)
    a = np.zeros((s, s))
    for i, row in enumerate(a_rows):
        a[i, :i] = row
    return a


def continuous_extension(a_rows: Sequence[Sequence[float]], b: Sequence[float], order: int, degree: int) -> tuple:
    """:func:`continuous_extension_of_matrix` for an explicit method given by its rows
    (row ``i`` has ``i`` entries)."""
    return continuous_extension_of_matrix(stage_matrix(a_rows), b, order, degree)


def continuous_extension_of_matrix(a_matrix: np.ndarray, b: Sequence[float], order: int, degree: int) -> tuple:
    """Dense-output matrix ``D`` (s + 1, degree) of a continuous extension over the stages
    ``K = [k_1 … k_s, f(t0 + h, y1)]``: ``y(t0 + θh) ≈ y0 + h Σ_j (Σ_p D[j, p] θ^(p+1)) K_j``.

    The weights ``w(θ) = Σ_p D[:, p] θ^(p+1)`` are polynomials of ``degree`` in ``θ`` that

    * satisfy every order condition up to ``order`` for every ``θ`` (local error
      ``O(h^(order+1))`` anywhere in the step),
    * join the steps C¹-continuously: ``w(1) = b`` (the step's own ``y1``), ``w'(0)`` picks
      ``k_1 = f0`` and ``w'(1)`` picks ``f1``,
    * give no weight to a stage ``j > 1`` with ``b_j = 0``,
    * and, with the freedom left, minimise the principal error: the order-``(order+1)``
      residuals weighted by ``1/σ(t)``, in the least-squares sense over ``θ ∈ [0, 1]``.

    ``a_matrix`` (s, s): the stage matrix, lower triangular, its diagonal included for an
    implicit method (an ESDIRK's stages solve ``K_i = f(t0 + c_i h, y0 + h Σ_{l≤i} a_il K_l)``;
    the order conditions are the same). Raises ValueError if the stages cannot carry an
    extension of that order.
    """
    s = len(b)
    a = np.zeros((s + 1, s + 1))
    a[:s, :s] = np.asarray(a_matrix, dtype=np.float64)
    a[s, :s] = b  # f1 is one more stage, evaluated at y1 = y0 + h Σ b_j k_j
    phi = elementary_weights(a)
    # Unknowns: W (degree, s + 1), w(θ) = Σ_p θ^(p+1) W[p]. Some are pinned to known values
    # (NaN marks a free one) and eliminated exactly, so they hold no rounding noise.
    b_full = np.append(np.asarray(b, dtype=np.float64), 0.0)
    pinned = _pinned_weights(b_full, degree)
    fixed = ~np.isnan(pinned.ravel())
    x_fixed = pinned.ravel()[fixed]
    E, e_rhs = _extension_conditions(phi, b_full, order, degree)
    R, r_rhs = _principal_error(phi, order, degree, s + 1)
    # Move the pinned unknowns' contributions to the right-hand sides.
    free = _constrained_least_squares(E[:, ~fixed], e_rhs - E[:, fixed] @ x_fixed,
                                      R[:, ~fixed], r_rhs - R[:, fixed] @ x_fixed)
    if free is None:
        raise ValueError(f"the stages admit no continuous extension of order {order} and degree {degree}")
    W = pinned.ravel().copy()
    W[~fixed] = free
    W = W.reshape(degree, s + 1)
    return tuple(tuple(float(x) for x in W[:, j]) for j in range(s + 1))


def _pinned_weights(b_full: np.ndarray, degree: int) -> np.ndarray:
    """``(degree, m)`` the unknowns of :func:`continuous_extension` with a known value, NaN
    where free: ``w'(0)`` is ``k_1``'s unit vector, and a stage ``j > 1`` that ``y1`` does
    not use (``b_j = 0``, f1's column excepted) gets no weight between steps either."""
    m = len(b_full)
    pinned = np.full((degree, m), np.nan)
    pinned[0] = 0.0
    pinned[0, 0] = 1.0  # w'(0) = k_1's unit vector: P'(0) = h f0
    for j in range(1, m - 1):
        if b_full[j] == 0:
            pinned[:, j] = 0.0
    return pinned


def _extension_conditions(phi, b_full: np.ndarray, order: int, degree: int) -> tuple:
    """``(E, rhs)``: the linear conditions ``E · vec(W) = rhs`` of a continuous extension:
    every order condition up to ``order`` for every ``θ`` (coefficient by coefficient of the
    polynomial in ``θ``), ``w(1) = b`` and ``w'(1)`` = f1's unit vector."""
    m = len(b_full)
    trees = trees_up_to(order)
    phis = np.array([phi(t) for t in trees])  # (T, m)
    eq_rows, eq_rhs = [], []
    for p in range(degree):
        for row, t in zip(phis, trees):
            e = np.zeros((degree, m))
            e[p] = row
            eq_rows.append(e.ravel())
            eq_rhs.append(1.0 / tree_density(t) if tree_order(t) == p + 1 else 0.0)
    for j in range(m):
        e = np.zeros((degree, m))
        e[:, j] = 1.0
        eq_rows.append(e.ravel())
        eq_rhs.append(b_full[j])  # w(1) = b
        e = np.zeros((degree, m))
        e[:, j] = np.arange(1, degree + 1)
        eq_rows.append(e.ravel())
        eq_rhs.append(1.0 if j == m - 1 else 0.0)  # w'(1) = f1's unit vector
    return np.array(eq_rows), np.array(eq_rhs)


def _principal_error(phi, order: int, degree: int, m: int) -> tuple:
    """``(R, r)``: the order-``(order+1)`` residuals weighted by ``1/σ(t)`` as ``R · vec(W) - r``,
    sampled at Gauss–Legendre nodes in ``θ`` (scaled by the square roots of their weights), so
    that ``|R · vec(W) - r|²`` is their integral over ``θ ∈ [0, 1]``: the quadrature is exact
    for these polynomial integrands."""
    nodes, qweights = np.polynomial.legendre.leggauss(degree + order + 2)
    nodes, qweights = (nodes + 1) / 2, qweights / 2
    next_trees = rooted_trees(order + 1)
    obj_rows, obj_rhs = [], []
    for theta, qw in zip(nodes, qweights):
        for t in next_trees:
            scale = math.sqrt(qw) / tree_symmetry(t)
            obj_rows.append((np.outer(theta ** np.arange(1, degree + 1), phi(t)) * scale).ravel())
            obj_rhs.append(theta ** (order + 1) / tree_density(t) * scale)
    return np.array(obj_rows), np.array(obj_rhs)


def _constrained_least_squares(E: np.ndarray, e: np.ndarray, R: np.ndarray, r: np.ndarray):
    """``x`` minimising ``|R x - r|`` subject to ``E x = e``, by the null-space method; None
    when ``E x = e`` has no solution."""
    x0, *_ = np.linalg.lstsq(E, e, rcond=None)
    if np.max(np.abs(E @ x0 - e)) > 1e-11:
        return None
    _, sv, vt = np.linalg.svd(E, full_matrices=False)
    rank = int(np.sum(sv > 1e-12 * sv[0]))
    null = vt[rank:].T
    z, *_ = np.linalg.lstsq(R @ null, r - R @ x0, rcond=1e-10)
    return x0 + null @ z
