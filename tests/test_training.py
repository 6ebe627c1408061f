"""Training runs: the loss goes down on both tasks, outputs are written, checkpoints are
atomic, and resuming after an interruption gives the same parameters as an uninterrupted run."""
import csv
import os

import pytest
import torch

from torchadjoint.cli import main
from torchadjoint.training import checkpoint as ckpt
from torchadjoint.training import TrainingError, load_trained
from torchadjoint.training.tasks import DigitsTask

QUIET = ["--no-progress"]
DIGITS = ["--hidden", "8", "--limit-batches", "6", "--batch-size", "32", "--lr", "0.05", *QUIET]
SPIRAL = ["spiral", "--hidden", "16", "--iterations", "8", "--batch-size", "16", "--seq-len", "6", "--rtol", "1e-4",
          "--atol", "1e-5", *QUIET]


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def _params(folder):
    return torch.load(os.path.join(folder, "model.pt"), weights_only=True)["state_dict"]


def test_digits_loss_decreases_and_outputs_are_written(tmp_path):
    out = tmp_path / "digits"
    assert main(["train", "--out", str(out), "--epochs", "2", *DIGITS]) == 0
    rows = _rows(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    losses = [float(r["test_loss"]) for r in rows]
    assert losses[1] < losses[0] < 2.1  # chance level is ln 10 = 2.30
    assert float(rows[-1]["test_accuracy"]) > 0.5
    iterations = _rows(out / "nfe.csv")
    assert len(iterations) == 12
    assert all(int(r["nfe_forward"]) > 0 and int(r["nfe_backward"]) > 0 for r in iterations)
    first, last = [float(r["loss"]) for r in iterations[:3]], [float(r["loss"]) for r in iterations[-3:]]
    assert sum(last) < sum(first)
    for name in ("config.json", "checkpoint.pt", "checkpoint.prev.pt", "model.pt", "train.log", "curves.png",
                 "nfe.png", "hidden_pca.png"):
        assert (out / name).is_file(), name
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "epoch 2/2" in (out / "train.log").read_text()
    assert torch.load(out / "checkpoint.prev.pt", weights_only=True)["epoch"] == 1
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]
    # The saved model is usable from Python and is the trained one.
    model = load_trained(str(out))
    x = torch.rand(3, 64)
    assert model(x).shape == (3, 10)


def test_spiral_loss_decreases(tmp_path):
    out = tmp_path / "spiral"
    assert main(["train", *SPIRAL, "--out", str(out), "--epochs", "3", "--lr", "0.02"]) == 0
    rows = _rows(out / "metrics.csv")
    train = [float(r["train_loss"]) for r in rows]
    assert train[-1] < train[0]
    assert float(rows[-1]["trajectory_loss"]) > 0
    for name in ("trajectories.png", "vector_field.png", "curves.png", "nfe.png"):
        assert (out / name).is_file(), name
    model = load_trained(str(out / "model.pt"))
    ys = model(torch.tensor([2.0, 0.0]), torch.linspace(0, 1, 5))
    assert ys.shape == (5, 2)


class _Crash(Exception):
    pass


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, monkeypatch):
    common = ["--epochs", "3", "--no-plots", "--seed", "3", *DIGITS]
    assert main(["train", "--out", str(tmp_path / "whole"), *common]) == 0

    # Crash in the middle of the second epoch: the checkpoint of epoch 1 is what survives.
    calls = {"n": 0}
    original = DigitsTask.batch_loss

    def crashing(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 9:
            raise _Crash("power cut")
        return original(self, model, batch)

    monkeypatch.setattr(DigitsTask, "batch_loss", crashing)
    with pytest.raises(_Crash):
        main(["train", "--out", str(tmp_path / "split"), *common])
    monkeypatch.setattr(DigitsTask, "batch_loss", original)
    saved = ckpt.load_checkpoint(str(tmp_path / "split" / "checkpoint.pt"))
    assert saved["epoch"] == 1

    assert main(["train", "--out", str(tmp_path / "split"), "--resume", *common]) == 0
    whole, split = _params(tmp_path / "whole"), _params(tmp_path / "split")
    for name in whole:
        assert torch.equal(whole[name], split[name]), name
    keep = ("train_loss", "test_loss", "test_accuracy", "nfe_forward", "nfe_backward", "lr")
    rows_whole = [{k: r[k] for k in keep} for r in _rows(tmp_path / "whole" / "metrics.csv")]
    rows_split = [{k: r[k] for k in keep} for r in _rows(tmp_path / "split" / "metrics.csv")]
    assert rows_whole == rows_split

    # A finished run can be extended: --epochs is not part of the run's identity.
    assert main(["train", "--out", str(tmp_path / "split"), "--resume", *common[2:], "--epochs", "4"]) == 0
    assert len(_rows(tmp_path / "split" / "metrics.csv")) == 4


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    ckpt.save_atomic({"epoch": 1}, path, keep_previous=ckpt.PREVIOUS)
    ckpt.save_atomic({"epoch": 2}, path, keep_previous=ckpt.PREVIOUS)
    assert torch.load(path)["epoch"] == 2
    assert torch.load(tmp_path / ckpt.PREVIOUS)["epoch"] == 1

    real_replace = os.replace

    def failing_replace(src, dst):
        if os.path.basename(dst) == "checkpoint.pt":
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_atomic({"epoch": 3}, path, keep_previous=ckpt.PREVIOUS)
    monkeypatch.setattr(os, "replace", real_replace)
    assert torch.load(path)["epoch"] == 2  # the good checkpoint is untouched
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]

    def unpicklable():
        pass

    with pytest.raises(Exception):
        ckpt.save_atomic({"epoch": 4, "f": unpicklable}, path, keep_previous=ckpt.PREVIOUS)
    assert torch.load(path)["epoch"] == 2


