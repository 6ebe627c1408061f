"""Butcher tableaux: structure, order conditions (rooted trees), embedded and dense orders.

The order conditions are checked with :mod:`torchadjoint.tableaux.order_conditions`; that
module is itself checked against classical facts (tree counts, densities, symmetries, the
orders of textbook methods) before anything relies on it.
"""
import math

import numpy as np
import pytest
import torch

import torchadjoint as ta
from torchadjoint.interpolation import dense_weights
from torchadjoint.tableaux import ButcherTableau
from torchadjoint.tableaux.order_conditions import (
    continuous_extension,
    order_residuals,
    rooted_trees,
    satisfied_order,
    stage_matrix,
    tree_density,
    tree_order,
    tree_symmetry,
)

# The eleven methods the solver ships, with their orders, the order of their embedded
# estimate and the order of their dense output.
ORDER = dict(euler=1, midpoint=2, heun2=2, heun3=3, rk4=4,
             adaptive_heun=2, fehlberg2=2, bosh3=3, dopri5=5, tsit5=5, dopri8=8)
EMBEDDED_ORDER = dict(adaptive_heun=1, fehlberg2=1, bosh3=2, dopri5=4, tsit5=4, dopri8=7)
# dopri5: quartic through Shampine's midpoint; tsit5: Tsitouras' own; dopri8: the
# order-5 extension from the order conditions; the rest: cubic Hermite (order ≤ 3, and
# never above the step's own order).
DENSE_ORDER = dict(dopri5=4, tsit5=4, dopri8=5)
FSAL = {"dopri5", "tsit5", "bosh3"}


def test_all_methods_registered():
    assert set(ORDER) <= set(ta.METHODS)
    assert set(ta.ADAPTIVE_METHODS) >= set(EMBEDDED_ORDER)
    assert {"euler", "midpoint", "heun2", "heun3", "rk4"} <= set(ta.FIXED_STEP_METHODS)
    for name, tableau in ta.METHODS.items():
        assert tableau.name == name
        assert tableau.adaptive == (name in ta.ADAPTIVE_METHODS)


# --- the tree machinery itself -------------------------------------------------------

def test_tree_counts():
    # OEIS A000081: rooted trees with n nodes.
    assert [len(rooted_trees(n)) for n in range(1, 10)] == [1, 1, 2, 4, 9, 20, 48, 115, 286]
    for n in range(1, 7):
        assert all(tree_order(t) == n for t in rooted_trees(n))


def test_tree_density_and_symmetry():
    # Order 4: bushy [•,•,•], [[•],•], [[•,•]], tall [[[•]]] (Hairer–Nørsett–Wanner Table II.2.1).
    leaf = ()
    bushy, mixed, fork, tall = (leaf, leaf, leaf), ((leaf,), leaf), ((leaf, leaf),), (((leaf,),),)
    assert {t: tree_density(t) for t in rooted_trees(4)} == {bushy: 4, tuple(sorted(mixed)): 8, fork: 12, tall: 24}
    assert {t: tree_symmetry(t) for t in rooted_trees(4)} == {bushy: 6, tuple(sorted(mixed)): 1, fork: 2, tall: 1}
    # Σ_{|t|=n} n!/(σ(t)γ(t)) = (n-1)!: the monotone labellings of all trees with n nodes.
    for n in range(1, 9):
        total = sum(math.factorial(n) / (tree_symmetry(t) * tree_density(t)) for t in rooted_trees(n))
        assert total == pytest.approx(math.factorial(n - 1))


def test_textbook_orders_from_trees():
    rk4 = stage_matrix(((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)))
    assert satisfied_order(rk4, np.array([1, 2, 2, 1]) / 6) == 4
    # The same stages with equal weights: Σ b = 1 and Σ b c = 1/2 hold, Σ b c² = 1/3 does not.
    assert satisfied_order(rk4, np.array([1, 1, 1, 1]) / 4) == 2
    euler = stage_matrix(((),))
    assert satisfied_order(euler, np.array([1.0])) == 1
    # Heun's third-order method: order 3 exactly.
    heun3 = stage_matrix(((), (1 / 3,), (0.0, 2 / 3)))
    assert satisfied_order(heun3, np.array([0.25, 0.0, 0.75])) == 3


# --- every shipped tableau ----------------------------------------------------------

# The explicit ones: the implicit (ESDIRK) tableaux have a diagonal and are checked in
# tests/test_stiff_tableaux.py.
EXPLICIT = sorted(name for name, tab in ta.METHODS.items() if isinstance(tab, ButcherTableau))


