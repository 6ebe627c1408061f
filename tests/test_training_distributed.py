"""Data-parallel training: 2 processes (gloo) reach the parameters of 1 process with the
same global batch, and a failing rank does not leave the other hanging."""
import multiprocessing
import os
import socket
import subprocess
import sys

import pytest
import torch

from torchadjoint.cli import main

# float64 and tight tolerances: many adaptive steps (and rejections), so that ranks
# choosing different steps would show as differences far above rounding.
COMMON = ["--epochs", "2", "--dtype", "float64", "--rtol", "1e-7", "--atol", "1e-9", "--lr", "0.05", "--no-plots",
          "--no-progress"]
OPTIONS = ["--hidden", "6", "--limit-batches", "3", "--batch-size", "24", *COMMON]
# The spiral's losses at every observation time make Backsolve land, and decide whether to
# reset y, 7 times per backward pass: that decision must be the whole batch's, too.
TASK_OPTIONS = {
    "digits": OPTIONS,
    "spiral": ["spiral", "--hidden", "8", "--iterations", "4", "--batch-size", "8", "--seq-len", "8", *COMMON],
}


def _state(folder):
    return torch.load(os.path.join(folder, "model.pt"), weights_only=True)["state_dict"]


def _nfe_columns(folder):
    with open(os.path.join(folder, "nfe.csv")) as fh:
        return [line.split(",")[:2] + line.strip().split(",")[3:] for line in fh]


@pytest.mark.parametrize("task", sorted(TASK_OPTIONS))
def test_two_processes_match_one(tmp_path, task):
    options = TASK_OPTIONS[task]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "torchadjoint", "train", "--out", str(tmp_path / "ddp"), *options]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 process(es)" in done.stdout
    assert main(["train", "--out", str(tmp_path / "single"), *options]) == 0

    # The same steps on every rank as in the single process: identical evaluation counts.
    nfe_ddp, nfe_single = _nfe_columns(tmp_path / "ddp"), _nfe_columns(tmp_path / "single")
    assert nfe_ddp == nfe_single
    assert max(int(row[3]) for row in nfe_single[1:]) > 30  # a backward solve of many steps, not a trivial one
    ddp, single = _state(tmp_path / "ddp"), _state(tmp_path / "single")
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-9, atol=1e-11, msg=name)
    # ... and the trained parameters moved: the comparison is not between two initialisations.
    init = torch.load(tmp_path / "single" / "checkpoint.prev.pt", weights_only=True)["model"]
    assert any(not torch.allclose(init[name], single[name]) for name in single)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, out: str, results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if rank == 1:
        from torchadjoint.training.tasks import DigitsTask

        original, calls = DigitsTask.batch_loss, [0]

        def failing(self, model, batch):
            calls[0] += 1
            if calls[0] == 2:
                raise RuntimeError("rank 1 fails on purpose")
            return original(self, model, batch)

        DigitsTask.batch_loss = failing
    try:
        main(["train", "--out", out, "--dist-timeout", "30", *OPTIONS])
        results.put((rank, "finished"))
    except BaseException as exc:  # report, then exit with an error
        results.put((rank, f"{type(exc).__name__}: {exc}"[:300]))
        sys.exit(1)


def test_a_failing_rank_does_not_hang_the_other(tmp_path):
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    procs = [context.Process(target=_rank, args=(r, port, str(tmp_path / "run"), results)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=240)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        assert not hung, f"rank(s) {hung} still running after rank 1 failed"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    reports = dict(results.get(timeout=5) for _ in procs)
    assert "fails on purpose" in reports[1]
    assert reports[0] != "finished"
    assert all(p.exitcode != 0 for p in procs)


def test_synchronised_norms_keep_each_methods_steps(tmp_path):
    """On one rank the all-reduced norms must be exactly the methods' own default norms:
    same steps (evaluation counts) and the same gradients. A wrong choice of measured parts
    (e.g. a_θ included, or y left out) changes the steps."""
    import torch.distributed as dist

    import torchadjoint as ta
    from torchadjoint.models import MLPField, NeuralODE
    from torchadjoint.training.distributed import Context, GlobalRMSNorm, synchronised_gradient

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ctx = Context(norm_group=None)
        torch.manual_seed(0)
        field = MLPField(3, 8).double()
        y0 = torch.randn(4, 3, dtype=torch.float64)
        t = torch.linspace(0, 1.5, 4, dtype=torch.float64)
        names = [n for n in ("backsolve", "checkpointed", "quadrature") if n in ta.GRADIENT_METHODS]
        assert "backsolve" in names
        for name in names:
            results = []
            for synced in (False, True):
                method = ta.gradient_method(name)
                options = {}
                if synced:
                    method = synchronised_gradient(method, ctx)
                    assert method.norm != ta.gradient_method(name).norm, name
                    options["norm"] = GlobalRMSNorm(ctx)
                block = NeuralODE(field, rtol=1e-6, atol=1e-8, gradient=method, **options)
                field.zero_grad()
                y = y0.clone().requires_grad_(True)
                block(y, t).pow(2).sum().backward()
                grads = [y.grad] + [p.grad.clone() for p in field.parameters()]
                results.append((block.stats["forward"]["steps"], block.stats["backward"]["steps"], grads))
            (f0, b0, g0), (f1, b1, g1) = results
            assert (f0, b0) == (f1, b1), name
            for a, b in zip(g0, g1):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
        # Backsolve's reset decision: on one rank the global drift RMS is the method's own.
        synced = synchronised_gradient(ta.Backsolve(), ctx)
        drift = torch.tensor(3.0, dtype=torch.float64)
        assert synced.reset_measure(drift, 4) == pytest.approx(ta.Backsolve().reset_measure(drift, 4)) == 1.5
    finally:
        dist.destroy_process_group()
