"""Training runs in child processes: one killed (SIGKILL) in the middle of its second epoch,
for the resume tests, and one under torchrun with two processes, for the comparisons of 1
and 2 processes.

The child run stops itself (SIGSTOP) once it is inside its second epoch: after the first
epoch's checkpoint is written and one more optimiser step is taken. The parent waits for
that stop, checks that exactly one epoch is on disk, then SIGKILLs it: no sleep, so nothing
depends on how fast the machine trains.
"""
import os
import signal
import subprocess
import sys

import torch

_STOP_MID_SECOND_EPOCH = """
import os, signal, sys
import torch
from torchadjoint.cli import main
from torchadjoint.training import checkpoint

saved = {"epochs": 0}
write = checkpoint.save_atomic

def save_and_count(state, path, *args, **kwargs):
    write(state, path, *args, **kwargs)
    if path.endswith(checkpoint.CHECKPOINT):
        saved["epochs"] = state["epoch"]

checkpoint.save_atomic = save_and_count
step = torch.optim.Adam.step

def step_then_stop(self, *args, **kwargs):
    out = step(self, *args, **kwargs)
    if saved["epochs"] == 1:
        os.kill(os.getpid(), signal.SIGSTOP)  # the parent SIGKILLs us here
    return out

torch.optim.Adam.step = step_then_stop
sys.exit(main(sys.argv[1:]))
"""

ENV = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")


def final_params(folder) -> dict:
    """The state dict of a finished run's model.pt."""
    return torch.load(os.path.join(folder, "model.pt"), weights_only=True)["state_dict"]


def epochs_done(folder) -> int:
    """Epochs recorded in the run's metrics.csv (0 if none)."""
    path = os.path.join(folder, "metrics.csv")
    if not os.path.exists(path):
        return 0
    with open(path) as fh:
        return max(0, len(fh.read().strip().splitlines()) - 1)


def kill_mid_second_epoch(folder: str, args) -> int:
    """Run ``torchadjoint train --out folder *args`` in a child process and SIGKILL it inside
    its second epoch. Returns the child's exit status (``-SIGKILL``)."""
    proc = subprocess.Popen([sys.executable, "-c", _STOP_MID_SECOND_EPOCH, "train", "--out", folder, *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    try:
        # Blocks until the child stops itself mid-epoch 2 (or ends, which is a failure).
        _, status = os.waitpid(proc.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), f"training ended before its second epoch: {proc.stderr.read().decode()[-2000:]}"
        assert epochs_done(folder) == 1, "the child stopped outside its second epoch"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        proc.stderr.close()
    assert not os.path.exists(os.path.join(folder, "model.pt")), "the run was not interrupted"
    return proc.returncode


def run_two_processes(folder: str, args) -> None:
    """``torchadjoint train --out folder *args`` under ``torchrun --nproc_per_node=2``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "torchadjoint", "train", "--out", folder, *args]
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 process(es)" in done.stdout


def iteration_records(folder, columns) -> tuple:
    """From the run's nfe.csv: the given columns of every iteration (exact strings: epoch,
    iteration, function-evaluation counts) and the per-iteration losses, (iterations,) float64."""
    with open(os.path.join(folder, "nfe.csv")) as fh:
        header, *rows = [line.strip().split(",") for line in fh]
    picked = [header.index(c) for c in columns]
    losses = torch.tensor([float(r[header.index("loss")]) for r in rows], dtype=torch.float64)
    return [tuple(r[i] for i in picked) for r in rows], losses
