"""Conformance: programs written in the style of torchdiffeq's examples, run once through
torchdiffeq and once through torchadjoint with only the module changed.

Each program is a function of ``lib`` (the module it would ``import``) that calls nothing
but ``lib.odeint``, ``lib.odeint_adjoint`` and ``lib.odeint_event``, trains for a few
iterations from the same seed, and records what a user would look at: losses, outputs,
event times, gradients and the trained parameters. The two records must agree within a
bound scaled by the solver tolerances the program asked for:

    |ours - theirs| <= FACTOR[kind] · (rtol · max|theirs| + atol)    (per recorded tensor)

(float32 programs add the dtype's rounding, ``eps · max|theirs|``, to the scale). FACTOR
accounts for what legitimately differs: the adaptive step sequences (each library's error
estimate keeps its own solution within the tolerance, not within each other's), the
adjoint's backward solve, and a few optimiser steps compounding them. The factors are
measured, with headroom of about 3-10× over what these programs show (see docs/migration.md).
"""
import math
import warnings

import pytest
import torch
import torchdiffeq
from torch import nn

import torchadjoint

D = torch.float64
# Bound factor per kind of recorded value (multiplies rtol·max|reference| + atol).
FACTOR = {"output": 100.0, "event_t": 100.0, "grad": 1000.0, "param": 1000.0}


def compare(ours: dict, theirs: dict, rtol: float, atol: float, dtype=D):
    assert ours.keys() == theirs.keys()
    eps = torch.finfo(dtype).eps
    worst = {}
    for name, (kind, a) in ours.items():
        b = theirs[name][1]
        assert a.shape == b.shape, (name, a.shape, b.shape)
        ref = float(b.abs().max())
        scale = rtol * ref + atol + (eps * ref if dtype != D else 0.0)
        error = float((a - b).abs().max())
        worst[name] = error / scale
        assert error <= FACTOR[kind] * scale, (
            f"{name} ({kind}): |ours - torchdiffeq| = {error:.3g} > {FACTOR[kind]} × {scale:.3g} (ratio {error / scale:.3g})"
        )
    return worst


def record(out: dict, kind: str, name: str, value):
    out[name] = (kind, value.detach().clone().to(D))


def record_grads(out: dict, module: nn.Module, prefix: str):
    for pname, p in module.named_parameters():
        if p.grad is not None:
            record(out, "grad", f"{prefix}.grad.{pname}", p.grad)


def record_params(out: dict, module: nn.Module, prefix: str):
    for pname, p in module.named_parameters():
        record(out, "param", f"{prefix}.{pname}", p)


# ------------------------------------------------------------------ the demo spiral (ode_demo.py)


class SpiralFunc(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2)).to(D)
        for m in self.net.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0, std=0.1)
                nn.init.constant_(m.bias, val=0)

    def forward(self, t, y):
        return self.net(y ** 3)


def spiral_program(lib, adjoint: bool, iterations=3):
    torch.manual_seed(0)
    true_A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=D)
    t = torch.linspace(0.0, 5.0, 40, dtype=D)
    true_y0 = torch.tensor([[2.0, 0.0]], dtype=D)
    with torch.no_grad():
        true_y = lib.odeint(lambda t, y: torch.mm(y ** 3, true_A), true_y0, t, method="dopri5")
    func = SpiralFunc()
    optimizer = torch.optim.RMSprop(func.parameters(), lr=1e-3)
    odeint = lib.odeint_adjoint if adjoint else lib.odeint
    out: dict = {}
    record(out, "output", "true_y", true_y)
    generator = torch.Generator().manual_seed(1)
    for itr in range(iterations):
        s = torch.randperm(40 - 10, generator=generator)[:8]
        batch_y0, batch_t = true_y[s], t[:10]
        batch_y = torch.stack([true_y[s + i] for i in range(10)], dim=0)
        optimizer.zero_grad()
        pred_y = odeint(func, batch_y0, batch_t)
        loss = torch.mean(torch.abs(pred_y - batch_y))
        loss.backward()
        record(out, "output", f"loss{itr}", loss)
        if itr == 0:
            record(out, "output", "pred_y0", pred_y)
            record_grads(out, func, "func")
        optimizer.step()
    record_params(out, func, "func")
    return out


# ------------------------------------------------------------------ a latent ODE (latent_ode.py)


