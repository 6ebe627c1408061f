"""A small nonlinear, time-dependent field with parameters, shared by the gradient-method
tests: f(t, y) = MLP([y, t]) - 0.3 y, float64."""
import torch
from torch import nn

D = torch.float64


class Field(nn.Module):
    """A small nonlinear, time-dependent field with parameters."""

    def __init__(self, n=3, hidden=8, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(n + 1, hidden), nn.Tanh(), nn.Linear(hidden, n)).to(D)

    def forward(self, t, y):
        return self.net(torch.cat([y, t.expand(*y.shape[:-1], 1)], dim=-1)) - 0.3 * y
