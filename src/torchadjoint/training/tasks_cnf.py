"""The ``cnf`` task: a continuous normalising flow (FFJORD) on a 2-d toy density.

The flow carries a data point ``x = z(0)`` to ``z(T)`` along ``dz/dt = f_θ(t, z)`` (an MLP
on ``[z, t]``), and the log-density along with it (instantaneous change of variables)::

    d/dt (z, Δ) = (f_θ(t, z), -tr ∂f_θ/∂z),   z(0) = x, Δ(0) = 0,
    log p(x) = log N(z(T); 0, I) - Δ(T).

The trace is Hutchinson's estimate ``εᵀ (∂f/∂z) ε`` with Rademacher ``ε`` (one
vector-Jacobian product per evaluation, the noise fixed for the whole solve, forward and
backward) or, with ``--trace exact``, the exact trace (one product per dimension: cheap
in 2-d). The loss is the batch's negative log-likelihood, optionally plus the RNODE
regularisers (Finlay et al. 2020) of ``torchadjoint.regularisers`` on ``z``'s dynamics:
``--kinetic`` ``∫|f|² dt`` and ``--jacobian`` ``∫|∂f/∂z|_F² dt``.

The test NLL is measured with the exact trace, in float64, at tolerances far tighter than
training's (``EVAL_TOLERANCES``): it is the density the trained flow defines, not the
training solver's error. Beside it: the true density's NLL on the same test points
(:mod:`.data_cnf` knows every density exactly) and the gap between the two.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, List, Optional

import torch
from torch import nn

from ..models import NeuralODE
from ..regularisers import kinetic_jacobian
from ..solve import solve
from . import data_cnf
from .config import TrainConfig
from .errors import TrainingError
from .data import epoch_generator
from .distributed import all_sum, shard
from .tasks import Task, regularisation

TRACES = ("hutchinson", "exact")
# The test NLL and the plots: float64, dopri5 at these tolerances, exact trace.
EVAL_TOLERANCES = dict(rtol=1e-7, atol=1e-7)


class CNFField(nn.Module):
    """``f(t, y) -> dy/dt`` for the flow's state ``y = [z, Δ]`` (B, d + 1):
    ``dz/dt = MLP([z, t])`` (``layers`` tanh layers of width ``hidden``), ``dΔ/dt = -tr ∂f/∂z``.

    ``trace="hutchinson"`` needs ``self.noise`` (B, d), set before each solve and kept
    through its backward pass. The trace's graph is built only when the caller records
    gradients (the adjoints' forward solves run without one; their backward passes
    differentiate through the trace).
    """

    def __init__(self, dim: int = 2, hidden: int = 64, layers: int = 3, trace: str = "hutchinson"):
        super().__init__()
        if trace not in TRACES:
            raise ValueError(f"trace must be one of {TRACES}, got {trace!r}")
        widths = [dim + 1] + [hidden] * layers
        blocks: List[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            blocks += [nn.Linear(a, b), nn.Tanh()]
        self.net = nn.Sequential(*blocks, nn.Linear(widths[-1], dim))
        self.dim = dim
        self.trace = trace
        self.noise: Optional[torch.Tensor] = None

    def velocity(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``dz/dt`` alone: z (B, d) -> (B, d)."""
        return self.net(torch.cat([z, t.to(z).expand(z.shape[0], 1)], dim=1))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        record = torch.is_grad_enabled()
        given_graph = y.requires_grad  # a running cost that differentiates dz passes y with a graph
        with torch.enable_grad():
            if not y.requires_grad:
                y = y.detach().requires_grad_(True)
            z = y[:, : self.dim]
            dz = self.velocity(t, z)
            if self.trace == "exact":
                trace = sum(
                    torch.autograd.grad(dz[:, i].sum(), z, create_graph=record, retain_graph=True)[0][:, i]
                    for i in range(self.dim)
                )
            else:
                noise = self.noise
                if noise is None or noise.shape != z.shape:
                    raise ValueError(
                        f"the Hutchinson trace needs noise shaped like z {tuple(z.shape)}, got "
                        f"{None if noise is None else tuple(noise.shape)}; pass noise= to CNF.log_prob or use trace='exact'"
                    )
                vjp = torch.autograd.grad(dz, z, noise, create_graph=record, retain_graph=True)[0]
                trace = (vjp * noise).sum(dim=1)
        if not record:
            trace = trace.detach()
            if not given_graph:
                dz = dz.detach()
        return torch.cat([dz, -trace[:, None]], dim=1)