class LatentODEfunc(nn.Module):
    def __init__(self, latent_dim=4, nhidden=12):
        super().__init__()
        self.elu = nn.ELU(inplace=True)
        self.fc1 = nn.Linear(latent_dim, nhidden)
        self.fc2 = nn.Linear(nhidden, nhidden)
        self.fc3 = nn.Linear(nhidden, latent_dim)

    def forward(self, t, x):
        return self.fc3(self.elu(self.fc2(self.elu(self.fc1(x)))))


class RecognitionRNN(nn.Module):
    def __init__(self, latent_dim=4, obs_dim=2, nhidden=10, nbatch=4):
        super().__init__()
        self.nhidden, self.nbatch = nhidden, nbatch
        self.i2h = nn.Linear(obs_dim + nhidden, nhidden)
        self.h2o = nn.Linear(nhidden, latent_dim * 2)

    def forward(self, x, h):
        h = torch.tanh(self.i2h(torch.cat((x, h), dim=1)))
        return self.h2o(h), h

    def init_hidden(self):
        return torch.zeros(self.nbatch, self.nhidden, dtype=D)


class Decoder(nn.Module):
    def __init__(self, latent_dim=4, obs_dim=2, nhidden=12):
        super().__init__()
        self.fc1 = nn.Linear(latent_dim, nhidden)
        self.fc2 = nn.Linear(nhidden, obs_dim)

    def forward(self, z):
        return self.fc2(torch.relu(self.fc1(z)))


def log_normal_pdf(x, mean, logvar):
    return -0.5 * (math.log(2 * math.pi) + logvar + (x - mean) ** 2 / torch.exp(logvar))


def normal_kl(mu1, lv1, mu2, lv2):
    v1, v2 = torch.exp(lv1), torch.exp(lv2)
    return lv2 / 2.0 - lv1 / 2.0 + (v1 + (mu1 - mu2) ** 2) / (2.0 * v2) - 0.5


def latent_program(lib, adjoint: bool, iterations=2):
    torch.manual_seed(0)
    nspiral, ntime, latent_dim = 4, 12, 4
    samp_ts = torch.linspace(0.0, 2.0, ntime, dtype=D)
    angle = samp_ts[None, :] * 1.5 + torch.linspace(0, 1, nspiral, dtype=D)[:, None]
    radius = 1.0 + 0.2 * torch.linspace(0, 1, nspiral, dtype=D)[:, None]
    samp_trajs = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=-1)
    samp_trajs = samp_trajs + 0.05 * torch.randn(samp_trajs.shape, dtype=D)
    func, rec, dec = LatentODEfunc().to(D), RecognitionRNN().to(D), Decoder().to(D)
    params = list(func.parameters()) + list(dec.parameters()) + list(rec.parameters())
    optimizer = torch.optim.Adam(params, lr=0.01)
    odeint = lib.odeint_adjoint if adjoint else lib.odeint
    out: dict = {}
    for itr in range(iterations):
        optimizer.zero_grad()
        h = rec.init_hidden()
        for i in reversed(range(ntime)):
            obs = samp_trajs[:, i, :]
            o, h = rec.forward(obs, h)
        qz0_mean, qz0_logvar = o[:, :latent_dim], o[:, latent_dim:]
        epsilon = torch.randn(qz0_mean.size(), dtype=D)
        z0 = epsilon * torch.exp(0.5 * qz0_logvar) + qz0_mean
        pred_z = odeint(func, z0, samp_ts, rtol=1e-7, atol=1e-9).permute(1, 0, 2)
        pred_x = dec(pred_z)
        logpx = log_normal_pdf(samp_trajs, pred_x, torch.full_like(pred_x, 2.0 * math.log(0.3))).sum(-1).sum(-1)
        analytic_kl = normal_kl(qz0_mean, qz0_logvar, torch.zeros_like(z0), torch.zeros_like(z0)).sum(-1)
        loss = torch.mean(-logpx + analytic_kl, dim=0)
        loss.backward()
        record(out, "output", f"loss{itr}", loss)
        if itr == 0:
            record(out, "output", "pred_x", pred_x)
            for name, module in (("func", func), ("dec", dec), ("rec", rec)):
                record_grads(out, module, name)
        optimizer.step()
    record_params(out, func, "func")
    return out


# ------------------------------------------------------------------ a CNF with the exact trace (cnf.py)


