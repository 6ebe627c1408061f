"""The augmented dynamics of the continuous adjoint, by vector-Jacobian products.

For the state ``z = [y, a_y, a_θ]`` (flat, lengths n, n, p) running backwards in time::

    dy/dt = f(t, y),   da_y/dt = -a_y · ∂f/∂y,   da_θ/dt = -a_y · ∂f/∂θ

Each evaluation is one call of ``f`` and one ``torch.autograd.grad`` call (no Jacobian).

Also here: :func:`check_params_declared`, which catches a function that closes over
tensors requiring grad that the adjoint does not know about (their gradient would be
silently lost, since the adjoint only differentiates with respect to declared params).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

FlatFunc = Callable[[float, torch.Tensor], torch.Tensor]


def flat_param_grads(grads: Sequence, params: Sequence[torch.Tensor], dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Concatenate per-parameter gradients (None for unused ones → zeros): (p,)."""
    parts = [
        torch.zeros(p.numel(), dtype=dtype or p.dtype, device=p.device) if g is None else g.reshape(-1).to(dtype or g.dtype)
        for g, p in zip(grads, params)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)


class AugmentedDynamics:
    """``F(t, z) -> dz/dt`` for ``z = [y, a_y, a_θ]`` (2n + p,), with honest counters.

    ``nfe`` counts calls of ``f`` and ``nvjp`` calls of ``torch.autograd.grad``.

    Jumps without re-evaluation: at the times in ``keep_graph_at`` (the output times where
    the adjoint jumps) the graph of the last evaluation there is kept. The jump
    ``a_y += g`` changes ``F`` only linearly, ``F(z + [0, g, 0]) = F(z) + [0, -g·∂f/∂y,
    -g·∂f/∂θ]``, so :meth:`jump` obtains the derivative after the jump from the kept stage
    by one more backward pass through its graph, without calling ``f`` again.
    """

    def __init__(self, flat_func: FlatFunc, n: int, params: Sequence[torch.Tensor], keep_graph_at: Sequence[float] = ()):
        self.flat_func = flat_func
        self.n = n
        self.params = tuple(params)
        self.keep_graph_at = frozenset(keep_graph_at)
        self.nfe = 0
        self.nvjp = 0
        # (t, z, f(y) with its graph, the y leaf, F(t, z)) of the last evaluation at a kept time.
        self._kept: Optional[Tuple[float, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = None
        self._zeros: Optional[List[torch.Tensor]] = None  # stand-ins for unused inputs' products

    def _vjp(self, fy: torch.Tensor, y: torch.Tensor, cotangent: torch.Tensor, keep: bool) -> List[torch.Tensor]:
        """``[-c·∂f/∂y (n,), -c·∂f/∂θ_1 (flat), ...]`` for ``c = cotangent``, by one backward pass."""
        if fy.requires_grad:
            # The negated cotangent gives the negated products directly (no extra pass over them).
            grads = torch.autograd.grad(fy, (y,) + self.params, cotangent.neg(), allow_unused=True, retain_graph=keep)
            self.nvjp += 1
        else:  # f depends on neither y nor the parameters
            grads = (None,) * (1 + len(self.params))
        if self._zeros is None:
            self._zeros = [torch.zeros(x.numel(), dtype=cotangent.dtype, device=cotangent.device) for x in (y,) + self.params]
        return [z if g is None else g.reshape(-1) for g, z in zip(grads, self._zeros)]

    def __call__(self, t: float, z: torch.Tensor) -> torch.Tensor:
        n = self.n
        keep = t in self.keep_graph_at
        with torch.enable_grad():
            y = z[:n].detach().requires_grad_(True)
            fy = self.flat_func(t, y)
            self.nfe += 1
            parts = self._vjp(fy, y, z[n : 2 * n], keep)
        out = torch.cat([fy.detach()] + parts)
        if keep:
            self._kept = (t, z, fy, y, out)
        return out

    def jump(self, t: float, z: torch.Tensor, g: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(z with a_y += g, F there)``; ``F`` is None when no graph was kept at ``(t, z)``
        (a method whose last stage is not at the step's end), and must be re-evaluated."""
        n = self.n
        z_new = z.clone()
        z_new[n : 2 * n] += g
        kept, self._kept = self._kept, None
        if kept is None or kept[0] != t or kept[1] is not z:
            return z_new, None
        _, _, fy, y, out = kept
        with torch.enable_grad():
            parts = self._vjp(fy, y, g, keep=False)
        f_new = out.clone()
        f_new[n:] += torch.cat(parts)
        return z_new, f_new

    def forget(self) -> None:
        """Drop a kept graph (when the state at a kept time is replaced another way)."""
        self._kept = None


def augmented_dynamics(flat_func: FlatFunc, n: int, params: Sequence[torch.Tensor]) -> AugmentedDynamics:
    """``F_aug(t, z) -> dz/dt`` for ``z = [y, a_y, a_θ]`` (2n + p,)."""
    return AugmentedDynamics(flat_func, n, params)


def undeclared_leaves(output: torch.Tensor, declared: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Tensors requiring grad that ``output``'s graph reaches without passing a declared one.

    Walks ``output.grad_fn`` towards the leaves (``AccumulateGrad`` nodes hold them in
    ``.variable``) and stops at declared tensors: at their ``AccumulateGrad`` node for a
    leaf, at their ``grad_fn`` for a non-leaf (a declared tensor computed from others).
    """
    declared_ids = {id(x) for x in declared}
    stop = {x.grad_fn for x in declared if x.grad_fn is not None}
    found: List[torch.Tensor] = []
    seen = set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in stop:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            if id(variable) not in declared_ids:
                found.append(variable)
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def check_params_declared(flat_func: FlatFunc, t: float, y: torch.Tensor, params: Sequence[torch.Tensor], method_name: str) -> torch.Tensor:
    """Evaluate ``f(t, y)`` once with a graph and raise if it depends on tensors requiring
    grad that are not in ``params``; returns ``f(t, y)`` (n,), detached, for reuse.

    An adjoint differentiates ``f`` only with respect to ``y`` and the declared params, so
    such a tensor would silently receive no gradient. Cost: one evaluation of ``f`` (use
    the result as the solve's first stage) and a walk over its graph.
    """
    with torch.enable_grad():
        y_leaf = y.detach().requires_grad_(True)
        out = flat_func(t, y_leaf)
        missing = undeclared_leaves(out, (y_leaf,) + tuple(params)) if out.requires_grad else []
    if missing:
        shapes = ", ".join(f"tensor of shape {tuple(x.shape)}" for x in missing[:5])
        raise ValueError(
            f"func uses {len(missing)} tensor(s) requiring grad that are not among its params ({shapes}); the "
            f"{method_name} adjoint differentiates only with respect to params, so they would silently get no "
            f"gradient. Pass them explicitly, solve(..., params=[...]) listing every tensor func depends on "
            f"(for an nn.Module, its parameters too), or detach them if they need no gradient"
        )
    return out.detach()
