"""The ``latent`` task: a latent ODE (Rubanova, Chen & Duvenaud 2019) on irregularly sampled
time series, beside a GRU baseline trained on the same batches in the same run.

Data (:mod:`.data_latent`): noisy 2-d trajectories of randomly parametrised damped
rotations, each observed at its own random times inside the first half of a time grid.

Latent ODE: a GRU runs *backwards in time* over a trajectory's observations (input: the
value and its time) and gives ``q(z0) = N(μ, σ²)``; ``z0 ~ q`` evolves by
``dz/dt = f_θ(z)`` (an autonomous MLP) through one ODE solve for the whole batch, output at
every grid time of the window; a linear read-out gives the predicted observation. Trained
by the ELBO: the Gaussian log-likelihood (std ``OBSERVATION_STD``) of the observed values
minus ``KL(q(z0) ‖ N(0, I))``.

Baseline (the RNN-VAE/GRU-Δt decoder of Rubanova et al., deterministic): the same kind of
backward GRU encoder gives the initial hidden state of a GRU decoder that steps through the
grid times (input: the time step), with a linear read-out; trained on the squared error of
the observed values (scaled like the latent ODE's likelihood). Its parameters are disjoint
from the latent ODE's, and Adam treats every parameter on its own, so training both in one
optimiser is training each on its own.

Measured on the test trajectories (the encoders see the observed points of the window;
the latent ODE decodes from the posterior mean): the mean squared error against the
noise-free states at the window's *unobserved* grid times (interpolation) and at every grid
time after the window (extrapolation).

Many output times per solve (every grid time of the window): an adjoint's backward solve
must stop at each of them, autograd through the solver's steps does not, so the default
gradient is ``direct`` (``torchadjoint compare latent`` measures every method).
"""
from __future__ import annotations

import math
import os
from typing import Tuple

import torch
from torch import nn

from ..models import MLPField, NeuralODE
from . import data_latent
from .data import epoch_batches, epoch_generator
from .distributed import all_sum, shard
from .tasks import Task, regularisation

OBSERVATION_STD = 0.1


