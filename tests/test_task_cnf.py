"""The cnf training task: its densities are the densities they claim, the flow's trace and
log-density are right, and a short run trains, resumes to identical parameters after a
SIGKILL, and runs under torchrun with the parameters of one process."""
import math
import os

import pytest
import torch

from killed_run import final_params, iteration_records, kill_mid_second_epoch, run_two_processes
from torchadjoint.cli import main
from torchadjoint.training import data_cnf
from torchadjoint.training.tasks_cnf import CNF, CNFField

# float64 and tight tolerances: two processes choosing different steps would show far above rounding.
# No regulariser: with one, processes take the same steps as one process only approximately
# (its integral is a per-process mean); the plotted run below trains with both.
OPTIONS = ["cnf", "--epochs", "2", "--iterations", "3", "--batch-size", "32", "--hidden", "12", "--lr", "0.01",
           "--dtype", "float64", "--rtol", "1e-6", "--atol", "1e-7",
           "--seed", "5", "--no-plots", "--no-progress", "--threads", "1"]


@pytest.mark.parametrize("name", sorted(data_cnf.DENSITIES))
def test_each_density_samples_what_its_log_prob_says(name):
    """Counts of 40,000 samples in the cells of a 5×5 grid over [-5, 5]² against the
    probability the log-density integrates to there (a fine midpoint rule): within 5
    binomial standard deviations, and the total mass on the square is 1."""
    density = data_cnf.density(name)
    n = 40_000
    x = density.sample(n, torch.Generator().manual_seed(0))
    edges = torch.linspace(-5, 5, 6, dtype=torch.float64)
    fine = torch.linspace(-5, 5, 201, dtype=torch.float64)
    mid = (fine[1:] + fine[:-1]) / 2
    g1, g2 = torch.meshgrid(mid, mid, indexing="xy")
    points = torch.stack([g1.reshape(-1), g2.reshape(-1)], 1)
    p = torch.cat([density.log_prob(chunk) for chunk in points.split(5000)]).exp().reshape(200, 200) * (10 / 200) ** 2
    assert abs(float(p.sum()) - 1) < 1e-3
    cell_p = p.reshape(5, 40, 5, 40).sum(dim=(1, 3))  # [row (y), column (x)]
    ix = torch.bucketize(x[:, 0].contiguous(), edges[1:-1])
    iy = torch.bucketize(x[:, 1].contiguous(), edges[1:-1])
    counts = torch.zeros(5, 5, dtype=torch.float64).index_put_((iy, ix), torch.ones(n, dtype=torch.float64), accumulate=True)
    expected = n * cell_p
    sd = (n * cell_p * (1 - cell_p)).sqrt() + 1
    assert ((counts - expected).abs() <= 5 * sd).all(), (counts, expected)


def test_traces_match_the_jacobian():
    """The exact trace is tr ∂f/∂z from the full Jacobian; Hutchinson's estimate averaged
    over all four Rademacher vectors of 2-d is the trace exactly (off-diagonal terms cancel)."""
    torch.manual_seed(0)
    exact = CNFField(2, 16, trace="exact").double()
    hutch = CNFField(2, 16, trace="hutchinson").double()
    hutch.load_state_dict(exact.state_dict())
    z = torch.randn(5, 2, dtype=torch.float64)
    t = torch.tensor(0.3, dtype=torch.float64)
    y = torch.cat([z, torch.zeros(5, 1, dtype=torch.float64)], 1)
    jac = torch.stack([torch.autograd.functional.jacobian(lambda v: exact.velocity(t, v[None])[0], zi) for zi in z])
    trace = jac.diagonal(dim1=1, dim2=2).sum(-1)
    torch.testing.assert_close(exact(t, y)[:, 2], -trace)
    estimates = []
    for signs in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
        hutch.noise = torch.tensor(signs, dtype=torch.float64).expand(5, 2)
        estimates.append(hutch(t, y)[:, 2])
    torch.testing.assert_close(torch.stack(estimates).mean(0), -trace)
    assert not torch.allclose(estimates[0], estimates[1])  # one draw alone is an estimate, not the trace
    hutch.noise = None
    with pytest.raises(ValueError, match="noise"):
        hutch(t, y)


def test_an_untrained_flow_defines_a_density():
    """exp(log p) of a random flow (exact trace, tight tolerances) integrates to 1: the
    change of variables, its sign and the base density are right."""
    torch.manual_seed(1)
    flow = CNF(2, 16, trace="exact", rtol=1e-6, atol=1e-7, gradient="direct").double()
    for p in flow.parameters():
        p.data.mul_(1.5)  # a visibly non-Gaussian density
    axis = torch.linspace(-7, 7, 41, dtype=torch.float64)
    g1, g2 = torch.meshgrid(axis, axis, indexing="xy")
    with torch.no_grad():
        density = flow.log_prob(torch.stack([g1.reshape(-1), g2.reshape(-1)], 1)).exp()
    mass = float(density.sum()) * float(axis[1] - axis[0]) ** 2
    assert abs(mass - 1) < 1e-4, mass
    gaussian = torch.exp(-(g1**2 + g2**2).reshape(-1) / 2) / (2 * math.pi)
    assert (density - gaussian).abs().max() > 0.01  # the flow moved the density


