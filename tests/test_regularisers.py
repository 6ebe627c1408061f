"""Kinetic-energy and Jacobian-Frobenius regularisers: values against closed forms,
Hutchinson's estimator against the exact Jacobian norm, the fixed noise draw per solve
(adjoint gradients equal autograd through the solver), stacking, and errors."""
import math

import pytest
import torch
from torch import nn

from torchadjoint import Backsolve, Direct, Quadrature, solve
from torchadjoint.regularisers import JacobianFrobenius, KineticEnergy, Stack, WeightedSum, kinetic_jacobian

D = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-12)


def rel(a, b):
    return float((a - b).norm() / b.norm()) if not (a.requires_grad or b.requires_grad) else rel(a.detach(), b.detach())


def test_kinetic_energy_of_decay_matches_closed_form():
    # y' = -k y per sample: |f|² = k² y², ∫_0^T = k² y0² (1 - e^{-2kT}) / (2k); mean over samples.
    k, T = 0.8, 1.5
    y0 = torch.tensor([[1.0, 2.0], [0.5, -1.0], [3.0, 0.0]], dtype=D)
    sol = solve(lambda t, y: -k * y, y0, torch.tensor([0.0, T], dtype=D), running_cost=KineticEnergy(), **TIGHT)
    per_sample = k**2 * y0.pow(2).sum(-1) * (1 - math.exp(-2 * k * T)) / (2 * k)
    assert abs(float(sol.running_cost) - float(per_sample.mean())) < 1e-9
    summed = solve(lambda t, y: -k * y, y0, torch.tensor([0.0, T], dtype=D),
                   running_cost=KineticEnergy(reduction="sum"), **TIGHT).running_cost
    assert abs(float(summed) - float(per_sample.sum())) < 1e-9
    whole = solve(lambda t, y: -k * y, y0, torch.tensor([0.0, T], dtype=D),
                  running_cost=KineticEnergy(batch_dims=0), **TIGHT).running_cost
    assert abs(float(whole) - float(per_sample.sum())) < 1e-9


def test_hutchinson_estimates_the_frobenius_norm():
    # f(y) = y Aᵀ row by row: ∂f/∂y = A for every sample, so the batch mean of |εᵀA|² over
    # many samples estimates |A|_F², and the integral over [0, T] is T |A|_F².
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 4, generator=g, dtype=D) * 0.3
    y0 = torch.randn(2000, 4, generator=g, dtype=D)
    T = 0.5
    exact = T * float(A.pow(2).sum())
    for noise, tol in (("gaussian", 0.08), ("rademacher", 0.05)):
        reg = JacobianFrobenius(noise=noise, generator=torch.Generator().manual_seed(1))
        sol = solve(lambda t, y: y @ A.T, y0, torch.tensor([0.0, T], dtype=D), running_cost=reg, rtol=1e-6, atol=1e-8)
        assert abs(float(sol.running_cost) - exact) < tol * exact


def test_jacobian_of_nonlinear_field_matches_exact_norm():
    # A tanh layer: the exact |∂f/∂y|_F² at each time from torch.autograd.functional.jacobian,
    # integrated along the same trajectory. 500 copies of one sample in a batch: each gets its
    # own noise, so the batch mean is the average of 500 draws.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    y0 = torch.randn(1, 3, dtype=D)
    t = torch.tensor([0.0, 0.7], dtype=D)

    def exact_cost(s, y, dy):
        J = torch.autograd.functional.jacobian(lambda x: net(x), y[0], create_graph=True)
        return J.pow(2).sum()

    with torch.no_grad():
        exact = float(solve(lambda s, y: net(y), y0, t, running_cost=exact_cost, rtol=1e-8, atol=1e-10).running_cost)
    reg = JacobianFrobenius(noise="rademacher", generator=torch.Generator().manual_seed(3))
    sol = solve(lambda s, y: net(y), y0.expand(500, 3), t, running_cost=reg, rtol=1e-8, atol=1e-10)
    assert abs(float(sol.running_cost) - exact) < 0.05 * exact
    again = solve(lambda s, y: net(y), y0.expand(500, 3), t, running_cost=reg, rtol=1e-8, atol=1e-10)
    assert float(again.running_cost) != float(sol.running_cost)  # a new draw per solve


@pytest.mark.parametrize("gradient", [Backsolve(), Quadrature()], ids=["Backsolve", "Quadrature"])
def test_fixed_noise_per_solve_makes_adjoint_equal_autograd(gradient):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    params = list(net.parameters())
    y0 = torch.randn(5, 3, dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=D)
    grads = []
    for g in (Direct(), gradient):
        reg = Stack(KineticEnergy(), JacobianFrobenius(generator=torch.Generator().manual_seed(7)))
        sol = solve(lambda s, y: net(y), y0, t, gradient=g, params=params, running_cost=reg, **TIGHT)
        assert sol.running_cost.shape == (2,)
        loss = sol.ys[-1].pow(2).sum() + 0.1 * sol.running_cost[0] + 0.2 * sol.running_cost[1]
        grads.append(torch.autograd.grad(loss, [y0] + params))
    for a, b in zip(*grads):
        assert rel(b, a) < 1e-7


