"""torchdiffeq's ``scipy_solver``: ``scipy.integrate.solve_ivp`` on the CPU, gradients by
the continuous adjoint solved with the same scipy method.

As in torchdiffeq: the state travels to NumPy in float64 and back in its own dtype and
device; ``options`` takes ``solver`` (a ``solve_ivp`` method name, default ``"LSODA"``),
``min_step`` and ``max_step``. The backward pass integrates ``(y, a_y, a_θ)`` from each
output time to the one before (``y`` restarted there from the forward's value, the jump
``∂L/∂y(t_i)`` added to ``a_y``), one ``torch.autograd.grad`` per evaluation. Gradients
reach ``y0`` and ``params``; not ``t``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, List, Sequence

import numpy as np
import torch

from ..pytree import Flattener
from ..validation import check_state

SCIPY_OPTIONS = ("solver", "min_step", "max_step")


def scipy_odeint(func, y0, t: torch.Tensor, rtol: float, atol: float, options, params: Sequence[torch.Tensor]):
    """``ys`` (N, *y0 shape) at ``t`` (a tuple/dict of such for tree states)."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(SCIPY_OPTIONS))
    if unknown:
        # As the rest of the front door (and torchdiffeq): keys the method does not use are
        # left out with one warning naming them.
        warnings.warn(f"method='scipy_solver' ignores options {unknown}; it takes {list(SCIPY_OPTIONS)}")
        options = {k: v for k, v in options.items() if k in SCIPY_OPTIONS}
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(f"{name} must be a float for method='scipy_solver', got {type(value).__name__}")
    if t.requires_grad:
        raise ValueError("method='scipy_solver' gives no gradient for t: pass t without requires_grad, or use "
                         "another method (every other method differentiates the output times)")
    flattener, dtype, device = check_state(y0)
    params = tuple(p for p in params if p.requires_grad)
    flat = flattener.flatten(y0)
    times = [float(x) for x in t.detach().cpu().tolist()]
    ys = _ScipySolve.apply(_ScipyCall(func, flattener, times, float(rtol), float(atol), options), flat, *params)
    return flattener.unflatten(ys)


def _solve_ivp(fun, t0: float, t1: float, z0: np.ndarray, rtol: float, atol: float, options: dict, t_eval=None):
    from scipy.integrate import solve_ivp

    extra = {k: options[k] for k in ("min_step", "max_step") if k in options}  # only LSODA knows min_step
    r = solve_ivp(fun, (t0, t1), z0, method=options.get("solver", "LSODA"), t_eval=t_eval, rtol=rtol, atol=atol,
                  **extra)
    if not r.success:
        from ..errors import SolveError

        reached = float(r.t[-1]) if len(r.t) else t0
        raise SolveError(reached, f"scipy's {options.get('solver', 'LSODA')} failed: {r.message}")
    return r


@dataclass
class _ScipyCall:
    """What :class:`_ScipySolve` needs besides the tensors it differentiates (one object
    instead of positional arguments): the user's ``func``, the state's flattener, the
    output times and the solver settings."""

    func: Callable
    flattener: Flattener
    times: List[float]
    rtol: float
    atol: float
    options: dict


class _ScipySolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call: _ScipyCall, y0, *params):
        dtype, device = y0.dtype, y0.device
        func, flattener, times = call.func, call.flattener, call.times

        def fun(s, y):
            with torch.no_grad():
                out = func(torch.tensor(s, dtype=dtype, device=device),
                           flattener.unflatten(torch.from_numpy(y).to(dtype=dtype, device=device)))
                return flattener.flatten(out).detach().cpu().double().numpy()

        z0 = y0.detach().cpu().double().numpy()
        if len(times) == 1:
            ys = y0.detach()[None].clone()
        else:
            r = _solve_ivp(fun, times[0], times[-1], z0, call.rtol, call.atol, call.options, t_eval=times)
            ys = torch.from_numpy(r.y.T.copy()).to(dtype=dtype, device=device)
        ctx.call = call
        ctx.save_for_backward(ys, *params)
        return ys

    @staticmethod
    def backward(ctx, grad_ys):
        ys, *params = ctx.saved_tensors
        call = ctx.call
        func, flattener, times = call.func, call.flattener, call.times
        dtype, device = ys.dtype, ys.device
        n = ys.shape[1]
        sizes = [p.numel() for p in params]

        def augmented(s, z):
            zt = torch.from_numpy(z).to(dtype=dtype, device=device)
            with torch.enable_grad():
                y = zt[:n].detach().requires_grad_(True)
                out = flattener.flatten(func(torch.tensor(s, dtype=dtype, device=device), flattener.unflatten(y)))
                grads = torch.autograd.grad(out, (y,) + tuple(params), zt[n:2 * n], allow_unused=True)
            pieces = [out.detach(), -(grads[0] if grads[0] is not None else torch.zeros_like(y))]
            pieces += [-(g.reshape(-1) if g is not None else torch.zeros(k, dtype=dtype, device=device))
                       for g, k in zip(grads[1:], sizes)]
            return torch.cat(pieces).detach().cpu().double().numpy()

        a_y = grad_ys[-1].detach().cpu().double().numpy()
        a_theta = np.zeros(sum(sizes))
        for i in range(len(times) - 1, 0, -1):
            z0 = np.concatenate([ys[i].detach().cpu().double().numpy(), a_y, a_theta])
            r = _solve_ivp(augmented, times[i], times[i - 1], z0, call.rtol, call.atol, call.options)
            z = r.y[:, -1]
            a_y = z[n:2 * n] + grad_ys[i - 1].detach().cpu().double().numpy()
            a_theta = z[2 * n:]
        grad_y0 = torch.from_numpy(a_y).to(dtype=dtype, device=device)
        grad_params, start = [], 0
        for p, k in zip(params, sizes):
            grad_params.append(torch.from_numpy(a_theta[start:start + k].copy()).to(dtype=p.dtype, device=p.device).view_as(p))
            start += k
        return (None, grad_y0, *grad_params)  # nothing for the call
