"""The command line: help, option checking, clear errors for bad input."""
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
                 "--seed", "--out", "--resume", "--device", "metrics.csv", "torchrun"):
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
        (["train", "mnist"], ["invalid choice", "mnist", "digits", "spiral"]),
        (["train", "--epochs", "-3"], ["--epochs", "-3"]),
        (["train", "--epochs", "0"], ["--epochs", "positive"]),
        (["train", "--lr", "0"], ["--lr"]),
        (["train", "--rtol", "-1e-3"], ["--rtol"]),
        (["train", "--batch-size", "two"], ["--batch-size", "two"]),
        (["train", "--gradient", "adjoint"], ["--gradient", "backsolve"]),
        (["train", "--method", "rk5"], ["--method", "dopri5"]),
        (["train", "--lr-decay", "1.5"], ["--lr-decay"]),
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


def test_resume_with_a_different_configuration(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--epochs", "1", *TINY]) == 0
    status, err = _error(capsys, ["train", "--out", str(out), "--resume", "--epochs", "2", "--lr", "0.5", *TINY])
    assert status == 2
    assert "--lr" in err and "0.5" in err and "different configuration" in err
    status, err = _error(capsys, ["train", "spiral", "--out", str(out), "--resume", *TINY])
    assert status == 2 and "--task" in err
    # Without --resume, a folder holding a run is not silently overwritten.
    status, err = _error(capsys, ["train", "--out", str(out), "--epochs", "1", *TINY])
    assert status == 2 and "--resume" in err and "--overwrite" in err
