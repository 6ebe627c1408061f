"""Direct records no more autograd nodes per call of f than autograd through torchdiffeq on
the same program (no in-place writes into stage buffers, no view nodes around f), with the
same gradient; the flat views' aliases never reconnect a graph the caller cut."""
from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

import torchadjoint as ta
from torchadjoint.flat_views import flat_view, shaped

torchdiffeq = pytest.importorskip("torchdiffeq")


def graph_nodes(root: torch.Tensor) -> collections.Counter:
    """Every autograd node reachable from ``root.grad_fn``, by type."""
    seen, stack, kinds = set(), [root.grad_fn], collections.Counter()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        kinds[type(node).__name__] += 1
        stack.extend(next_node for next_node, _ in node.next_functions)
    return kinds


class Field(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))
        self.nfe = 0

    def forward(self, t, y):
        self.nfe += 1
        return self.net(y)


@pytest.mark.parametrize("method, options", [("euler", dict(step_size=0.01)), ("dopri5", dict(rtol=1e-6, atol=1e-8))])
def test_direct_records_no_more_nodes_per_call_of_f_than_torchdiffeq(method, options):
    torch.manual_seed(0)
    func = Field()
    y0 = torch.randn(5, 2)
    t = torch.linspace(0.0, 1.0, 3)

    func.nfe = 0
    ours = ta.solve(func, y0, t, method=method, gradient=ta.Direct(), **options).ys
    our_nfe, our_nodes = func.nfe, graph_nodes(ours.sum())

    func.nfe = 0
    tdq_options = dict(options=dict(step_size=options["step_size"])) if "step_size" in options else options
    theirs = torchdiffeq.odeint(func, y0, t, method=method, **tdq_options)
    their_nfe, their_nodes = func.nfe, graph_nodes(theirs.sum())

    per_call_ours = sum(our_nodes.values()) / our_nfe
    per_call_theirs = sum(their_nodes.values()) / their_nfe
    assert per_call_ours <= per_call_theirs, (our_nodes, their_nodes)
    # No writes into a buffer while recording: neither per stage nor per output (each CopySlices
    # node's backward would copy the gradient of every output row).
    assert our_nodes["CopySlices"] == 0

    params = list(func.parameters())
    g_ours = torch.autograd.grad(ours.pow(2).sum(), params)
    g_theirs = torch.autograd.grad(theirs.pow(2).sum(), params)
    for a, b in zip(g_ours, g_theirs):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_direct_euler_on_images_and_float64_matches_gradcheck():
    # The shaped Euler step on a 4-d state: finite differences as the independent truth.
    weight = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    y0 = torch.randn(2, 3, 1, 2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.5, 0.7, 1.0], dtype=torch.float64)

    def f(t, y):
        return torch.tanh(torch.einsum("ij,bjhw->bihw", weight, y))

    def run(w, y):
        return ta.solve(f, y, t, method="euler", step_size=0.1, gradient=ta.Direct(), params=[weight]).ys

    assert torch.autograd.gradcheck(lambda w, y: run(w, y), (weight, y0))


def test_flat_view_alias_never_reconnects_a_cut_graph():
    x = torch.randn(3, 2, requires_grad=True) * 1.0
    flat = flat_view(x)
    assert shaped(flat, x.shape) is x  # the alias: no new node
    cut = flat.detach().requires_grad_(True)
    assert shaped(cut, x.shape) is not x and shaped(cut, x.shape)._base is cut
    assert shaped(flat, torch.Size([6, 1])) is not x  # another shape: a plain view
    with torch.no_grad():
        assert shaped(flat_view(x.detach()), x.shape) is not x