def test_direct_call_needs_a_graph_and_draws_fresh_noise():
    y = torch.randn(2, 3, dtype=D, requires_grad=True)
    dy = torch.tanh(y) * 2
    reg = JacobianFrobenius(generator=torch.Generator().manual_seed(0))
    a, b = reg(None, y, dy), reg(None, y, dy)
    assert a.shape == () and float(a.detach()) != float(b.detach())
    with pytest.raises(ValueError, match="graph"):
        reg(None, y.detach(), dy.detach())


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: KineticEnergy(batch_dims=-1), "batch_dims"),
        (lambda: KineticEnergy(reduction="none"), "reduction"),
        (lambda: JacobianFrobenius(noise="uniform"), "noise"),
        (lambda: JacobianFrobenius(generator=0), "generator"),
        (lambda: Stack(), "at least one"),
        (lambda: Stack(KineticEnergy(), 3), "argument 1"),
    ],
)
def test_bad_arguments(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


def test_batch_dims_larger_than_state():
    with pytest.raises(ValueError, match="batch_dims"):
        solve(lambda t, y: -y, torch.ones(3, dtype=D), torch.tensor([0.0, 1.0], dtype=D),
              running_cost=KineticEnergy(batch_dims=2))


def test_weighted_sum_equals_weighted_stack():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    y0 = torch.randn(5, 3, dtype=D)
    t = torch.tensor([0.0, 1.0], dtype=D)
    stacked = solve(lambda s, y: net(y), y0, t, running_cost=Stack(
        KineticEnergy(), JacobianFrobenius(generator=torch.Generator().manual_seed(2))), **TIGHT).running_cost
    weighted = solve(lambda s, y: net(y), y0, t, running_cost=kinetic_jacobian(
        0.3, 0.7, generator=torch.Generator().manual_seed(2)), **TIGHT).running_cost
    assert weighted.shape == () and abs(float(weighted) - float(0.3 * stacked[0] + 0.7 * stacked[1])) < 1e-10
    assert kinetic_jacobian(0.0, 0.0) is None
    with pytest.raises(ValueError, match="kinetic"):
        kinetic_jacobian(-1.0)
    with pytest.raises(TypeError, match="pair"):
        WeightedSum(KineticEnergy())


def test_training_program_options(tmp_path):
    import json

    from torchadjoint.cli import main
    from torchadjoint.commands.train import parse
    from torchadjoint.training import load_trained
    from torchadjoint.training.tasks import Task, regularisation

    config = parse(["--kinetic", "0.5", "--jacobian", "0.25", "--rtol", "1e-3", "--atol", "1e-4"])
    reg = Task.solver_kwargs(config)["running_cost"]
    assert [w for w, _ in reg.terms] == [0.5, 0.25]
    assert "running_cost" not in Task.solver_kwargs(parse(["--rtol", "1e-3", "--atol", "1e-4"]))

    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--epochs", "1", "--limit-batches", "1", "--hidden", "4", "--batch-size",
                 "32", "--kinetic", "0.5", "--jacobian", "0.25", "--no-plots", "--no-progress"]) == 0
    saved = json.loads((out / "config.json").read_text())["run"]
    assert saved["kinetic"] == 0.5 and saved["jacobian"] == 0.25
    model = load_trained(str(out))
    model(torch.rand(4, 64))
    value = regularisation(model)
    assert value.shape == () and float(value.detach()) > 0


def test_jacobian_frobenius_takes_dict_entries_by_key():
    """f may return a dict state's entries in another order: the estimate (same noise) is the
    same, not a shape error or a pairing of noise with the wrong tensor."""
    torch.manual_seed(0)
    w = {"a": torch.randn(3, 3, dtype=torch.float64), "b": torch.randn(2, 2, dtype=torch.float64)}
    in_order = lambda t, y: {"a": torch.tanh(y["a"] @ w["a"]), "b": torch.tanh(y["b"] @ w["b"])}  # noqa: E731
    reversed_ = lambda t, y: {"b": torch.tanh(y["b"] @ w["b"]), "a": torch.tanh(y["a"] @ w["a"])}  # noqa: E731
    y0 = {"a": torch.randn(4, 3, dtype=torch.float64), "b": torch.randn(4, 2, dtype=torch.float64)}
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    values = [
        solve(f, y0, t, running_cost=JacobianFrobenius(generator=torch.Generator().manual_seed(0))).running_cost
        for f in (in_order, reversed_)
    ]
    assert torch.equal(values[0], values[1]) and float(values[0]) > 0
