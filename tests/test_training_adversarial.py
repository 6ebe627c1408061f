"""Edge cases of ``torchadjoint compare`` and ``torchadjoint train`` found by using them as
a newcomer would: each was a traceback, a misleading message or a wrong result."""
import math

import pytest
import torch

from torchadjoint.cli import main

PROBLEM = '''
import torch

class Field(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(2, 2)

    def forward(self, t, y):
        return self.net(y)

def generator_params():
    torch.manual_seed(0)
    f = Field()
    return dict(func=f, y0=torch.randn(3, 2), t=torch.linspace(0, 1, 5), params=f.parameters())

def dict_state():
    return dict(func=lambda t, y: {"a": -y["a"]}, y0={"a": torch.randn(2)}, t=torch.linspace(0, 1, 5))

def wrong_shape():
    return dict(func=Field(), y0=torch.randn(3, 5), t=torch.linspace(0, 1, 5))

def list_times():
    return dict(func=Field(), y0=torch.randn(3, 2), t=[0.0, 1.0])

def vector_loss():
    return dict(func=Field(), y0=torch.randn(3, 2), t=torch.linspace(0, 1, 3), loss=lambda ys: ys)

def short_reference():
    return dict(func=Field(), y0=torch.randn(3, 2), t=torch.linspace(0, 1, 3), reference=lambda: (torch.zeros(3, 2),))
'''


def _compare(tmp_path, factory):
    path = tmp_path / "my problem.py"
    path.write_text(PROBLEM)
    return main(["compare", f"{path}:{factory}", "--methods", "backsolve", "--tolerances", "1e-3", "--repeats", "1",
                 "--no-plot", "--out", str(tmp_path / "out")])


def test_compare_params_given_as_a_generator_are_measured(tmp_path, capsys):
    # params=model.parameters() was used up by the reference: every method then failed.
    assert _compare(tmp_path, "generator_params") == 0
    out = capsys.readouterr().out
    assert "failed" not in out
    import json

    row = json.loads((tmp_path / "out" / "results.json").read_text())["rows"][0]
    assert row["error"] is not None and row["error"] < 1e-2


@pytest.mark.parametrize("factory, match", [
    ("dict_state", "y0 must be one tensor"),
    ("list_times", "t must be a 1-D tensor"),
    ("wrong_shape", "reference gradient could not be computed"),
    ("vector_loss", "reference gradient could not be computed"),
    ("short_reference", "reference\\(\\) returned 1 gradient"),
])
def test_compare_bad_user_problems_are_one_line_errors(tmp_path, capsys, factory, match):
    import re

    assert _compare(tmp_path, factory) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert re.search(match, err), err


TINY = ["spiral", "--iterations", "1", "--no-plots", "--threads", "1"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A one-epoch spiral run in a folder whose name has a space."""
    folder = tmp_path_factory.mktemp("runs") / "a run"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(folder)]) == 0
    return folder


def test_resume_given_the_run_folder_continues_it(finished_run, tmp_path, capsys):
    # `--resume FOLDER` said "FOLDER does not exist" (it does: it is a folder, not a file).
    import shutil

    folder = tmp_path / "copy of run"
    shutil.copytree(finished_run, folder)
    assert main(["train", "--resume", str(folder), "--epochs", "2", "--no-progress"]) == 0
    assert len((folder / "metrics.csv").read_text().splitlines()) == 3  # header + 2 epochs
    assert main(["train", "--resume", str(folder), "--out", str(tmp_path / "elsewhere")]) == 2
    assert "is a folder" in capsys.readouterr().err


@pytest.mark.parametrize("alter, match", [
    (lambda s: {k: v for k, v in s.items() if k != "history"}, "damaged torchadjoint checkpoint: history"),
    (lambda s: dict(s, config=[1, 2]), "damaged torchadjoint checkpoint: config"),
    (lambda s: dict(s, epoch="3"), "damaged torchadjoint checkpoint: epoch"),
    (lambda s: dict(s, rng={"python": [1, 2]}), "random states are damaged"),
])
def test_altered_checkpoints_are_one_line_errors(finished_run, tmp_path, capsys, alter, match):
    # Loadable (weights_only) but altered files ended in KeyError/TypeError/ValueError tracebacks.
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(finished_run, folder)
    state = torch.load(folder / "checkpoint.pt", weights_only=True)
    torch.save(alter(state), folder / "checkpoint.pt")
    assert main(["train", "--out", str(folder), "--resume", "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("argv, match", [
    (["--seed", "99999999999999999999"], "--seed 99999999999999999999 is out of range"),
    (["--time", "1e-300"], "--time 1e-300 is zero in float32"),
])
def test_out_of_range_numbers_are_one_line_errors(tmp_path, capsys, argv, match):
    # Both passed the parser and ended in a ValueError traceback inside torch.
    assert main(["train", "digits", *argv, "--epochs", "1", "--limit-batches", "1", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1, err


def test_train_fills_the_task_defaults_of_a_config_made_directly(tmp_path):
    # TrainConfig's fields left None mean "the task's default"; train() failed on them with a TypeError.
    from torchadjoint.training import TrainConfig, train

    result = train(TrainConfig(task="spiral", out=str(tmp_path / "r"), epochs=1, iterations=1, plots=False))
    assert len(result.history) == 1 and math.isfinite(result.final["trajectory_loss"])


def test_interrupted_run_suggests_a_command_that_works_in_a_shell(finished_run, tmp_path, capsys, monkeypatch):
    # The suggested "torchadjoint train --out FOLDER --resume" left a folder with a space unquoted.
    import shlex
    import shutil

    from torchadjoint.training import loop

    folder = tmp_path / "my run"
    shutil.copytree(finished_run, folder)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_run_epoch", interrupted)
    assert main(["train", "--out", str(folder), "--resume", "--epochs", "2"]) == 130
    out = capsys.readouterr().out
    assert f"torchadjoint train --out {shlex.quote(str(folder))} --resume" in out, out
    assert shlex.split(out.strip().splitlines()[-1].split("continue with: ")[1])[3] == str(folder)


def test_interrupt_during_the_checkpoint_write_reports_what_is_on_disk(finished_run, tmp_path, capsys, monkeypatch):
    # Interrupted while writing epoch 2's checkpoint, the run claimed 2 saved epochs; 1 is on disk.
    import shutil

    from torchadjoint.training import checkpoint

    folder = tmp_path / "run"
    shutil.copytree(finished_run, folder)

    def interrupted(obj, path, keep_previous=""):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_atomic", interrupted)
    assert main(["train", "--out", str(folder), "--resume", "--epochs", "2"]) == 130
    assert "1 finished epoch(s) are saved" in capsys.readouterr().out
    assert torch.load(folder / "checkpoint.pt", weights_only=True)["epoch"] == 1
