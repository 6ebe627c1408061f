"""Regularisers of neural ODE training, as running costs for ``solve(..., running_cost=...)``.

From Finlay, Jacobsen, Nurbekyan & Oberman 2020, "How to train your neural ODE: the world
of Jacobian and kinetic regularization": penalising

- the kinetic energy ``∫ |f(t, y)|² dt`` (:class:`KineticEnergy`), and
- the Jacobian's Frobenius norm ``∫ |∂f/∂y|_F² dt`` (:class:`JacobianFrobenius`), by
  Hutchinson's estimator ``|∂f/∂y|_F² = E_ε |εᵀ ∂f/∂y|²`` with one noise draw per solve,

makes the learned dynamics straighter and smoother, so an adaptive solver needs fewer
steps for the same accuracy. Each is a per-sample quantity averaged (``"mean"``) or summed
(``"sum"``) over the batch; ``batch_dims`` leading dimensions of every state tensor index
the samples (0: the whole state is one sample). :class:`Stack` combines several into one
running cost with a vector result, for a loss ``task + λ_K·rc[0] + λ_J·rc[1]``::

    reg = Stack(KineticEnergy(), JacobianFrobenius())
    sol = solve(func, y0, t, running_cost=reg)
    loss = task_loss(sol.ys[-1]) + 0.01 * sol.running_cost[0] + 0.01 * sol.running_cost[1]

and :class:`WeightedSum` (or :func:`kinetic_jacobian`) into one weighted scalar::

    sol = solve(func, y0, t, running_cost=kinetic_jacobian(kinetic=0.01, jacobian=0.01))
    loss = task_loss(sol.ys[-1]) + sol.running_cost
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional

import torch

from .pytree import Flattener, tree_leaves, tree_unflatten

REDUCTIONS = ("mean", "sum")


def _check(batch_dims, reduction, owner: str) -> None:
    if not isinstance(batch_dims, int) or isinstance(batch_dims, bool) or batch_dims < 0:
        raise ValueError(f"{owner}(batch_dims=...) must be a non-negative integer, got {batch_dims!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{owner}(reduction=...) must be one of {REDUCTIONS}, got {reduction!r}")


def per_sample_squares(tree: Any, batch_dims: int, owner: str) -> torch.Tensor:
    """Sum of squares of every state tensor over all but its ``batch_dims`` leading dimensions,
    added over the tensors: shape = the batch shape."""
    leaves, _ = tree_leaves(tree, "dy")
    total = None
    for x in leaves:
        if x.dim() < batch_dims:
            raise ValueError(
                f"{owner}(batch_dims={batch_dims}) needs state tensors with at least {batch_dims} dimension(s), got shape "
                f"{tuple(x.shape)}; use batch_dims=0 to treat the whole state as one sample"
            )
        sq = x.pow(2).reshape(*x.shape[:batch_dims], -1).sum(-1)
        if total is not None and total.shape != sq.shape:
            raise ValueError(f"{owner}: the state tensors disagree on the batch shape ({tuple(total.shape)} vs {tuple(sq.shape)})")
        total = sq if total is None else total + sq
    return total


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    return x.mean() if reduction == "mean" else x.sum()


class KineticEnergy:
    """``ℓ = |f(t, y)|²`` per sample, averaged or summed over the batch: a scalar.

    Costs nothing beyond the solve's own ``f`` (``dy`` is reused).
    """

    output_shape = ()
    needs_graph = False

    def __init__(self, batch_dims: int = 1, reduction: str = "mean"):
        _check(batch_dims, reduction, "KineticEnergy")
        self.batch_dims, self.reduction = batch_dims, reduction

    def __repr__(self) -> str:
        return f"KineticEnergy(batch_dims={self.batch_dims}, reduction={self.reduction!r})"

    def __call__(self, t: torch.Tensor, y: Any, dy: Any) -> torch.Tensor:
        return _reduce(per_sample_squares(dy, self.batch_dims, "KineticEnergy"), self.reduction)


class JacobianFrobenius:
    """``ℓ ≈ |∂f/∂y|_F²`` per sample by Hutchinson's estimator, averaged or summed: a scalar.

    ``ℓ = |εᵀ ∂f/∂y|²`` summed over each sample's entries, one vector-Jacobian product
    (``torch.autograd.grad`` with ``create_graph=True``, so the adjoint can differentiate
    it again) per evaluation. With ``f`` acting sample by sample, ``∂f/∂y`` is block
    diagonal and one draw of ``ε`` shaped like the state estimates every sample's norm.

    The noise ``ε`` is drawn once per solve (:meth:`for_solve`) and kept for the forward
    and backward passes, so the gradient is the exact gradient of the estimate the forward
    pass integrated. Called directly (outside a solve), each call draws fresh noise.

    Args:
        noise: ``"gaussian"`` (standard normal, as in Finlay et al.) or ``"rademacher"``
            (±1, lower variance).
        generator: a ``torch.Generator`` for reproducible draws.
    """

    output_shape = ()
    needs_graph = True

    def __init__(self, batch_dims: int = 1, reduction: str = "mean", noise: str = "gaussian",
                 generator: Optional[torch.Generator] = None):
        _check(batch_dims, reduction, "JacobianFrobenius")
        if noise not in ("gaussian", "rademacher"):
            raise ValueError(f"JacobianFrobenius(noise=...) must be 'gaussian' or 'rademacher', got {noise!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"JacobianFrobenius(generator=...) must be a torch.Generator, got {type(generator).__name__}")
        self.batch_dims, self.reduction, self.noise, self.generator = batch_dims, reduction, noise, generator

    def __repr__(self) -> str:
        return f"JacobianFrobenius(batch_dims={self.batch_dims}, reduction={self.reduction!r}, noise={self.noise!r})"

    def draw(self, like: Any) -> List[torch.Tensor]:
        """One noise tensor per state tensor of ``like``."""
        leaves, _ = tree_leaves(like, "y0")
        out = []
        for x in leaves:
            if self.noise == "gaussian":
                e = torch.randn(x.shape, generator=self.generator, dtype=x.dtype, device="cpu")
            else:
                e = torch.randint(0, 2, x.shape, generator=self.generator, device="cpu").to(x.dtype) * 2 - 1
            out.append(e.to(x.device))
        return out

    def for_solve(self, y0: Any) -> "_FixedNoiseJacobian":
        return _FixedNoiseJacobian(self, self.draw(y0))

    def __call__(self, t: torch.Tensor, y: Any, dy: Any) -> torch.Tensor:
        return _FixedNoiseJacobian(self, self.draw(y))(t, y, dy)


class _FixedNoiseJacobian:
    output_shape = ()
    needs_graph = True

    def __init__(self, spec: JacobianFrobenius, noise: List[torch.Tensor]):
        self.spec, self.noise = spec, noise

    def __call__(self, t: torch.Tensor, y: Any, dy: Any) -> torch.Tensor:
        ys, y_spec = tree_leaves(y, "y")
        # dy's leaves in y's order (a dict's entries by key, whatever order f returned them
        # in): the noise was drawn per state tensor.
        dys = Flattener(y_spec).leaves_of(dy)
        if dys is None or any(not isinstance(d, torch.Tensor) or d.shape != x.shape for d, x in zip(dys, ys)):
            raise TypeError("JacobianFrobenius needs dy = f(t, y) in the structure and shapes of y")
        if not all(x.requires_grad for x in ys) or not any(d.requires_grad for d in dys):
            raise ValueError(
                "JacobianFrobenius needs dy = f(t, y) with a graph to y; use it as solve(..., running_cost=...), which "
                "provides one, or call it with y.requires_grad_() and dy computed from that y"
            )
        live = [(d, e) for d, e in zip(dys, self.noise) if d.requires_grad]
        with torch.enable_grad():
            vjps = torch.autograd.grad([d for d, _ in live], ys, [e for _, e in live], create_graph=True, allow_unused=True)
        vjps = [torch.zeros_like(x) if v is None else v for v, x in zip(vjps, ys)]
        squares = per_sample_squares(tree_unflatten(vjps, y_spec), self.spec.batch_dims, "JacobianFrobenius")
        return _reduce(squares, self.spec.reduction)


class Stack:
    """Several scalar running costs as one with result ``(k,)``, in the order given."""

    needs_graph = False

    def __init__(self, *costs: Callable):
        if not costs:
            raise ValueError("Stack(...) needs at least one running cost")
        for i, c in enumerate(costs):
            if not callable(c):
                raise TypeError(f"Stack(...) argument {i} must be a running cost ℓ(t, y, dy), got {type(c).__name__}")
        self.costs = tuple(costs)
        self.needs_graph = any(getattr(c, "needs_graph", False) for c in costs)
        if all(getattr(c, "output_shape", None) == () for c in costs):
            self.output_shape = (len(costs),)

    def __repr__(self) -> str:
        return f"Stack({', '.join(map(repr, self.costs))})"

    def for_solve(self, y0: Any) -> "Stack":
        return Stack(*(c.for_solve(y0) if hasattr(c, "for_solve") else c for c in self.costs))

    def __call__(self, t: torch.Tensor, y: Any, dy: Any) -> torch.Tensor:
        return torch.stack([c(t, y, dy).reshape(()) for c in self.costs])


class WeightedSum:
    """``ℓ = Σ_k w_k ℓ_k`` for scalar running costs ``ℓ_k``: a scalar, ready to add to a loss."""

    def __init__(self, *terms):
        if not terms:
            raise ValueError("WeightedSum(...) needs at least one (weight, running cost) pair")
        for i, term in enumerate(terms):
            if not (isinstance(term, tuple) and len(term) == 2 and isinstance(term[0], (int, float))
                    and not isinstance(term[0], bool) and callable(term[1])):
                raise TypeError(f"WeightedSum(...) argument {i} must be a pair (weight, running cost), got {term!r}")
        self.terms = tuple((float(w), c) for w, c in terms)
        self.needs_graph = any(getattr(c, "needs_graph", False) for _, c in self.terms)
        if all(getattr(c, "output_shape", None) == () for _, c in self.terms):
            self.output_shape = ()

    def __repr__(self) -> str:
        return "WeightedSum(" + ", ".join(f"({w:g}, {c!r})" for w, c in self.terms) + ")"

    def for_solve(self, y0: Any) -> "WeightedSum":
        return WeightedSum(*((w, c.for_solve(y0) if hasattr(c, "for_solve") else c) for w, c in self.terms))

    def __call__(self, t: torch.Tensor, y: Any, dy: Any) -> torch.Tensor:
        return sum(w * c(t, y, dy).reshape(()) for w, c in self.terms)


def kinetic_jacobian(kinetic: float = 0.0, jacobian: float = 0.0, batch_dims: int = 1, noise: str = "gaussian",
                     generator: Optional[torch.Generator] = None) -> Optional[WeightedSum]:
    """``λ_K |f|² + λ_J |∂f/∂y|_F²`` (batch means) as one scalar running cost, the
    regularisation of Finlay et al. 2020; ``None`` when both weights are 0."""
    for value, name in ((kinetic, "kinetic"), (jacobian, "jacobian")):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0 or value == float("inf"):
            raise ValueError(f"{name} weight must be a finite number >= 0, got {value!r}")
    terms = []
    if kinetic:
        terms.append((kinetic, KineticEnergy(batch_dims)))
    if jacobian:
        terms.append((jacobian, JacobianFrobenius(batch_dims, noise=noise, generator=generator)))
    return WeightedSum(*terms) if terms else None
