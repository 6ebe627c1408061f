"""Kinetic and Jacobian regularisation: fewer function evaluations for a trained model.

An ODE classifier on scikit-learn's 8×8 digits (input layer 64→32, ODE block with the
field MLP 32-64-32 tanh on t in [0, 1], affine read-out 32→10), trained with Adam (lr 1e-2,
batch 128) through ``Backsolve`` at the training tolerance rtol 1e-3, atol 1e-4, with
and without the regularisers of Finlay et al. 2020 (``solve(..., running_cost=...)``;
loss = cross-entropy + λ_K ∫|f|² dt + λ_J ∫|∂f/∂y|_F² dt). Reported after training:
the forward function evaluations of one solve of the 360 test images at the training
tolerance and at a tight one (1e-6; the cost of accurate inference), test accuracy,
and the training wall time. Same seed, data order and initialisation for every variant.

``run(quick) -> dict`` for :mod:`benchmarks.report`; ``python benchmarks/bench_regularisers.py --quick``.
"""
from __future__ import annotations

import time
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

try:
    from benchmarks import common
except ImportError:  # pragma: no cover - run as a script from benchmarks/
    import common  # type: ignore

import torchadjoint as ta
from torchadjoint.regularisers import JacobianFrobenius, KineticEnergy, Stack

TRAIN_TOL = dict(rtol=1e-3, atol=1e-4)


def load_digits() -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits as sklearn_digits

    images, labels = sklearn_digits(return_X_y=True)
    x = torch.as_tensor(images, dtype=torch.float32) / 16.0
    y = torch.as_tensor(labels)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = order[:1437], order[1437:]
    return x[train], y[train], x[test], y[test]


class Field(nn.Module):
    def __init__(self, dim: int = 32, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, dim))

    def forward(self, t, y):
        return self.net(y)


def train(data, kinetic: float, jacobian: float, epochs: int, seed: int = 0) -> Dict[str, float]:
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    encoder, field, head = nn.Linear(64, 32), Field(), nn.Linear(32, 10)
    params = [*encoder.parameters(), *field.parameters(), *head.parameters()]
    optimiser = torch.optim.Adam(params, lr=1e-2)
    t = torch.tensor([0.0, 1.0])
    costs = []
    if kinetic:
        costs.append((kinetic, KineticEnergy()))
    if jacobian:
        costs.append((jacobian, JacobianFrobenius(generator=torch.Generator().manual_seed(seed))))
    regulariser = Stack(*(c for _, c in costs)) if costs else None
    weights = torch.tensor([w for w, _ in costs])
    order_generator = torch.Generator().manual_seed(seed)
    last_epoch_nfe = []
    start = time.perf_counter()
    for epoch in range(epochs):
        last_epoch_nfe = []
        for batch in torch.randperm(len(x_train), generator=order_generator).split(128):
            sol = ta.solve(field, encoder(x_train[batch]), t, gradient=ta.Backsolve(), running_cost=regulariser, **TRAIN_TOL)
            loss = F.cross_entropy(head(sol.ys[-1]), y_train[batch])
            if regulariser is not None:
                loss = loss + (weights * sol.running_cost).sum()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            last_epoch_nfe.append(sol.stats["forward"]["nfe"])
    seconds = time.perf_counter() - start
    result = dict(train_s=seconds, train_nfe_last_epoch=sum(last_epoch_nfe) / len(last_epoch_nfe))
    with torch.no_grad():
        y0 = encoder(x_test)
        for name, tol in (("test_nfe", TRAIN_TOL), ("test_nfe_tight", dict(rtol=1e-6, atol=1e-7))):
            sol = ta.solve(field, y0, t, **tol)
            result[name] = sol.stats["forward"]["nfe"]
        sol = ta.solve(field, y0, t, **TRAIN_TOL)
        result["test_accuracy"] = float((head(sol.ys[-1]).argmax(dim=1) == y_test).float().mean())
    return result


VARIANTS = {
    "none": (0.0, 0.0),
    "kinetic λ_K=0.01": (0.01, 0.0),
    "jacobian λ_J=0.01": (0.0, 0.01),
    "both λ=0.01": (0.01, 0.01),
}


def run(quick: bool = False) -> dict:
    torch.set_num_threads(1)
    epochs = 3 if quick else 10
    data = load_digits()
    results = {name: train(data, k, j, epochs) for name, (k, j) in VARIANTS.items()}
    base = results["none"]
    rows = [[name, r["test_nfe"], r["test_nfe_tight"], r["train_nfe_last_epoch"], r["test_accuracy"], r["train_s"]]
            for name, r in results.items()]
    both = results["both λ=0.01"]
    return dict(
        name="regularisers",
        title="Kinetic and Jacobian regularisation: function evaluations of a trained digits classifier",
        notes=(
            f"ODE classifier 64→32 | MLP field 32-64-32 on [0, 1] | 32→10, Adam lr 1e-2, batch 128, {epochs} epochs, "
            f"Backsolve at rtol 1e-3, atol 1e-4, float32. Test NFE: one forward solve of the 360 test images after "
            f"training, at the training tolerance and at rtol 1e-6, atol 1e-7. Machine: {common.machine()}."
        ),
        sections=[dict(
            title="After training",
            columns=["regulariser", "test NFE (train tol)", "test NFE (1e-6)", "train NFE/iter (last epoch)",
                     "test accuracy", "train s"],
            rows=rows,
        )],
        headline={
            "regularisers: test NFE at 1e-6, unregularised / both": base["test_nfe_tight"] / both["test_nfe_tight"],
            "regularisers: test NFE at training tol, unregularised / both": base["test_nfe"] / both["test_nfe"],
        },
        metrics=results,
    )


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(run(args.quick), indent=1, default=str))
