"""Training that is killed or damaged: a SIGKILL mid-epoch loses at most that epoch and
resuming ends with the same parameters as an uninterrupted run; a truncated checkpoint is
a clear error while the previous good one is still there and usable."""
import os
import signal

import pytest
import torch

from killed_run import epochs_done, final_params, kill_mid_second_epoch
from torchadjoint.cli import main

# Small but not instant: an epoch must last long enough to be killed in the middle of it.
OPTIONS = ["--epochs", "3", "--hidden", "8", "--limit-batches", "12", "--batch-size", "32", "--lr", "0.05",
           "--seed", "11", "--no-plots", "--no-progress", "--threads", "1"]


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    assert main(["train", "--out", whole, *OPTIONS]) == 0
    assert kill_mid_second_epoch(killed, OPTIONS) == -signal.SIGKILL
    # At most the unfinished epoch is lost: the checkpoint holds every finished epoch.
    saved = torch.load(os.path.join(killed, "checkpoint.pt"), weights_only=True)
    assert saved["epoch"] == epochs_done(killed) == 1

    assert main(["train", "--out", killed, *OPTIONS, "--resume"]) == 0
    expected, resumed = final_params(whole), final_params(killed)
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=0, msg=name)


def test_truncated_checkpoint_is_a_clear_error_and_previous_survives(tmp_path, capsys):
    out = str(tmp_path / "run")
    options = [*OPTIONS[:1], "2", *OPTIONS[2:]]
    assert main(["train", "--out", out, *options]) == 0
    path, previous = os.path.join(out, "checkpoint.pt"), os.path.join(out, "checkpoint.prev.pt")
    data = open(path, "rb").read()
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 3])  # as a crash of a non-atomic writer would leave it
    capsys.readouterr()
    assert main(["train", "--out", out, *options[:1], "3", *options[2:], "--resume"]) != 0
    message = capsys.readouterr().err
    assert "cannot read checkpoint" in message and "checkpoint.pt" in message
    assert "--resume" in message and "checkpoint.prev.pt" in message
    # The previous good checkpoint is intact and resuming from it works.
    assert torch.load(previous, weights_only=True)["epoch"] == 1
    assert main(["train", "--out", out, *options[:1], "3", *options[2:], "--resume", previous]) == 0
    assert epochs_done(out) == 3


@pytest.mark.parametrize("garbage", [b"", b"not a checkpoint at all"])
def test_corrupted_checkpoint_messages(tmp_path, capsys, garbage):
    out = tmp_path / "run"
    out.mkdir()
    bad = out / "bad.pt"
    bad.write_bytes(garbage)
    assert main(["train", "--out", str(out), *OPTIONS, "--resume", str(bad)]) != 0
    message = capsys.readouterr().err
    assert "bad.pt" in message


def test_solve_that_cannot_go_on_stops_training_with_advice(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--out", out, *OPTIONS, "--max-steps", "1"]) != 0
    message = capsys.readouterr().err
    assert "forward ODE solve failed at epoch 1, iteration 1" in message
    assert "stopped at t=" in message and "max_num_steps=1" in message
    assert "--lr" in message and "--max-steps" in message


def test_nan_inside_the_dynamics_names_the_time_and_what_to_change(tmp_path, capsys, monkeypatch):
    from torchadjoint.models import NeuralODE

    original = NeuralODE.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        # From the third batch on, the vector field returns NaN once t passes 0.5.
        calls["n"] += 1
        if calls["n"] >= 3 and not getattr(self.func, "_poisoned", False):
            field = self.func.forward

            def nan_after_half(t, y):
                out = field(t, y)
                return out * float("nan") if float(t) > 0.5 else out

            self.func.forward = nan_after_half
            self.func._poisoned = True
        return original(self, *args, **kwargs)

    monkeypatch.setattr(NeuralODE, "forward", poisoned)
    assert main(["train", "--out", str(tmp_path / "run"), *OPTIONS]) != 0
    message = capsys.readouterr().err
    assert "ODE solve failed at epoch 1, iteration 3" in message
    assert "stopped at t=0.5" in message and "non-finite" in message
    assert "--lr" in message
