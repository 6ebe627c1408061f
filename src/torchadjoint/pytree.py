"""States as pytrees (tensor, tuple/list, dict, nested) flattened to one 1-D tensor.

The solver works on a single flat vector of length ``n``: stage combinations become one
matrix-vector product and the error norm one reduction, whatever the user's structure.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

import torch


@dataclass(frozen=True)
class TreeSpec:
    """Structure of a state: ``kind`` is "tensor", "tuple", "list" or "dict"."""

    kind: str
    children: tuple = ()
    keys: tuple = ()
    shape: tuple = ()

    @property
    def leaf_shapes(self) -> List[tuple]:
        if self.kind == "tensor":
            return [self.shape]
        return [s for c in self.children for s in c.leaf_shapes]


def tree_leaves(tree: Any, name: str = "y0") -> tuple:
    """Flatten a pytree to ``(leaves, spec)``; raises TypeError naming ``name`` otherwise."""
    leaves: list = []

    def walk(node, path):
        if isinstance(node, torch.Tensor):
            leaves.append(node)
            return TreeSpec("tensor", shape=tuple(node.shape))
        if isinstance(node, (tuple, list)):
            if len(node) == 0:
                raise TypeError(f"{path} is an empty {type(node).__name__}; a state needs at least one tensor")
            kids = tuple(walk(c, f"{path}[{i}]") for i, c in enumerate(node))
            return TreeSpec("tuple" if isinstance(node, tuple) else "list", children=kids)
        if isinstance(node, dict):
            if len(node) == 0:
                raise TypeError(f"{path} is an empty dict; a state needs at least one tensor")
            keys = tuple(node.keys())
            kids = tuple(walk(node[k], f"{path}[{k!r}]") for k in keys)
            return TreeSpec("dict", children=kids, keys=keys)
        raise TypeError(
            f"{path} must be a torch.Tensor or a tuple/list/dict of tensors, got {type(node).__name__}; "
            f"convert it with torch.as_tensor(...)"
        )

    spec = walk(tree, name)
    return leaves, spec


def tree_unflatten(leaves: List[Any], spec: TreeSpec) -> Any:
    """Inverse of :func:`tree_leaves`: rebuild the structure from leaves in order."""
    it = iter(leaves)

    def build(s: TreeSpec):
        if s.kind == "tensor":
            return next(it)
        kids = [build(c) for c in s.children]
        if s.kind == "tuple":
            return tuple(kids)
        if s.kind == "list":
            return kids
        return dict(zip(s.keys, kids))

    return build(spec)


def concat_leaves(leaves: List[torch.Tensor]) -> torch.Tensor:
    """Leaves already in a structure's order (:meth:`Flattener.leaves_of`) → flat (n,)."""
    return torch.cat([x.reshape(-1) for x in leaves])


class Flattener:
    """Maps a state of a given structure to a flat (n,) tensor and back.

    ``flatten`` concatenates (a view, for a single tensor); ``unflatten`` returns views
    into the flat tensor. Leading ``batch`` dimensions may be kept in front (used for the
    stacked output ``ys`` of shape (N, n)).
    """

    def __init__(self, spec: TreeSpec):
        self.spec = spec
        self.shapes = spec.leaf_shapes
        self.sizes = [int(torch.Size(s).numel()) for s in self.shapes]
        self.numel = sum(self.sizes)
        self.is_tensor = spec.kind == "tensor"

    def flatten(self, tree: Any) -> torch.Tensor:
        """A pytree of this structure (a state, or ``f``'s output) → flat (n,).

        The one place a structure becomes a flat vector: dict entries are taken by key (see
        :meth:`leaves_of`), so a dict whose keys come in another order than the state's
        cannot swap components. TypeError if ``tree`` does not have this structure."""
        if self.is_tensor:
            return tree.reshape(-1)
        leaves = self.leaves_of(tree)
        if leaves is None:
            raise TypeError(f"expected a state in the structure of y0 ({self.spec}), got {type(tree).__name__}")
        return concat_leaves(leaves)

    def leaves_of(self, tree: Any) -> Optional[List[Any]]:
        """The leaves of ``tree`` in this structure's order, or None if ``tree`` does not
        have this structure. Dict entries are taken by key (a dict returned with its keys
        in another order must not swap components); a tuple and a list of the same length
        are interchangeable. Leaves are not checked."""
        leaves: list = []

        def walk(spec: TreeSpec, node: Any) -> bool:
            if spec.kind == "tensor":
                leaves.append(node)
                return isinstance(node, torch.Tensor)
            if spec.kind == "dict":
                if not isinstance(node, dict) or len(node) != len(spec.keys) or any(k not in node for k in spec.keys):
                    return False
                return all(walk(c, node[k]) for c, k in zip(spec.children, spec.keys))
            if not isinstance(node, (tuple, list)) or len(node) != len(spec.children):
                return False
            return all(walk(c, x) for c, x in zip(spec.children, node))

        return leaves if walk(self.spec, tree) else None

    def unflatten(self, flat: torch.Tensor) -> Any:
        """``flat``: (..., n) → pytree whose leaves have shape (..., *leaf_shape)."""
        lead = flat.shape[:-1]
        if self.is_tensor:
            return flat.view((*lead, *self.shapes[0]))  # a tuple: view() with no sizes is an error
        parts = torch.split(flat, self.sizes, dim=-1)
        return tree_unflatten([p.reshape((*lead, *s)) for p, s in zip(parts, self.shapes)], self.spec)  # a tuple: 0-dim leaves too

    def leaves_like(self, value: Any, name: str, dtype, device) -> torch.Tensor:
        """Broadcast a per-leaf value (scalar, tensor, or matching pytree) to a flat (n,) tensor."""
        if isinstance(value, dict):
            missing = [k for k in self.spec.keys if k not in value]
            if self.spec.kind != "dict" or missing:
                raise ValueError(f"{name} is a dict but its keys do not match the state's keys {list(self.spec.keys)}")
            parts = [value[k] for k in self.spec.keys]
        elif isinstance(value, (tuple, list)):
            parts = list(value)
        else:
            parts = [value] * len(self.shapes)
        if len(parts) != len(self.shapes):
            raise ValueError(
                f"{name} has {len(parts)} components but the state has {len(self.shapes)} tensors; "
                f"give one value per state tensor, or a single scalar"
            )
        flat = []
        for v, shape in zip(parts, self.shapes):
            v = torch.as_tensor(v, dtype=dtype, device=device)
            try:
                flat.append(torch.broadcast_to(v, shape).reshape(-1))
            except RuntimeError:
                raise ValueError(
                    f"{name} of shape {tuple(v.shape)} does not broadcast to the state's shape {shape}"
                ) from None
        return torch.cat(flat) if len(flat) > 1 else flat[0]