def trace_df_dz(f, z):
    total = 0.0
    for i in range(z.shape[1]):
        total += torch.autograd.grad(f[:, i].sum(), z, create_graph=True)[0][:, i]
    return total


class HyperNetwork(nn.Module):
    def __init__(self, in_out_dim=2, hidden_dim=8, width=4):
        super().__init__()
        self.width, self.in_out_dim = width, in_out_dim
        self.blocksize = width * in_out_dim
        self.fc1 = nn.Linear(1, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, hidden_dim)
        self.fc3 = nn.Linear(hidden_dim, 3 * self.blocksize + width)

    def forward(self, t):
        params = self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(t.reshape(1, 1)))))).reshape(-1)
        W = params[: self.blocksize].reshape(self.width, self.in_out_dim, 1)
        U = params[self.blocksize: 2 * self.blocksize].reshape(self.width, 1, self.in_out_dim)
        G = params[2 * self.blocksize: 3 * self.blocksize].reshape(self.width, 1, self.in_out_dim)
        U = U * torch.sigmoid(G)
        B = params[3 * self.blocksize:].reshape(self.width, 1, 1)
        return W, B, U


class CNF(nn.Module):
    def __init__(self, in_out_dim=2, hidden_dim=8, width=4):
        super().__init__()
        self.width = width
        self.hyper_net = HyperNetwork(in_out_dim, hidden_dim, width)

    def forward(self, t, states):
        z, logp_z = states
        with torch.set_grad_enabled(True):
            z.requires_grad_(True)
            W, B, U = self.hyper_net(t)
            Z = torch.unsqueeze(z, 0).repeat(self.width, 1, 1)
            h = torch.tanh(torch.matmul(Z, W) + B)
            dz_dt = torch.matmul(h, U).mean(0)
            dlogp_z_dt = -trace_df_dz(dz_dt, z).view(-1, 1)
        return dz_dt, dlogp_z_dt


def cnf_program(lib, adjoint: bool, iterations=2):
    torch.manual_seed(0)
    t0, t1 = 0.0, 1.0
    func = CNF().to(D)
    optimizer = torch.optim.Adam(func.parameters(), lr=1e-2)
    p_z0 = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=D), torch.eye(2, dtype=D) * 0.1)
    odeint = lib.odeint_adjoint if adjoint else lib.odeint
    out: dict = {}
    for itr in range(iterations):
        optimizer.zero_grad()
        angle = torch.rand(16, dtype=D) * 2 * math.pi
        x = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1) + 0.05 * torch.randn(16, 2, dtype=D)
        logp_diff_t1 = torch.zeros(16, 1, dtype=D)
        z_t, logp_diff_t = odeint(
            func, (x, logp_diff_t1), torch.tensor([t1, t0], dtype=D), atol=1e-7, rtol=1e-7, method="dopri5",
        )
        z_t0, logp_diff_t0 = z_t[-1], logp_diff_t[-1]
        logp_x = p_z0.log_prob(z_t0) - logp_diff_t0.view(-1)
        loss = -logp_x.mean(0)
        loss.backward()
        record(out, "output", f"loss{itr}", loss)
        if itr == 0:
            record(out, "output", "z_t0", z_t0)
            record_grads(out, func, "cnf")
        optimizer.step()
    record_params(out, func, "cnf")
    return out


# ------------------------------------------------------------------ a bouncing ball (bouncing_ball.py)


class BouncingBall(nn.Module):
    """Gravity, drag and restitution as parameters; the ball bounces when its height reaches
    its radius. (With drag, the solver cannot integrate a flight exactly and take one huge
    step over it: an event function that crosses and crosses back inside one step is not
    seen, by either library.)"""

    def __init__(self, radius=0.2, gravity=9.8, drag=0.1, restitution=0.8):
        super().__init__()
        self.gravity = nn.Parameter(torch.tensor(gravity, dtype=D))
        self.drag = nn.Parameter(torch.tensor(drag, dtype=D))
        self.log_restitution = nn.Parameter(torch.tensor(math.log(restitution), dtype=D))
        self.radius = radius

    def forward(self, t, state):
        pos, vel = state
        return vel, -self.gravity - self.drag * vel

    def event_fn(self, t, state):
        pos, _ = state
        return pos - self.radius

    def bounce(self, state):
        pos, vel = state
        # Lift the ball off the ground by a hair so that the next solve does not start on the
        # event (the event state is within the event search's accuracy of the ground).
        return pos + 1e-7, -vel * torch.exp(self.log_restitution)


