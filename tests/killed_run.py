"""A training run killed (SIGKILL) in the middle of its second epoch, for the resume tests.

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
