"""Fast checks of the benchmark program: the pieces whose errors would silently corrupt the
reported numbers (the CNF's exact trace, the analytic gradient, the peers' set-up, the
report writer, the CUDA refusal). The benchmarks themselves are run by benchmarks/run.py."""
from __future__ import annotations

import os
import sys

import pytest
import torch

import torchadjoint as ta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import bench_accuracy, bench_cnf, bench_compiled, bench_peers, common, peer_diffrax, report, run  # noqa: E402


def test_cnf_log_density_derivative_is_minus_the_exact_trace():
    torch.manual_seed(0)
    func = bench_cnf.CNF(hidden=16)
    z = torch.randn(5, 2)
    t = torch.tensor(0.3)
    dz, dlogp = func(t, (z, torch.zeros(5, 1)))
    for b in range(5):
        jac = torch.autograd.functional.jacobian(
            lambda x: func.net(torch.cat([x, t.reshape(1)])), z[b]
        )
        assert torch.allclose(dlogp[b, 0], -torch.trace(jac), atol=1e-6)
    assert dz.requires_grad and dlogp.requires_grad  # differentiable, as the adjoints need
    with torch.no_grad():  # an adjoint's forward solve: no graph is kept
        dz0, dlogp0 = func(t, (z, torch.zeros(5, 1)))
    assert not dz0.requires_grad and not dlogp0.requires_grad
    assert torch.allclose(dlogp0, dlogp.detach())


def test_exact_gradient_matches_van_loan_block_exponential():
    A, y0, W, t = bench_accuracy.make_problem(d=4, batch=3, T=1.5)
    T = float(t[-1])
    g = bench_accuracy.exact_gradient(A, y0, W, T)
    d = A.shape[0]
    # dL/dA = ∫_0^T e^{Aᵀ(T-s)} (Σ_b w_b y0_bᵀ) e^{Aᵀ s} ds: the upper-right block of
    # expm([[Aᵀ T, E T], [0, Aᵀ T]]) with E = Wᵀ y0 (Van Loan 1978).
    E = W.T @ y0
    block = torch.zeros(2 * d, 2 * d, dtype=torch.float64)
    block[:d, :d] = block[d:, d:] = A.T * T
    block[:d, d:] = E * T
    gA = torch.linalg.matrix_exp(block)[:d, d:]
    gy0 = W @ torch.linalg.matrix_exp(A * T)
    assert torch.allclose(g, torch.cat([gA.reshape(-1), gy0.reshape(-1)]), rtol=1e-10, atol=1e-12)


def test_every_library_computes_the_same_gradient_on_a_short_demo_problem():
    func, y0, t = common.demo_problem(batch=4, n_times=200)
    spec = dict(func=func, y0=y0, t=t[:4], rtol=1e-6, atol=1e-7, loss=lambda ys: ys.pow(2).mean())
    solvers = bench_peers.make_solvers(spec)
    samples = {name: [bench_peers.measure(solve, spec, spec["t"], "cpu")()] for name, solve in solvers.items()}
    diffs = bench_peers.agreement(samples)
    assert set(diffs) >= {"torchadjoint / Backsolve", "torchadjoint / Direct"}
    assert all(d < 1e-3 for d in diffs.values()), diffs
    ours = samples["torchadjoint / Backsolve"][0]
    assert ours["fwd_nfe"] > 0 and ours["bwd_nfe"] > 0
    assert samples["torchadjoint / Direct"][0]["bwd_nfe"] == 0  # autograd replays, calls no f


def test_report_formats_tables_generic_results_and_plots(tmp_path):
    assert report.fmt(None) == "—" and report.fmt(3) == "3" and report.fmt(0.12345) == "0.123"
    assert report.fmt(1234.5) == "1234" and report.fmt(2.5e-5) == "2.50e-05"
    assert report.table(["a", "b"], [[1, None]]).splitlines() == ["| a | b |", "|---|---|", "| 1 | — |"]
    generic = "\n".join(report.generic({"x": {"p": 1, "q": 2.5}, "y": {"p": 3}}))
    assert "| x | 1 | 2.5 |" in generic and "| y | 3 | — |" in generic
    result = dict(
        title="T", notes="N", sections=[dict(title="S", columns=["c"], rows=[[1.0]])],
        plots=[dict(file="p.png", kind="line", series={"torchadjoint": [[1, 2], [3, 4]]}, logy=True),
               dict(file="b.png", kind="bar", series={"torchadjoint": 1.0, "peer": 2.0})],
        headline={"h": 0.5}, extra={"k": 1},
    )
    doc = report.document([result], machine="m", command="cmd", quick=True, device="cpu",
                          image_dir=str(tmp_path / "img"), doc_path=str(tmp_path / "b.md"))
    assert "## T" in doc and "### S" in doc and "| h | 0.5 |" in doc and "| extra | 1 |" in doc
    assert "![" in doc and "(img/p.png)" in doc
    assert (tmp_path / "img" / "p.png").stat().st_size > 0 and (tmp_path / "img" / "b.png").stat().st_size > 0