def bouncing_program(lib, adjoint: bool, nbounces=3):
    """Bounce times by odeint_event, the state carried from bounce to bounce; then the time the
    ball was last at a height of 0.5, found backwards in time from the last bounce
    (``reverse_time``). The loss uses all of them: gradients flow through every event time."""
    ball = BouncingBall()
    pos0 = torch.tensor([3.0], dtype=D, requires_grad=True)
    vel0 = torch.tensor([0.5], dtype=D, requires_grad=True)
    interface = lib.odeint_adjoint if adjoint else lib.odeint
    kwargs = dict(odeint_interface=interface, atol=1e-8, rtol=1e-8)
    out: dict = {}
    t0, state = torch.tensor([0.0], dtype=D), (pos0, vel0)
    event_times = []
    for i in range(nbounces):
        event_t, solution = lib.odeint_event(ball, state, t0, event_fn=ball.event_fn, **kwargs)
        event_times.append(event_t)
        state = ball.bounce(tuple(s[-1] for s in solution))
        t0 = event_t
    before = lambda t, s: s[0] - 0.5  # noqa: E731
    back_t, back = lib.odeint_event(ball, (state[0], -state[1] / torch.exp(ball.log_restitution)), t0,
                                    event_fn=before, reverse_time=True, **kwargs)
    loss = sum(t.reshape(()) for t in event_times) + back_t.reshape(()) + back[1][-1].sum() + state[1].sum()
    loss.backward()
    for i, t in enumerate(event_times):
        record(out, "event_t", f"bounce{i}", t)
    record(out, "event_t", "back_t", back_t)
    record(out, "output", "last_state", torch.cat([state[0], state[1]]))
    record(out, "output", "loss", loss)
    record(out, "grad", "pos0.grad", pos0.grad)
    record(out, "grad", "vel0.grad", vel0.grad)
    record_grads(out, ball, "ball")
    return out


# ------------------------------------------------------------------ physics with an end-time trick


class Ball(nn.Module):
    """A learned gravity and drag; the event function switches to zero after the end time T
    (``torch.zeros(1) if t > T else position``), a trick from torchdiffeq's examples for
    stopping at T when no bounce comes first."""

    def __init__(self, T):
        super().__init__()
        self.g = nn.Parameter(torch.tensor(0.6, dtype=D))
        self.k = nn.Parameter(torch.tensor(0.05, dtype=D))
        self.T = T

    def forward(self, t, state):
        x, v = state
        return v, -self.g - self.k * v

    def event_fn(self, t, state):
        return torch.zeros(1, dtype=D) if t > self.T else state[0] - 0.211


def physics_program(lib, adjoint: bool, iterations=3):
    """Fit gravity and drag so that the bounces before the end time land at target times with
    small speeds. Every iteration simulates bounce after bounce until T (the last "event" is
    T itself, through the trick). The loss is on the real bounces only: torchdiffeq's event
    time is the middle of a bracket of width ``atol`` and may fall just before T, where its
    implicit-function gradient then uses the event function's other branch (a bounce that is
    not there); ours is on the crossed side, after T, with zero gradient (T does not move)."""
    T = 9.0
    ball = Ball(T)
    optimizer = torch.optim.SGD(ball.parameters(), lr=0.01)
    interface = lib.odeint_adjoint if adjoint else lib.odeint
    out: dict = {}
    targets = torch.tensor([4.2, 7.5, 8.6], dtype=D)
    for itr in range(iterations):
        optimizer.zero_grad()
        t0 = torch.tensor([0.0], dtype=D)
        state = (torch.tensor([9.518], dtype=D), torch.tensor([-0.4819], dtype=D))
        times, speeds = [], []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # Stop at T; just short of it, as torchdiffeq's time for T may be a hair before it.
            while float(t0) < T - 1e-6:
                event_t, solution = lib.odeint_event(ball, state, t0, event_fn=ball.event_fn, odeint_interface=interface,
                                                     rtol=1e-8, atol=1e-8)
                times.append(event_t.reshape(()))
                speeds.append(solution[1][-1].reshape(()))
                state = (solution[0][-1] + 1e-7, -0.9 * solution[1][-1])  # lifted off the ground by a hair
                t0 = event_t.reshape(1)
        bounces = torch.stack(times[:-1])
        assert len(bounces) >= 1 and abs(float(times[-1]) - T) < 1e-6
        loss = ((bounces - targets[: len(bounces)]) ** 2).sum() + 0.1 * torch.stack(speeds[:-1]).pow(2).sum()
        loss.backward()
        record(out, "event_t", f"times{itr}", torch.stack(times))
        record(out, "output", f"loss{itr}", loss)
        if itr == 0:
            record_grads(out, ball, "ball")
        optimizer.step()
    record_params(out, ball, "ball")
    return out