@pytest.mark.parametrize("name", EXPLICIT)
def test_structure(name):
    tab = ta.METHODS[name]
    s = tab.stages
    assert len(tab.c) == len(tab.a) == len(tab.b) == s and tab.c[0] == 0
    for i, row in enumerate(tab.a):
        assert len(row) == i
        assert sum(row) == pytest.approx(tab.c[i], abs=1e-13)
    assert sum(tab.b) == pytest.approx(1.0, abs=1e-13)
    if tab.adaptive:
        assert sum(tab.b_error) == pytest.approx(0.0, abs=1e-13)
        assert max(abs(x) for x in tab.b_error) > 1e-3  # a real estimate, not zeros
    if name in ORDER:
        assert tab.fsal == (name in FSAL)
    if tab.fsal:
        # FSAL: the last stage is f(t0 + h, y1), so its row is b.
        assert tab.c[-1] == 1 and tab.b[-1] == 0
        assert np.allclose(tab.a[-1], tab.b[:-1], atol=1e-15)


@pytest.mark.parametrize("name", EXPLICIT)
def test_order_conditions_exact_order(name):
    tab = ta.METHODS[name]
    a = stage_matrix(tab.a)
    b = np.array(tab.b)
    if name in ORDER:
        assert tab.order == ORDER[name]
    # Satisfies all conditions up to its order, and not those of the next order.
    assert satisfied_order(a, b, max_order=tab.order + 1) == tab.order
    assert max(order_residuals(a, b, tab.order)) < 1e-13


@pytest.mark.parametrize("name", sorted(EMBEDDED_ORDER))
def test_embedded_order(name):
    tab = ta.METHODS[name]
    b_hat = np.array(tab.b) - np.array(tab.b_error)
    assert satisfied_order(stage_matrix(tab.a), b_hat, max_order=tab.order + 1) == EMBEDDED_ORDER[name]


@pytest.mark.parametrize("name", sorted(ORDER))
@pytest.mark.parametrize("theta", [0.2, 0.5, 0.85])
def test_dense_output_order(name, theta):
    tab = ta.METHODS[name]
    expected = DENSE_ORDER.get(name, min(3, tab.order))
    coeffs = tab.as_tensors(torch.float64, torch.device("cpu"))
    w = dense_weights(coeffs, torch.tensor([theta, 1.0, 0.0], dtype=torch.float64)).numpy()
    s = tab.stages
    if w.shape[1] == s:
        a = stage_matrix(tab.a)
        b_full = np.array(tab.b)
    else:
        a = np.zeros((s + 1, s + 1))
        a[:s, :s] = stage_matrix(tab.a)
        a[s, :s] = tab.b
        b_full = np.append(tab.b, 0.0)
    # y(t0 + θh) = y0 + h Σ w_j(θ) K_j: the conditions read Σ w_j Φ_j(t) = θ^|t|/γ(t).
    assert satisfied_order(a, w[0], max_order=expected + 1, theta=theta) == expected
    np.testing.assert_allclose(w[1], b_full, atol=1e-12)  # continuous: the step's own y1 at θ = 1
    np.testing.assert_allclose(w[2], 0.0, atol=1e-15)  # y0 at θ = 0


def test_dopri8_extension_is_reproducible():
    # The stored coefficients are what continuous_extension computes (up to the freedom
    # its null-space solve resolves in floating point), and no order-6 extension exists.
    tab = ta.METHODS["dopri8"]
    recomputed = np.array(continuous_extension(tab.a, tab.b, order=5, degree=6))
    np.testing.assert_allclose(np.array(tab.dense), recomputed, atol=1e-6)
    with pytest.raises(ValueError, match="no continuous extension of order 6"):
        continuous_extension(tab.a, tab.b, order=6, degree=8)


def test_continuous_extension_of_rk4_is_hermite_order():
    # A check of the design routine on a method whose answer is known: RK4's stages with f1
    # carry a third-order extension (classical), and not a fourth-order one of degree 4.
    rk4 = ta.METHODS["rk4"]
    dense = np.array(continuous_extension(rk4.a, rk4.b, order=3, degree=3))
    a = np.zeros((5, 5))
    a[:4, :4] = stage_matrix(rk4.a)
    a[4, :4] = rk4.b
    for theta in (0.3, 0.7):
        w = dense @ theta ** np.arange(1, 4)
        assert satisfied_order(a, w, max_order=4, theta=theta) == 3
    with pytest.raises(ValueError):
        continuous_extension(rk4.a, rk4.b, order=4, degree=4)


