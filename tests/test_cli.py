"""The command line: help, option checking, clear errors for bad input."""
import json
import sys

import pytest
import torch

import torchadjoint as ta
from torchadjoint.cli import build_parser, main

# A run as small as possible: a few batches of a tiny model.
TINY = ["--hidden", "4", "--limit-batches", "2", "--no-plots", "--no-progress"]


def _error(capsys, argv):
    """Run ``argv``; return (exit status, stderr)."""
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse errors
        status = exc.code
    return status, capsys.readouterr().err


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "train" in out and "COMMAND" in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for word in ("digits", "spiral", "--gradient", "--method", "--rtol", "--atol", "--epochs", "--batch-size", "--lr",
                 "--seed", "--out", "--resume", "--device", "metrics.csv", "torchrun", "trajectory loss", "runs/TASK-1"):
        assert word in out, word
    # Every registered gradient method is offered.
    for name in ta.GRADIENT_METHODS:
        assert name in out


def test_gradient_registry_is_read_when_the_parser_is_built(monkeypatch):
    monkeypatch.setitem(ta.GRADIENT_METHODS, "zz_new_method", ta.Direct)
    args = build_parser().parse_args(["train", "--gradient", "zz_new_method"])
    assert args.gradient == "zz_new_method"


def test_module_entry_point_runs(monkeypatch, capsys):
    # ``python -m torchadjoint`` (what torchrun -m runs; the torchrun test runs it for real).
    import runpy

    monkeypatch.setattr(sys, "argv", ["torchadjoint", "--version"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("torchadjoint", run_name="__main__")
    assert exc.value.code == 0 and ta.__version__ in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, words",
    [
        (["train", "mnist"], ["unknown task", "mnist", "digits", "spiral"]),
        (["train", "--epcohs", "3"], ["--epcohs", "--epochs"]),
        (["train", "digits", "extra"], ["extra"]),
        (["train", "--epochs", "-3"], ["--epochs", "-3"]),
        (["train", "--epochs", "0"], ["--epochs", "positive"]),
        (["train", "--lr", "0"], ["--lr"]),
        (["train", "--rtol", "-1e-3"], ["--rtol"]),
        (["train", "--batch-size", "two"], ["--batch-size", "two"]),
        (["train", "--gradient", "adjoint"], ["--gradient", "backsolve"]),
        (["train", "--method", "rk5"], ["--method", "dopri5"]),
        (["train", "--lr-decay", "1.5"], ["--lr-decay"]),
        (["train", "spiral", "--seq-len", "5000", "--out", "/nonexistent/never-made"], ["--seq-len", "5000"]),
    ],
)
def test_bad_options_name_the_option(capsys, argv, words):
    status, err = _error(capsys, argv)
    assert status == 2
    for word in words:
        assert word in err, (word, err)


def test_inconsistent_solver_options(capsys, tmp_path):
    status, err = _error(capsys, ["train", "--method", "rk4", "--out", str(tmp_path / "a"), *TINY])
    assert status == 2 and "--step-size" in err
    status, err = _error(capsys, ["train", "--step-size", "0.1", "--out", str(tmp_path / "b"), *TINY])
    assert status == 2 and "--step-size" in err and "adaptive" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_bad_device(capsys, tmp_path):
    status, err = _error(capsys, ["train", "--device", "toaster", "--out", str(tmp_path / "d"), *TINY])
    assert status == 2 and "--device" in err and "toaster" in err


def test_resume_without_a_run(capsys, tmp_path):
    status, err = _error(capsys, ["train", "--out", str(tmp_path / "none"), "--resume", *TINY])
    assert status == 2 and "--resume" in err and "none" in err


def test_unreadable_checkpoint(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--epochs", "1", *TINY]) == 0
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    status, err = _error(capsys, ["train", "--out", str(out), "--resume", "--epochs", "2", *TINY])
    assert status == 2
    assert "cannot read checkpoint" in err and "checkpoint.pt" in err
    other = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    status, err = _error(capsys, ["train", "--out", str(out), "--resume", str(other), "--epochs", "2", *TINY])
    assert status == 2 and "not a torchadjoint training checkpoint" in err


def test_resume_refuses_defining_options_by_their_real_names(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--epochs", "1", "--time", "0.5", *TINY]) == 0
    status, err = _error(capsys, ["train", "--out", str(out), "--resume", "--epochs", "2", "--lr", "0.5"])
    assert status == 2 and "Traceback" not in err
    assert "cannot resume" in err and "--lr 0.5 given" in err and "--lr 0.01" in err
    status, err = _error(capsys, ["train", "spiral", "--out", str(out), "--resume", "--time", "2"])
    assert status == 2
    assert "task 'spiral'" in err and "task 'digits'" in err and "--time 2" in err and "--time 0.5" in err
    # Internal names never reach the user.
    assert "--T" not in err and "--task" not in err
    # Without --resume, a folder holding a run is not silently overwritten.
    status, err = _error(capsys, ["train", "--out", str(out), "--epochs", "1", *TINY])
    assert status == 2 and "--resume" in err and "--overwrite" in err and str(out) in err
    # Both at once contradict each other.
    status, err = _error(capsys, ["train", "--out", str(out), "--resume", "--overwrite"])
    assert status == 2 and "--resume and --overwrite" in err
    # --resume needs to know which run.
    status, err = _error(capsys, ["train", "--resume"])
    assert status == 2 and "--resume needs --out" in err


def test_resume_continues_the_saved_run(capsys, tmp_path):
    """``--out DIR --resume`` alone continues the run with the options it was started with;
    run-control options (--epochs) may change, defining ones may be repeated unchanged."""
    out = tmp_path / "run"
    first = ["train", "spiral", "--out", str(out), "--epochs", "1", "--hidden", "5", "--seq-len", "4", "--iterations",
             "2", "--batch-size", "8", "--lr", "0.02", "--no-plots", "--no-progress"]
    assert main(first) == 0
    saved = json.loads((out / "config.json").read_text())["run"]
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert "nothing to train" in capsys.readouterr().out  # --epochs 1 was taken from the run
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--hidden", "5", "--no-progress"]) == 0
    assert json.loads((out / "config.json").read_text())["run"] == saved
    assert len((out / "metrics.csv").read_text().strip().splitlines()) == 1 + 2
    log = (out / "train.log").read_text()
    assert "resuming" in log and "after epoch 1" in log and "epoch 2/2" in log
    assert not (out / "nfe.png").exists()  # --no-plots is part of the run as it was


def test_output_folder_errors_and_numbered_default(capsys, tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for out in (afile, afile / "sub"):
        status, err = _error(capsys, ["train", "--out", str(out), *TINY])
        assert status == 2 and "Traceback" not in err
        assert "--out" in err and str(out) in err and "is a file" in err
    # Without --out every run gets a new numbered folder: the quick start can run twice.
    monkeypatch.chdir(tmp_path)
    for n in (1, 2):
        assert main(["train", "--epochs", "1", "--method", "rk4", "--step-size", "0.25", *TINY]) == 0
        assert (tmp_path / "runs" / f"digits-{n}" / "model.pt").is_file()
    printed = capsys.readouterr().out
    # Item: the banner shows a fixed-step method's step size, not tolerances it does not use.
    assert "solver rk4 (step size 0.25)" in printed and "rtol" not in printed
    assert "runs/digits-2" in printed
    # An explicit --out keeps its protection.
    status, err = _error(capsys, ["train", "--out", "runs/digits-1", *TINY])
    assert status == 2 and "already holds a run" in err


def test_overwrite_removes_every_task_s_files(tmp_path):
    """--overwrite starts a run afresh: no plot of an earlier run (whatever its task) is left
    beside the new one's files."""
    from torchadjoint.training.loop import RUN_FILES

    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--epochs", "1", "--no-plots", *TINY]) == 0
    stale = ["density.png", "samples.png", "flow.png", "reconstructions.png", "latent_trajectories.png",
             "trajectories.png", "vector_field.png"]
    for name in stale:
        assert name in RUN_FILES
        (out / name).write_bytes(b"stale")
    assert main(["train", "--out", str(out), "--epochs", "1", "--no-plots", "--overwrite", *TINY]) == 0
    assert [name for name in stale if (out / name).exists()] == []