# ------------------------------------------------------------------ an ODE-net classifier block (odenet_mnist.py)


class ConcatConv2d(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.layer = nn.Conv2d(dim_in + 1, dim_out, kernel_size=3, padding=1)

    def forward(self, t, x):
        tt = torch.ones_like(x[:, :1, :, :]) * t
        return self.layer(torch.cat([tt, x], 1))


class ConvODEfunc(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm1 = nn.GroupNorm(2, dim)
        self.conv1 = ConcatConv2d(dim, dim)
        self.norm2 = nn.GroupNorm(2, dim)
        self.conv2 = ConcatConv2d(dim, dim)

    def forward(self, t, x):
        out = self.conv1(t, torch.relu(self.norm1(x)))
        return self.conv2(t, torch.relu(self.norm2(out)))


class ODEBlock(nn.Module):
    def __init__(self, odefunc, odeint, dtype, tol):
        super().__init__()
        self.odefunc, self.odeint, self.tol = odefunc, odeint, tol
        self.integration_time = torch.tensor([0.0, 1.0], dtype=dtype)

    def forward(self, x):
        return self.odeint(self.odefunc, x, self.integration_time, rtol=self.tol, atol=self.tol)[1]


def classifier_program(lib, adjoint: bool, dtype, iterations=1):
    torch.manual_seed(0)
    tol = 1e-3 if dtype == torch.float32 else 1e-7
    odeint = lib.odeint_adjoint if adjoint else lib.odeint
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, 1), nn.GroupNorm(2, 4), nn.ReLU(inplace=True),
        ODEBlock(ConvODEfunc(4), odeint, dtype, tol),
        nn.GroupNorm(2, 4), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(4, 3),
    ).to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(4, 1, 6, 6, dtype=dtype)
    y = torch.tensor([0, 1, 2, 0])
    out: dict = {}
    for itr in range(iterations):
        optimizer.zero_grad()
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y)
        loss.backward()
        record(out, "output", f"loss{itr}", loss)
        if itr == 0:
            record(out, "output", "logits", logits)
            record_grads(out, model, "model")
        optimizer.step()
    record_params(out, model, "model")
    return out, tol


# ------------------------------------------------------------------ the tests


def run_both(program, *args):
    results = []
    for lib in (torchadjoint, torchdiffeq):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results.append(program(lib, *args))
    return results


@pytest.mark.parametrize("adjoint", [False, True])
def test_demo_spiral(adjoint):
    ours, theirs = run_both(spiral_program, adjoint)
    compare(ours, theirs, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("adjoint", [False, True])
def test_latent_ode(adjoint):
    ours, theirs = run_both(latent_program, adjoint)
    compare(ours, theirs, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("adjoint", [False, True])
def test_cnf_with_the_trace(adjoint):
    ours, theirs = run_both(cnf_program, adjoint)
    compare(ours, theirs, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("adjoint", [False, True])
def test_bouncing_ball_events_and_reverse_time(adjoint):
    ours, theirs = run_both(bouncing_program, adjoint)
    compare(ours, theirs, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("adjoint", [False, True])
def test_physics_with_an_end_time_event_trick(adjoint):
    ours, theirs = run_both(physics_program, adjoint)
    # The last event of every iteration is the end time T (the trick), on its far side.
    assert all(float(ours[f"times{i}"][1][-1]) > 9.0 for i in range(3))
    compare(ours, theirs, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("adjoint", [False, True])
def test_odenet_classifier_block_in_float32(adjoint):
    """The example's own setting: float32, rtol = atol = 1e-3."""
    (ours, tol), (theirs, _) = run_both(classifier_program, adjoint, torch.float32)
    compare(ours, theirs, rtol=tol, atol=tol, dtype=torch.float32)
