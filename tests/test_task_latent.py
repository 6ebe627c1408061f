"""The latent training task: its data are the dynamical systems they claim, the encoder
reads each trajectory's own observations only, the ELBO's KL is right, and a short run
trains both models, plots, resumes to identical parameters after a SIGKILL, and runs under
torchrun with the parameters of one process."""
import csv

import pytest
import torch

from killed_run import final_params, iteration_records, kill_mid_second_epoch, run_two_processes
from torchadjoint.cli import main
from torchadjoint.training import data_latent
from torchadjoint.training.tasks_latent import BackwardGRUEncoder, LatentWithBaseline

OPTIONS = ["latent", "--epochs", "2", "--limit-batches", "3", "--batch-size", "16", "--hidden", "8", "--latent-dim", "3",
           "--dtype", "float64", "--rtol", "1e-6", "--atol", "1e-7", "--seed", "4", "--no-progress", "--threads", "1"]


def test_trajectories_are_noisy_irregular_observations_of_damped_rotations():
    data = data_latent.make_trajectories(64, seed=3)
    t, x = data.t, data.truth
    # Each true trajectory is r e^{-λt}(cos(sωt + φ), sin(sωt + φ)): log-radius and
    # unwrapped angle are linear in t, with λ and ω in the family's ranges.
    log_radius = x.norm(dim=-1).log()
    angle = torch.atan2(x[..., 1], x[..., 0])
    unwrapped = angle[:, :1] + torch.cumsum(torch.remainder(angle.diff(dim=1) + torch.pi, 2 * torch.pi) - torch.pi, 1)
    design = torch.stack([torch.ones_like(t), t], 1)
    for series, (low, high) in ((log_radius, data_latent.DAMPING), (torch.cat([angle[:, :1], unwrapped], 1), data_latent.OMEGA)):
        coef = torch.linalg.lstsq(design, series.T).solution  # (2, n)
        torch.testing.assert_close(design @ coef, series.T, rtol=0, atol=1e-9)
        slope = coef[1].abs()
        assert ((slope >= low - 1e-9) & (slope <= high + 1e-9)).all()
    assert set(torch.sign(coef[1]).tolist()) == {-1.0, 1.0}  # both directions of rotation
    # Observed only inside the window, at times of their own, with the stated noise.
    assert not data.mask[:, data.window:].any()
    assert (data.mask.sum(1) >= data_latent.MIN_OBSERVED).all()
    assert len({tuple(row.tolist()) for row in data.mask}) == 64
    noise = (data.values - data.truth)[data.mask]
    assert abs(float(noise.std()) / data_latent.NOISE_STD - 1) < 0.1
    assert (data.values[~data.mask] == 0).all()
    # Train and test sets are fixed (independent of --seed) and differ.
    train, test = data_latent.load(torch.float64)
    assert not torch.equal(train.truth[:10], test.truth[:10])
    torch.testing.assert_close(data_latent.load(torch.float64)[1].values, test.values)


def test_encoder_reads_each_trajectorys_own_observations_only():
    torch.manual_seed(0)
    encoder = BackwardGRUEncoder(2, 8).double()
    data = data_latent.make_trajectories(6, seed=1)
    w = data.window
    t, values, mask = data.t[:w], data.values[:, :w], data.mask[:, :w]
    h = encoder(t, values, mask)
    # Values where nothing was observed do not matter ...
    garbage = torch.where(mask[..., None], values, torch.randn_like(values))
    torch.testing.assert_close(encoder(t, garbage, mask), h, rtol=0, atol=0)
    # ... nor the other trajectories of the batch ...
    order = torch.tensor([3, 1, 5, 0, 2, 4])
    torch.testing.assert_close(encoder(t, values[order], mask[order]), h[order], rtol=1e-12, atol=1e-12)
    # ... but every observation and its time do.
    first = int(torch.nonzero(mask[0])[0])
    moved = values.clone()
    moved[0, first] += 0.1
    assert not torch.allclose(encoder(t, moved, mask)[0], h[0])
    shifted = mask.clone()
    shifted[0, first], shifted[0, first + 1] = False, True
    later = values.clone()
    later[0, first + 1] = values[0, first]
    if not mask[0, first + 1]:
        assert not torch.allclose(encoder(t, later, shifted)[0], h[0])


def test_negative_elbo_is_kl_minus_the_gaussian_log_likelihood():
    torch.manual_seed(1)
    model = LatentWithBaseline(2, 3, 8, rtol=1e-9, atol=1e-10, gradient="direct").double()
    data = data_latent.make_trajectories(5, seed=2)
    w = data.window
    t, values, mask = data.t[:w], data.values[:, :w], data.mask[:, :w]
    eps = torch.randn(5, 3, dtype=torch.float64)
    neg_elbo, _ = model(t, values, mask, eps)
    mean, std = model.latent.q_z0(t, values, mask)
    predicted, _ = model.latent.decode(mean + std * eps, t)
    from torchadjoint.training.tasks_latent import OBSERVATION_STD

    likelihood = torch.distributions.Normal(predicted, OBSERVATION_STD).log_prob(values)
    log_lik = (likelihood * mask[..., None]).sum(dim=(1, 2))
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std), torch.distributions.Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(neg_elbo, kl - log_lik)


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("latent") / "whole"
    assert main(["train", "--out", str(out), *OPTIONS]) == 0
    return out


def test_short_run_trains_both_models_and_plots(whole_run):
    with open(whole_run / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])  # the negative ELBO
    # Six steps are too few for the baseline's loss to fall reliably; it is trained (its
    # parameters moved) on the same batches.
    first = torch.load(whole_run / "checkpoint.prev.pt", weights_only=True)["model"]
    final = final_params(whole_run)
    assert all(not torch.equal(first[n], final[n]) for n in final if n.startswith("baseline."))
    for key in ("interp_mse", "extrap_mse", "gru_interp_mse", "gru_extrap_mse"):
        assert 0 < float(rows[-1][key]) < 10, key
    with open(whole_run / "nfe.csv") as fh:
        assert all(int(r["nfe_forward"]) > 0 for r in csv.DictReader(fh))
    assert "gradient direct" in (whole_run / "train.log").read_text()  # the measured default
    for name in ("reconstructions.png", "latent_trajectories.png", "curves.png", "nfe.png"):
        assert (whole_run / name).read_bytes()[:4] == b"\x89PNG", name


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(whole_run, tmp_path):
    killed = str(tmp_path / "killed")
    args = [*OPTIONS, "--no-plots"]
    kill_mid_second_epoch(killed, args)
    assert main(["train", "--out", killed, *args, "--resume"]) == 0
    expected, resumed = final_params(whole_run), final_params(killed)
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=0, msg=name)


def test_two_processes_match_one(whole_run, tmp_path):
    run_two_processes(str(tmp_path / "ddp"), [*OPTIONS, "--no-plots"])
    columns = ("epoch", "iteration", "nfe_forward")
    steps_ddp, loss_ddp = iteration_records(tmp_path / "ddp", columns)
    steps_single, loss_single = iteration_records(whole_run, columns)
    assert steps_ddp == steps_single
    torch.testing.assert_close(loss_ddp, loss_single, rtol=1e-10, atol=0)
    ddp, single = final_params(tmp_path / "ddp"), final_params(whole_run)
    after_first = torch.load(whole_run / "checkpoint.prev.pt", weights_only=True)["model"]
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-8, atol=1e-8, msg=name)
    assert any((single[n] - after_first[n]).abs().max() > 1e-4 for n in single)