def test_cuda_mode_refuses_clearly_without_cuda(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run.main(["--device", "cuda", "--out", str(tmp_path / "x.md")]) == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "CUDA is not available" in err
    assert not (tmp_path / "x.md").exists()


def test_missing_benchmark_module_is_reported_not_raised():
    result = run.run_one("bench_does_not_exist", quick=True, device="cpu")
    assert "not in this checkout" in result["skipped"]


def test_targets_are_read_from_each_benchmarks_raw_numbers():
    peers = dict(name="peers", metrics=dict(demo=dict(stats={
        "torchadjoint / Backsolve": dict(fwd_s=1.0, bwd_nfe=60, total_s=2.0),
        "torchdiffeq / odeint_adjoint": dict(fwd_s=4.0, bwd_nfe=100, total_s=3.0),
    }), mlp=dict(stats={"torchadjoint / Backsolve": dict(ideal_ratio=1.3)})))
    forward = dict(name="forward", metrics=dict(ratios={"time per solve, ours / torchdiffeq": 0.45}))
    adjoint = dict(name="adjoint", metrics=dict(mlp=dict(stats={"torchadjoint Backsolve()": dict(ideal_ratio=1.05)})))
    rows = {(r[0], r[1].split(",")[0]): (r[2], r[4]) for r in run.targets_table([peers, forward, adjoint])}
    assert rows[("problem 1: forward wall, ours / torchdiffeq", "bench_peers")] == (0.25, True)
    assert rows[("problem 1: forward wall, ours / torchdiffeq", "bench_forward")] == (0.45, True)
    assert rows[("problem 1: backward nfe, ours / torchdiffeq", "bench_peers")] == (0.6, True)
    assert rows[("problem 1: fwd+bwd wall, ours / torchdiffeq", "bench_peers")] == (2.0 / 3.0, False)
    # The ideal-cost target is judged by bench_adjoint's per-operation unit costs only.
    assert rows[("problem 2: wall / ideal cost (ours)", "bench_adjoint")] == (1.05, True)
    assert ("problem 2: wall / ideal cost (ours)", "bench_peers") not in rows
    assert ("problem 2: backward nfe, ours / torchdiffeq", "bench_peers") not in rows  # not measured


def test_memory_plot_joins_bench_memory_and_peer_rows_and_ignores_other_shapes():
    results = [
        dict(name="peers", metrics=dict(memory={"torchadjoint / Backsolve": {"1.0": dict(peak_mb=9.0)},
                                                "torchode / AutoDiffAdjoint": {"1.0": dict(peak_mb=2.0), "10.0": dict(peak_mb=20.0)}})),
        dict(name="contracting", metrics=dict(memory=[dict(steps=1, peak=2.0)])),  # another benchmark's format
        dict(name="memory", metrics=dict(table={"torchadjoint / Backsolve": {"1.0": dict(peak_mb=1.0), "10.0": dict(peak_mb=1.1)},
                                               "torchadjoint / Direct": {"1.0": dict(error="boom")}})),
    ]
    run.memory_plot(results)
    run.memory_plot(results)  # idempotent: re-rendering saved results adds no second plot
    plots = results[2]["plots"]
    assert len(plots) == 1
    series = plots[0]["series"]
    assert series["torchadjoint / Backsolve"] == [[1.0, 10.0], [1.0, 1.1]]  # bench_memory's row wins
    assert series["torchode / AutoDiffAdjoint"] == [[1.0, 10.0], [2.0, 20.0]]
    assert "torchadjoint / Direct" not in series  # nothing measured, nothing drawn


def test_diffrax_peer_is_skipped_cleanly_without_jax(monkeypatch):
    monkeypatch.setattr(peer_diffrax, "AVAILABLE", False)
    monkeypatch.setattr(peer_diffrax, "MISSING", "diffrax not measured: No module named 'jax' (pip install jax diffrax)")
    func, y0, t = common.demo_problem(batch=2, n_times=3)
    spec = dict(func=func, y0=y0, t=t, rtol=1e-6, atol=1e-7)
    assert peer_diffrax.make_runs(spec, "demo", "cpu") == {}
    assert "pip install jax diffrax" in peer_diffrax.skip_note("cpu")


def test_diffrax_peer_solves_the_same_problem_and_counts_its_evaluations():
    """Same weights, data and tolerances as ours: the same outputs to the tolerance, and a
    forward count of f that matches Dopri5's cost (FSAL: one first call, then 6 per step).
    (Gradients are compared in every benchmark run: bench_peers' `grad rel. diff vs ours` column,
    bench_compiled's `grad error`.)"""
    pytest.importorskip("diffrax")
    func, y0, t = common.demo_problem(batch=4, n_times=4)
    spec = dict(func=func, y0=y0, t=t, rtol=1e-6, atol=1e-7)
    problem = peer_diffrax.DiffraxProblem(spec, loss="all", cubic=True)
    theirs = torch.from_numpy(peer_diffrax.jax.device_get(problem.compiled("forward")(problem.params)).copy())
    with torch.no_grad():
        sol = ta.solve(func, y0, t, rtol=1e-6, atol=1e-7)
    assert theirs.shape == sol.ys.shape
    assert torch.allclose(theirs, sol.ys, rtol=1e-4, atol=1e-5)
    nfe = problem.forward_nfe()
    assert nfe > 1 and (nfe - 1) % 6 == 0
    assert abs(nfe - sol.stats["forward"]["nfe"]) <= 12  # same method, same tolerances
    assert problem.compile_s["forward"] > 0


def test_diffrax_backward_tightened_until_its_gradient_error_is_ours():
    """bench_compiled's equal-gradient-error comparison stops at the first power of two that
    brings the peer's gradient error to ours or below, and times those two runs (here a stand-in
    peer whose error halves with each halving of its tolerances); where halving stops paying, the
    most accurate run stands in, said unmatched."""
    class Peer:
        def tightened(self, factor):
            return f"peer × {factor:g}"

        def gradient(self, name):
            return torch.tensor([1.0 + float(name.split("× ")[1]) * 1e-3])

        def measure(self, name):
            return lambda: dict(total_s=0.02, bwd_nfe=10, grad=self.gradient(name))

    error_of = lambda grad: float((grad - 1.0).abs())  # noqa: E731
    ours = lambda: dict(total_s=0.03, bwd_nfe=7, grad=torch.tensor([1.0 + 0.3e-3]))  # noqa: E731
    equal = bench_compiled._equal_error(Peer(), ours, dict(grad_error=0.3e-3), error_of, repeats=3)
    assert equal["metrics"]["factor"] == 0.25 and equal["metrics"]["matched"]  # 0.5e-3 > 0.3e-3 >= 0.25e-3
    assert equal["metrics"]["ratio"] == pytest.approx(1.5)
    assert equal["rows"][1][0] == "peer × 0.25" and equal["rows"][1][3] == pytest.approx(0.25e-3, rel=1e-3)
    never = bench_compiled._equal_error(Peer(), ours, dict(grad_error=0.0), error_of, repeats=1)
    assert not never["metrics"]["matched"] and never["metrics"]["factor"] == 2.0 ** -bench_compiled.EQUAL_ERROR_STEPS

    class Stuck(Peer):  # its error stops falling at 1e-4 (the forward's, say): the most accurate run stands in
        def gradient(self, name):
            return torch.tensor([1.0 + max(float(name.split("× ")[1]) * 1e-3, 1e-4)])

    stuck = bench_compiled._equal_error(Stuck(), ours, dict(grad_error=0.5e-4), error_of, repeats=1)
    assert not stuck["metrics"]["matched"] and stuck["metrics"]["factor"] == 2.0 ** -4  # 1e-3/16 < 1e-4 from × 2^-4 on


def test_diffrax_backsolve_with_tightened_backward_tolerances_is_more_accurate():
    """peer_diffrax.tightened: diffrax's own BacksolveAdjoint(stepsize_controller=...) at smaller
    backward tolerances takes more backward steps and gets closer to a tight float64 gradient.
    (A mean-reduced loss at the last time: its adjoint is small, and diffrax's absolute atol
    loose for it.)"""
    pytest.importorskip("diffrax")
    torch.manual_seed(0)
    func = bench_compiled.Plain(torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8)),
                                cubic=False)
    spec = dict(func=func, y0=torch.randn(64, 8), t=torch.tensor([0.0, 1.0]), rtol=1e-5, atol=1e-5,
                loss=lambda ys: ys[-1].pow(2).mean())
    problem = peer_diffrax.DiffraxProblem(spec, loss="last", cubic=False)
    reference, _ = bench_compiled._reference_gradient(func, spec)
    error = lambda name: float((problem.gradient(name) - reference).norm() / reference.norm())  # noqa: E731
    tight = problem.tightened(1 / 16)
    assert error(tight) < error(peer_diffrax.ADJOINT) / 2
    assert problem.count(tight)["bwd_nfe"] > problem.count(peer_diffrax.ADJOINT)["bwd_nfe"]


@pytest.mark.compiled
def test_compiled_loop_floor_calls_the_loop_program_as_the_solver_does():
    """bench_compiled's "where the time goes" probe makes the solve's loop graph calls again by
    hand: it must follow the program's signature (a change of it broke only the benchmark run)."""
    from torchadjoint import compiled

    func, y0, t = common.demo_problem(batch=4, n_times=20)
    plain = bench_compiled.Plain(func.net, cubic=True)
    compiled.clear_cache()
    with torch.no_grad():
        sol = ta.solve(plain, y0, t, rtol=1e-5, atol=1e-6, compile=True)
    floor = bench_compiled._loop_floor(plain, y0, t, 1e-5, 1e-6, [dict(wall_s=1.0)] * 2)
    assert floor["steps"] == sol.stats["forward"]["steps"] and floor["calls"] >= 1
    assert floor["graphs_ms"] > 0 and floor["hook_ms"] > 0
    compiled.clear_cache()
