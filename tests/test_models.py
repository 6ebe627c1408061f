"""NeuralODE and ODEClassifier: values against matrix_exp, gradients against autograd
through the solver (Direct) and finite differences."""
import pytest
import torch
from torch import nn

import torchadjoint as ta
from torchadjoint.models import MLPField, NeuralODE, ODEClassifier


class Linear(nn.Module):
    """dy/dt = y A^T with a trainable A: exact solution y(t) = y0 expm(A t)^T."""

    def __init__(self, A):
        super().__init__()
        self.A = nn.Parameter(A.clone())

    def forward(self, t, y):
        return y @ self.A.T


@pytest.fixture(autouse=True)
def _float64_one_thread():
    # Tiny tensors gain nothing from threads, and extra threads crawl on a busy machine.
    old, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(old)
    torch.set_num_threads(threads)


def _A():
    return torch.tensor([[-0.3, 1.2, 0.0], [-1.0, -0.2, 0.4], [0.1, -0.5, -0.1]], dtype=torch.float64)


def test_final_state_and_trajectory_match_matrix_exp():
    A = _A()
    block = NeuralODE(Linear(A), (0.0, 1.5), rtol=1e-10, atol=1e-12)
    y0 = torch.tensor([[1.0, -0.5, 2.0], [0.3, 0.2, -1.0]])
    expected = y0 @ torch.linalg.matrix_exp(1.5 * A).T
    torch.testing.assert_close(block(y0), expected, rtol=1e-8, atol=1e-9)
    t = torch.linspace(0.0, 2.0, 5)
    ys = block(y0, t)
    assert ys.shape == (5, 2, 3)
    for i, ti in enumerate(t):
        torch.testing.assert_close(ys[i], y0 @ torch.linalg.matrix_exp(ti * A).T, rtol=1e-8, atol=1e-9)
    assert block.stats["forward"]["nfe"] > 0


def test_backsolve_gradients_match_analytic_and_direct():
    A = _A()
    y0 = torch.tensor([[1.0, -0.5, 2.0]], requires_grad=True)
    grads = {}
    for name in ("backsolve", "direct"):
        block = NeuralODE(Linear(A), (0.0, 1.0), rtol=1e-10, atol=1e-12, gradient=name)
        y0.grad = None
        block(y0).pow(2).sum().backward()
        grads[name] = (y0.grad.clone(), block.func.A.grad.clone())
        if name == "backsolve":
            assert block.stats["backward"]["nfe"] > 0
    # Analytic dL/dy0 for L = |y0 E^T|^2, E = expm(A): 2 y(1) E.
    E = torch.linalg.matrix_exp(A)
    analytic = 2 * (y0.detach() @ E.T) @ E
    torch.testing.assert_close(grads["backsolve"][0], analytic, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(grads["backsolve"][0], grads["direct"][0], rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(grads["backsolve"][1], grads["direct"][1], rtol=1e-6, atol=1e-8)


def test_gradcheck_through_block_and_upstream_layer():
    torch.manual_seed(0)
    field = MLPField(2, 4)
    block = NeuralODE(field, (0.0, 0.5), rtol=1e-10, atol=1e-12)
    inp = nn.Linear(3, 2)

    def f(x, w):
        return block(torch.tanh(x @ w.T)).sum(dim=-1)

    x = torch.randn(2, 3, requires_grad=True)
    w = inp.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x, w), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_block_is_a_layer_inside_sequential():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), NeuralODE(MLPField(3, 8), rtol=1e-6, atol=1e-8), nn.Linear(3, 2))
    out = net(torch.randn(5, 4))
    assert out.shape == (5, 2)
    out.sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_classifier_trains_input_layer_through_dL_dy0():
    torch.manual_seed(0)
    x, labels = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    grads = {}
    for gradient in ("backsolve", "direct"):
        torch.manual_seed(1)
        model = ODEClassifier(5, 4, 3, rtol=1e-9, atol=1e-11, gradient=gradient)
        logits = model(x)
        assert logits.shape == (6, 3)
        nn.functional.cross_entropy(logits, labels).backward()
        grads[gradient] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert grads["backsolve"]["input.weight"].abs().sum() > 0
    for name, g in grads["direct"].items():
        torch.testing.assert_close(grads["backsolve"][name], g, rtol=1e-5, atol=1e-8)
    traj = model.trajectory(x, torch.linspace(0, 1, 7))
    assert traj.shape == (7, 6, 4)


def test_gradient_choice_and_bad_arguments():
    block = NeuralODE(MLPField(2, 3), gradient=ta.Direct())
    assert isinstance(block.gradient, ta.Direct)
    assert isinstance(NeuralODE(MLPField(2, 3), gradient="backsolve").gradient, ta.Backsolve)
    with pytest.raises(ValueError, match="unknown gradient method"):
        NeuralODE(MLPField(2, 3), gradient="nope")
    with pytest.raises(TypeError, match="gradient must be"):
        NeuralODE(MLPField(2, 3), gradient=3)
    with pytest.raises(TypeError, match="func must be callable"):
        NeuralODE(5)
    with pytest.raises(ValueError, match="at least a start and an end"):
        NeuralODE(MLPField(2, 3), t=(1.0,))
    with pytest.raises(ValueError, match="hidden must be a positive integer"):
        ODEClassifier(4, 0, 3)
    with pytest.raises(ValueError, match="method"):
        NeuralODE(MLPField(2, 3), method="nope")(torch.zeros(1, 2))


def test_fixed_step_options_pass_through():
    A = _A()
    block = NeuralODE(Linear(A), (0.0, 1.0), method="rk4", step_size=0.01)
    y0 = torch.tensor([1.0, 0.0, 0.0])
    torch.testing.assert_close(block(y0), torch.linalg.matrix_exp(A) @ y0, rtol=1e-8, atol=1e-9)
    assert 400 <= block.stats["forward"]["nfe"] <= 404  # 4 per step (+ the last f for dense output)