class OnFlowState:
    """A running cost of the flow's state ``[z, Δ]`` (B, d + 1) that sees ``dz/dt`` only
    (``dΔ/dt`` replaced by 0): the RNODE regularisers penalise the flow's velocity and its
    Jacobian ``∂f/∂z``, not the log-density's rate."""

    def __init__(self, cost, dim: int = 2):
        self.cost, self.dim = cost, dim
        self.needs_graph = bool(getattr(cost, "needs_graph", False))
        self.output_shape = getattr(cost, "output_shape", ())

    def for_solve(self, y0):
        return OnFlowState(self.cost.for_solve(y0) if hasattr(self.cost, "for_solve") else self.cost, self.dim)

    def __call__(self, t, y, dy):
        velocity_only = torch.cat([dy[..., : self.dim], torch.zeros_like(dy[..., self.dim:])], dim=-1)
        return self.cost(t, y, velocity_only)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I): z (B, d) -> (B,)."""
    return -0.5 * (z.pow(2).sum(dim=1) + z.shape[1] * math.log(2 * math.pi))


class CNF(nn.Module):
    """A continuous normalising flow on ``[0, T]``: data at ``t = 0``, N(0, I) at ``t = T``.

    ``log_prob(x, noise)``: x (B, d) -> (B,) nats; ``sample(z_T, times)``: base points
    (B, d) carried back to the data, at ``times`` running from T to 0 -> (len(times), B, d).
    """

    def __init__(self, dim: int = 2, hidden: int = 64, layers: int = 3, trace: str = "hutchinson", T: float = 1.0,
                 **solver_kwargs: Any):
        super().__init__()
        self.field = CNFField(dim, hidden, layers, trace)
        self.flow = NeuralODE(self.field, (0.0, float(T)), **solver_kwargs)

    def log_prob(self, x: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        self.field.noise = noise
        y = self.flow(torch.cat([x, x.new_zeros(x.shape[0], 1)], dim=1))
        return standard_normal_log_prob(y[:, :-1]) - y[:, -1]

    forward = log_prob

    @torch.no_grad()
    def sample(self, z_T: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        return solve(self.field.velocity, z_T, times.to(z_T), method=self.flow.method, rtol=self.flow.rtol,
                     atol=self.flow.atol).ys


class CNFTask(Task):
    name = "cnf"
    description = "continuous normalising flow (FFJORD) on a 2-d toy density, test NLL beside the true density's"
    defaults = dict(
        epochs=8, batch_size=256, lr=5e-3, lr_decay=0.8, hidden=64, rtol=1e-4, atol=1e-4, T=1.0, iterations=50,
        density="8gaussians", trace="hutchinson", gradient="checkpointed",
    )
    metrics = ("test_nll", "true_nll", "nll_gap", "nll_gap_stderr")
    headline = "nll_gap"

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        if config.density not in data_cnf.DENSITIES:
            raise TrainingError(f"--density {config.density!r} is not a density; choose from {sorted(data_cnf.DENSITIES)}")
        if config.trace not in TRACES:
            raise TrainingError(f"--trace {config.trace!r}: choose from {TRACES}")
        self.density = data_cnf.density(config.density)
        x_test = data_cnf.test_set(config.density)
        self.true_log_prob = self.density.log_prob(x_test)  # float64, (TEST_SIZE,)
        self.x_test = x_test.to(ctx.device)

    @classmethod
    def solver_options(cls, c: TrainConfig) -> dict:
        options = cls.solver_kwargs(c)
        options.pop("running_cost", None)
        # RNODE: the regularisers act on z's dynamics (Rademacher noise for the Frobenius estimate).
        regulariser = kinetic_jacobian(c.kinetic or 0.0, c.jacobian or 0.0, noise="rademacher")
        if regulariser is not None:
            options["running_cost"] = OnFlowState(regulariser)
        return options

    @classmethod
    def make_model(cls, config, spec):
        return CNF(2, config.hidden, trace=config.trace, T=config.T, **cls.solver_options(config))

    def epoch_batches(self, epoch: int) -> List[torch.Tensor]:
        """Fresh samples every epoch (the density is known: no finite training set to
        overfit): each batch (batch_size, 4) = data points (2) and their Rademacher noise (2)."""
        c = self.config
        generator = epoch_generator(c.seed, epoch)
        iterations = c.iterations if c.limit_batches <= 0 else min(c.iterations, c.limit_batches)
        batches = []
        for _ in range(iterations):
            x = self.density.sample(c.batch_size, generator).to(self.dtype)
            noise = torch.randint(0, 2, (c.batch_size, 2), generator=generator).to(self.dtype) * 2 - 1
            batches.append(torch.cat([x, noise], dim=1))
        return batches

    def batch_loss(self, model, batch):
        local = batch[shard(len(batch), self.ctx)].to(self.ctx.device)
        log_p = model(local[:, :2], local[:, 2:])
        loss_sum = -log_p.sum()
        loss = loss_sum / len(batch) + regularisation(model) * (len(local) / len(batch))
        return loss, {"loss": float(loss_sum.detach()), "count": len(local)}

    def evaluation_model(self, model: nn.Module) -> CNF:
        """A float64 copy of ``model`` with the exact trace and tight tolerances (no DDP
        wrappers, no synchronised norms: each process scores its own points)."""
        c = dataclasses.replace(self.config, trace="exact", kinetic=0.0, jacobian=0.0, method="dopri5", step_size=None,
                                gradient="direct", **EVAL_TOLERANCES)
        copy = self.make_model(c, self.spec).to(self.ctx.device, torch.float64)
        copy.load_state_dict(model.state_dict())
        return copy.eval()

    @torch.no_grad()
    def evaluate(self, model):
        exact = self.evaluation_model(model)
        part = shard(len(self.x_test), self.ctx)
        log_p = exact.log_prob(self.x_test[part]).cpu()
        true = self.true_log_prob[part]
        diff = true - log_p
        nll, true_nll, diff_sq, count = all_sum([-log_p.sum(), -true.sum(), diff.pow(2).sum(), len(log_p)], self.ctx)
        gap = (nll - true_nll) / count
        # The standard error of the gap (a mean over the test points of true − learned log p).
        stderr = math.sqrt(max(diff_sq / count - gap**2, 0.0) / max(count - 1, 1))
        return {"test_nll": nll / count, "true_nll": true_nll / count, "nll_gap": gap, "nll_gap_stderr": stderr}

    def plot(self, model, folder):
        from . import plots_cnf
        from .plots import run_label

        exact = self.evaluation_model(model)
        generator = torch.Generator().manual_seed(self.config.seed)
        data = self.density.sample(2000, generator)
        z_T = torch.randn(2000, 2, generator=generator, dtype=torch.float64).to(self.ctx.device)
        times = torch.linspace(float(self.config.T), 0.0, 6, dtype=torch.float64)
        flow = exact.sample(z_T, times).cpu()
        paths = [os.path.join(folder, name) for name in ("density.png", "samples.png", "flow.png")]
        label = run_label(self.config)
        mass = plots_cnf.plot_densities(lambda x: exact.log_prob(x.to(self.ctx.device)).cpu(), self.density.log_prob,
                                        data, paths[0], label)
        plots_cnf.plot_samples(data, flow[-1], paths[1], label)
        plots_cnf.plot_flow(times, flow, paths[2], label)
        logging.getLogger("torchadjoint.train").info("cnf: the learned density integrates to %.4f over the plotted square (the true one to %.4f)",
                 mass[0], mass[1])
        return paths