def test_flow_regularisers_see_the_velocity_only():
    """RNODE on the flow's state [z, Δ]: the kinetic energy is |dz/dt|² and the Jacobian
    term |∂f/∂z|_F² (exact here: the Rademacher estimate averaged over all four sign
    vectors of 2-d), whatever the noise on the Δ coordinate; the log-density's rate is left out."""
    from torchadjoint.regularisers import JacobianFrobenius, KineticEnergy
    from torchadjoint.training.tasks_cnf import OnFlowState

    torch.manual_seed(2)
    field = CNFField(2, 16, trace="exact").double()
    t = torch.tensor(0.4, dtype=torch.float64)
    y = torch.cat([torch.randn(6, 2, dtype=torch.float64), torch.zeros(6, 1, dtype=torch.float64)], 1).requires_grad_()
    dy = field(t, y)
    dz = dy[:, :2].detach()
    kinetic = OnFlowState(KineticEnergy())(t, y, dy)
    torch.testing.assert_close(kinetic, dz.pow(2).sum(1).mean())
    jac = torch.stack([torch.autograd.functional.jacobian(lambda v: field.velocity(t, v[None])[0], zi)
                       for zi in y[:, :2].detach()])
    cost = OnFlowState(JacobianFrobenius(noise="rademacher")).for_solve(y.detach())
    estimates = []
    for signs in ((1, 1, 1), (1, -1, -1), (-1, 1, 1), (-1, -1, -1)):
        cost.cost.noise = [torch.tensor(signs, dtype=torch.float64).expand(6, 3)]
        estimates.append(cost(t, y, dy))
    torch.testing.assert_close(torch.stack(estimates).mean(), jac.pow(2).sum(dim=(1, 2)).mean())


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cnf") / "whole"
    assert main(["train", "--out", str(out), *OPTIONS]) == 0
    return out


def test_short_run_trains_and_writes_its_metrics(whole_run, tmp_path):
    import csv

    with open(whole_run / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for r in rows:
        true = float(r["true_nll"])
        assert abs(true - 2.858) < 0.05  # 8 Gaussians' entropy, on the fixed test set
        assert float(r["nll_gap"]) == pytest.approx(float(r["test_nll"]) - true, abs=1e-9)
        assert float(r["nll_gap"]) > -0.05  # a flow cannot beat the true density (beyond the test set's noise)
    assert float(rows[1]["test_nll"]) < float(rows[0]["test_nll"])
    # The plots, on a tiny run of 8 Gaussians with its own options (and the RNODE regularisers).
    out = tmp_path / "plots"
    assert main(["train", "cnf", "--out", str(out), "--epochs", "1", "--iterations", "1", "--batch-size", "16",
                 "--hidden", "8", "--trace", "exact", "--kinetic", "0.01", "--jacobian", "0.01", "--no-progress"]) == 0
    for name in ("density.png", "samples.png", "flow.png", "nfe.png", "curves.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(whole_run, tmp_path):
    killed = str(tmp_path / "killed")
    kill_mid_second_epoch(killed, OPTIONS)
    assert main(["train", "--out", killed, *OPTIONS, "--resume"]) == 0
    expected, resumed = final_params(whole_run), final_params(killed)
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=0, msg=name)
    with open(whole_run / "metrics.csv") as a, open(os.path.join(killed, "metrics.csv")) as b:
        drop_seconds = lambda text: [line.rsplit(",", 1)[0] for line in text.splitlines()]  # noqa: E731
        assert drop_seconds(a.read()) == drop_seconds(b.read())


def test_two_processes_match_one(whole_run, tmp_path):
    run_two_processes(str(tmp_path / "ddp"), [*OPTIONS])
    columns = ("epoch", "iteration", "nfe_forward", "nfe_backward")
    steps_ddp, loss_ddp = iteration_records(tmp_path / "ddp", columns)
    steps_single, loss_single = iteration_records(whole_run, columns)
    assert steps_ddp == steps_single  # the same solver steps, forward and backward, in every iteration
    torch.testing.assert_close(loss_ddp, loss_single, rtol=1e-10, atol=0)
    # Parameters agree to rounding (summed over the processes in another order), which Adam
    # steps amplify to ~1e-10: far below how far the last epoch moved them.
    ddp, single = final_params(tmp_path / "ddp"), final_params(whole_run)
    after_first = torch.load(whole_run / "checkpoint.prev.pt", weights_only=True)["model"]
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-8, atol=1e-8, msg=name)
        assert (single[name] - after_first[name]).abs().max() > 1e-4, name