TINY = ["--hidden", "4", "--limit-batches", "2", "--batch-size", "16", "--no-plots", "--no-progress"]


class _Payload:
    """Pickles as a call of ``os.mkdir(marker)``: what a hostile file would run on load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_files_load_without_running_code_and_hostile_files_are_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--epochs", "1", *TINY]) == 0
    # Our own files hold tensors and plain data only.
    for name in ("checkpoint.pt", "model.pt"):
        torch.load(out / name, weights_only=True)

    marker = tmp_path / "code-ran"
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    state["extra"] = _Payload(str(marker))
    torch.save(state, out / "hostile.pt")
    record = torch.load(out / "model.pt", weights_only=True)
    record["metrics"] = _Payload(str(marker))
    torch.save(record, tmp_path / "model.pt")

    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", str(out / "hostile.pt"), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "refusing checkpoint" in err and "hostile.pt" in err and "mkdir" in err and "Traceback" not in err
    with pytest.raises(TrainingError, match=r"refusing model file.*model\.pt.*mkdir"):
        load_trained(str(tmp_path / "model.pt"))
    assert not marker.exists(), "loading ran code from the file"


def test_version_1_checkpoints_still_load(tmp_path):
    """Checkpoints written before the weights-only format held numpy arrays and tuples in
    their random states: they still resume (numpy arrays through an allow-list)."""
    import random

    import numpy as np

    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--epochs", "1", *TINY]) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    state["version"] = 1
    state["rng"]["python"] = random.getstate()
    state["rng"]["numpy"] = np.random.get_state()
    state.pop("resumes")
    torch.save(state, out / "checkpoint.pt")
    with pytest.raises(Exception):
        torch.load(out / "checkpoint.pt", weights_only=True)  # what a plain safe load says of it
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2"]) == 0
    assert len(_rows(out / "metrics.csv")) == 2


def test_interruption_and_resume_are_logged_and_files_respect_the_umask(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    calls = {"n": 0}
    original = DigitsTask.batch_loss

    def interrupted(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, model, batch)

    monkeypatch.setattr(DigitsTask, "batch_loss", interrupted)
    old = os.umask(0o027)
    try:
        assert main(["train", "--out", str(out), "--epochs", "2", *TINY]) == 130
    finally:
        os.umask(old)
    monkeypatch.setattr(DigitsTask, "batch_loss", original)
    for name in ("metrics.csv", "nfe.csv", "checkpoint.pt", "config.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o640, name
    log = (out / "train.log").read_text()
    assert "interrupted in epoch 2" in log and f"--out {out} --resume" in log
    assert main(["train", "--out", str(out), "--resume"]) == 0
    log = (out / "train.log").read_text()
    assert "resuming" in log and "after epoch 1" in log
    assert torch.load(out / "checkpoint.pt", weights_only=True)["resumes"] == [2]


def test_reconstruction_warning_names_the_statistic_and_its_threshold(tmp_path, monkeypatch):
    """The per-epoch summary of backsolve's reconstruction warnings says what the number
    is (stats['backward']['reconstruction_error_max'], in multiples of the tolerance) and
    the threshold it exceeded."""
    import torchadjoint as ta
    from torchadjoint.training.tasks import Task

    original = Task.solver_kwargs

    def strict(config):
        return dict(original(config), gradient=ta.Backsolve(reconstruction_warning=1e-9))

    monkeypatch.setattr(Task, "solver_kwargs", staticmethod(strict))
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--epochs", "1", *TINY]) == 0
    log = (out / "train.log").read_text()
    assert "in 2 of 2 iterations the backward pass re-computed y(t)" in log
    assert "reconstruction_error_max" in log and "times the tolerance" in log and "threshold 1e-09" in log


def test_the_training_library_does_not_import_the_command_line():
    # The library's run configuration is a dataclass (training/config.py) that the command
    # line builds; training once imported commands.train to parse it: an import circle.
    import ast
    import pathlib
    import subprocess
    import sys

    import torchadjoint.training

    code = ("import sys, torchadjoint.training, torchadjoint.training.loop; "
            "print(sorted(m for m in sys.modules if m.startswith(('torchadjoint.commands', 'torchadjoint.cli'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
    # Nor later, from inside a function: no module of training/ names the command line at all.
    package = pathlib.Path(torchadjoint.training.__file__).parent
    named = []
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = ("." * node.level) + (node.module or "")
                names = [module + "." + alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            named += [f"{path.name}: {n}" for n in names if "commands" in n.split(".") or "cli" in n.split(".")]
    assert len(list(package.glob("*.py"))) > 5 and named == [], named