# --- the self-checks fire -----------------------------------------------------------

def _rk4(**changes):
    kwargs = dict(name="bad", order=4, c=(0.0, 0.5, 0.5, 1.0), a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
                  b=(1 / 6, 1 / 3, 1 / 3, 1 / 6))
    kwargs.update(changes)
    return ButcherTableau(**kwargs)


def test_self_check_accepts_rk4():
    assert _rk4().order == 4 and not _rk4().fsal


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(a=((), (0.5,), (0.0, 0.6), (0.0, 0.0, 1.0))), "row 2 of a sums"),
        (dict(b=(1 / 6, 1 / 3, 1 / 3, 1 / 5)), "b sums"),
        (dict(c=(0.1, 0.5, 0.5, 1.0)), "c\\[0\\] must be 0"),
        (dict(b_error=(0.1, 0.0, 0.0, 0.0)), "b_error sums"),
        (dict(order=5), "declared order 5.*order-5"),
        # Sums right, order wrong: a typo that only the order conditions catch.
        (dict(b=(1 / 6, 1 / 3 + 0.01, 1 / 3 - 0.01, 1 / 6)), "order-3"),
        (dict(dense=((1.0,), (0.0,), (0.0,), (0.0,), (0.0,))), "dense output at θ=1"),
    ],
)
def test_self_check_rejects(changes, message):
    with pytest.raises(ValueError, match=message):
        _rk4(**changes)


# --- the cast coefficients are cached per instance, boundedly -----------------------


def _fresh(tableau):
    """A new instance equal to ``tableau`` (the registered ones live for the whole program)."""
    import dataclasses

    return dataclasses.replace(tableau)


@pytest.mark.parametrize("name", ["dopri5", "kvaerno3", "implicit_adams"])
def test_a_cast_tableau_can_be_garbage_collected(name):
    # lru_cache on as_tensors kept every tableau ever cast alive (self was in its keys).
    import gc
    import weakref

    tableau = _fresh(ta.METHODS[name])
    first = tableau.as_tensors(torch.float64, torch.device("cpu"))
    assert tableau.as_tensors(torch.float64, torch.device("cpu")) is first  # cached
    np.testing.assert_array_equal(first.b.numpy(), np.asarray(tableau.b))
    alive = weakref.ref(tableau)
    del tableau
    gc.collect()
    assert alive() is None


def test_the_cast_cache_is_bounded_and_keeps_the_recent_pairs():
    from torchadjoint.tableaux.base import CAST_CACHE_SIZE

    tableau = _fresh(ta.METHODS["dopri5"])
    pairs = [(dtype, device) for device in (torch.device("cpu"), torch.device("meta"), "cpu")
             for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)]
    assert len(pairs) > CAST_CACHE_SIZE
    cast = [tableau.as_tensors(dtype, device) for dtype, device in pairs]
    assert tableau.as_tensors(*pairs[-1]) is cast[-1]  # the most recent are kept
    again = tableau.as_tensors(*pairs[0])
    assert again is not cast[0]  # the oldest was dropped: cast again, equal
    assert again.b.dtype == torch.float16 and torch.equal(again.b, cast[0].b)
    assert len(tableau.__dict__["_cast_cache"]) <= CAST_CACHE_SIZE


def test_coefficients_first_cast_inside_a_torch_func_transform_are_plain_tensors():
    """A solve inside torch.func.grad casts (and caches) the tableau's coefficients there,
    where every tensor made is wrapped for the transform: the cache must hold plain tensors,
    or every later solve computes with a dead transform's wrappers."""
    tableau = ta.METHODS["bosh3"]
    tableau.__dict__.pop("_cast_cache", None)  # the first cast happens below, inside the transform
    a = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    y0 = torch.tensor([1.0, 0.5], dtype=torch.float64)

    def end(y):
        return ta.solve(lambda s, y: a @ y, y, t, method=tableau, gradient=ta.Direct(), rtol=1e-9, atol=1e-11).ys[-1]

    grad = torch.func.grad(lambda y: end(y).sum())(y0)
    torch.testing.assert_close(grad, torch.linalg.matrix_exp(a).sum(0), rtol=1e-7, atol=1e-9)
    coeffs = tableau.as_tensors(torch.float64, torch.device("cpu"))
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    assert not any(wrapped(x) for x in (coeffs.a, coeffs.b, coeffs.b_error) + tuple(coeffs.a_rows))
    torch.testing.assert_close(end(y0), torch.linalg.matrix_exp(a) @ y0, rtol=1e-7, atol=1e-9)