class BackwardGRUEncoder(nn.Module):
    """A GRU over a trajectory's observations from the last to the first.

    ``encode(t (G,), values (B, G, d), mask (B, G))`` -> the final hidden state (B, hidden).
    The cell runs at every grid time and keeps the state where nothing was observed, so each
    trajectory sees exactly its own observations, in reverse time order.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.cell = nn.GRUCell(dim + 1, hidden)
        self.hidden = hidden

    def forward(self, t: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, G, _ = values.shape
        h = values.new_zeros(B, self.hidden)
        for i in range(G - 1, -1, -1):
            seen = mask[:, i]
            if not bool(seen.any()):
                continue
            inputs = torch.cat([values[:, i], t[i].expand(B, 1)], dim=1)
            h = torch.where(seen[:, None], self.cell(inputs, h), h)
        return h


class LatentODE(nn.Module):
    """Encoder -> q(z0) -> ODE decoder -> read-out. See the module docstring."""

    def __init__(self, dim: int, latent: int, hidden: int, **solver_kwargs):
        super().__init__()
        self.encoder = BackwardGRUEncoder(dim, hidden)
        self.posterior = nn.Linear(hidden, 2 * latent)
        self.decoder = NeuralODE(MLPField(latent, hidden, time_dependent=False), **solver_kwargs)
        self.readout = nn.Linear(latent, dim)

    def q_z0(self, t, values, mask) -> Tuple[torch.Tensor, torch.Tensor]:
        """The posterior's mean and std, each (B, latent)."""
        mean, raw_std = self.posterior(self.encoder(t, values, mask)).chunk(2, dim=1)
        return mean, nn.functional.softplus(raw_std) + 1e-4

    def decode(self, z0: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """z0 (B, latent), t (N,) from 0 -> (predictions (B, N, dim), latent states (N, B, latent))."""
        zs = self.decoder(z0, t)
        return self.readout(zs).transpose(0, 1), zs


class GRUBaseline(nn.Module):
    """Backward GRU encoder -> GRU decoder stepping through the grid times (input: the time
    step) -> read-out: ``predict(t, values, mask, t_out (N,))`` -> (B, N, dim)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.encoder = BackwardGRUEncoder(dim, hidden)
        self.decoder = nn.GRUCell(1, hidden)
        self.readout = nn.Linear(hidden, dim)

    def predict(self, t, values, mask, t_out: torch.Tensor) -> torch.Tensor:
        h = self.encoder(t, values, mask)
        steps = torch.diff(t_out, prepend=t_out[:1])
        outputs = []
        for dt in steps:
            h = self.decoder(dt.expand(h.shape[0], 1), h)
            outputs.append(self.readout(h))
        return torch.stack(outputs, dim=1)


class LatentWithBaseline(nn.Module):
    """The two models of one run: ``latent`` (:class:`LatentODE`) and ``baseline`` (:class:`GRUBaseline`)."""

    def __init__(self, dim: int, latent: int, hidden: int, **solver_kwargs):
        super().__init__()
        self.latent = LatentODE(dim, latent, hidden, **solver_kwargs)
        self.baseline = GRUBaseline(dim, hidden)

    def forward(self, t, values, mask, eps):
        """``t`` (N,) the window's grid times, ``values`` (B, N, dim) and ``mask`` (B, N) its
        observations, ``eps`` (B, latent) the reparametrisation noise -> the negative ELBO
        per trajectory (B,) and the baseline's scaled squared error (B,). Both models predict
        at every time of ``t``; only the observed ones enter the losses."""
        mean, std = self.latent.q_z0(t, values, mask)
        z0 = mean + std * eps
        predicted, _ = self.latent.decode(z0, t)
        weight = mask[..., None].expand_as(values).to(values.dtype)  # one per observed coordinate
        # Gaussian log-likelihood of the observed values (the constant included: nats).
        sq = ((predicted - values) ** 2 * weight).sum(dim=(1, 2))
        log_lik = -sq / (2 * OBSERVATION_STD**2) - weight.sum(dim=(1, 2)) * math.log(math.sqrt(2 * math.pi) * OBSERVATION_STD)
        kl = (0.5 * (mean**2 + std**2 - 1) - std.log()).sum(dim=1)
        baseline = self.baseline.predict(t, values, mask, t)
        baseline_sq = ((baseline - values) ** 2 * weight).sum(dim=(1, 2)) / (2 * OBSERVATION_STD**2)
        return kl - log_lik, baseline_sq


class LatentTask(Task):
    name = "latent"
    description = ("latent ODE (GRU encoder backwards over irregular observations, ODE decoder, ELBO) on noisy "
                   "damped rotations, interpolation and extrapolation beside a GRU baseline")
    defaults = dict(
        epochs=20, batch_size=50, lr=1e-2, lr_decay=0.9, hidden=32, rtol=1e-3, atol=1e-4, latent_dim=6,
        gradient="direct",
    )
    metrics = ("interp_mse", "extrap_mse", "gru_interp_mse", "gru_extrap_mse", "baseline_train_loss")
    headline = "extrap_mse"

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        train, test = data_latent.load(self.dtype)
        self.train_set, self.test_set = train.to(ctx.device), test.to(ctx.device)
        self.window = train.window

    @classmethod
    def make_model(cls, config, spec):
        return LatentWithBaseline(2, config.latent_dim, config.hidden, **cls.solver_kwargs(config))

    def build_model(self):
        model = super().build_model()
        gradient = self.config.gradient
        if self.ctx.distributed and gradient != "direct":
            # An adjoint's backward solve stops at the output times whose incoming gradient is
            # non-zero; a process whose trajectories miss a grid time would stop at fewer times
            # than the others, and their synchronised steps would part. Making every step land
            # on every grid time of the window keeps all processes' steps the same.
            model.latent.decoder.options["step_t"] = tuple(self.train_set.t[: self.window].tolist())
        return model

    def epoch_batches(self, epoch: int):
        """Shuffled index batches (batch_size,), each with the reparametrisation noise of its
        trajectories (batch_size, latent_dim) drawn from the epoch's own generator: the
        same whatever the number of processes or an interruption."""
        c = self.config
        batches = epoch_batches(len(self.train_set.mask), c.batch_size, c.seed, epoch, c.limit_batches)
        generator = epoch_generator(c.seed, epoch, stream=1)
        return [(b, torch.randn(len(b), c.latent_dim, generator=generator).to(self.dtype)) for b in batches]

    def _window(self, data: data_latent.Trajectories, index):
        w = self.window
        return data.t[:w], data.values[index, :w], data.mask[index, :w]

    def batch_loss(self, model, batch):
        indices, eps = batch
        part = shard(len(indices), self.ctx)
        index = indices[part].to(self.ctx.device)
        t, values, mask = self._window(self.train_set, index)
        neg_elbo, baseline = model(t, values, mask, eps[part].to(self.ctx.device))
        loss = (neg_elbo.sum() + baseline.sum()) / len(indices) + regularisation(model) * (len(index) / len(indices))
        return loss, {"loss": float(neg_elbo.sum().detach()), "baseline_loss": float(baseline.sum().detach()),
                      "count": len(index)}

    def train_metrics(self, sums):
        count = max(sums["count"], 1)
        return {"train_loss": sums["loss"] / count, "baseline_train_loss": sums["baseline_loss"] / count}

    @torch.no_grad()
    def predictions(self, model, index) -> Tuple[torch.Tensor, torch.Tensor]:
        """Both models' predictions on the whole grid for test trajectories ``index``: (B, G, 2) each."""
        t, values, mask = self._window(self.test_set, index)
        mean, _ = model.latent.q_z0(t, values, mask)
        latent, _ = model.latent.decode(mean, self.test_set.t)
        gru = model.baseline.predict(t, values, mask, self.test_set.t)
        return latent, gru

    @torch.no_grad()
    def evaluate(self, model):
        test = self.test_set
        index = torch.arange(len(test.mask), device=self.ctx.device)[shard(len(test.mask), self.ctx)]
        latent, gru = self.predictions(model, index)
        truth, mask = test.truth[index], test.mask[index]
        inside = torch.zeros_like(mask)
        inside[:, : self.window] = True
        held_out = (inside & ~mask)[..., None]  # the window's unobserved grid times
        after = (~inside)[..., None]
        sums = []
        for prediction in (latent, gru):
            sq = (prediction - truth) ** 2
            sums += [(sq * held_out).sum(), (sq * after).sum()]
        n_held, n_after = float(held_out.sum()) * 2, float(after.sum()) * 2
        li, le, gi, ge, n_held, n_after = all_sum(sums + [n_held, n_after], self.ctx)
        return {"interp_mse": li / n_held, "extrap_mse": le / n_after, "gru_interp_mse": gi / n_held,
                "gru_extrap_mse": ge / n_after}

    def plot(self, model, folder):
        from . import plots_latent
        from .plots import run_label

        test = self.test_set
        index = torch.arange(4, device=self.ctx.device)
        t, values, mask = self._window(test, index)
        with torch.no_grad():
            mean, std = model.latent.q_z0(t, values, mask)
            generator = torch.Generator().manual_seed(self.config.seed)
            draws = [mean + std * torch.randn(mean.shape, generator=generator).to(mean) for _ in range(20)]
            samples = torch.stack([model.latent.decode(z0, test.t)[0] for z0 in draws])  # (S, B, G, 2)
            latent, gru = self.predictions(model, index)
            _, zs = model.latent.decode(mean, test.t)
        paths = [os.path.join(folder, "reconstructions.png"), os.path.join(folder, "latent_trajectories.png")]
        label = run_label(self.config)
        plots_latent.plot_reconstructions(test.t.cpu(), float(test.t[self.window - 1]), test.truth[index].cpu(),
                                          values.cpu(), mask.cpu(), samples.cpu(), latent.cpu(), gru.cpu(), paths[0],
                                          label)
        plots_latent.plot_latent_trajectories(test.t.cpu(), zs.cpu(), self.window, paths[1], label)
        return paths


def compare_problem(batch: int = 50, latent: int = 6, hidden: int = 32) -> dict:
    """The latent ODE's decoder solve as a ``torchadjoint compare`` problem (float64): an
    untrained decoder field from posterior-like ``z0`` (batch, latent), output at every
    grid time of the observed window (50 times), loss the Gaussian negative log-likelihood
    of the first ``batch`` training trajectories' observations under a fixed read-out."""
    torch.manual_seed(0)
    train, _ = data_latent.load(torch.float64)
    w = train.window
    t, values, mask = train.t[:w], train.values[:batch, :w], train.mask[:batch, :w]
    func = MLPField(latent, hidden, time_dependent=False).double()
    readout = nn.Linear(latent, 2).double()
    for p in readout.parameters():
        p.requires_grad_(False)
    z0 = torch.randn(batch, latent, dtype=torch.float64)

    def loss(ys):
        predicted = readout.to(ys.dtype)(ys).transpose(0, 1)  # (batch, window, 2)
        weight = mask[..., None].to(ys.dtype)
        return ((predicted - values.to(ys.dtype)) ** 2 * weight).sum() / (2 * OBSERVATION_STD**2) / batch

    return dict(func=func, y0=z0, t=t, loss=loss,
                description=f"latent ODE decoder: z0 ({batch}, {latent}), MLP {latent}-{hidden}-{latent}, Gaussian NLL "
                            f"of irregular observations at {w} output times on [0, {float(t[-1]):g}]")
