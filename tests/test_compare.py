"""``torchadjoint compare``: the measurements (errors against analytic gradients, counts),
the reference by autograd through the solver, user problems, the table, files and CLI."""
import json
import math

import pytest
import torch

from torchadjoint.cli import build_parser, main
from torchadjoint.commands import CommandError
from torchadjoint.commands.compare import (
    Row, Setup, compare, contracting_problem, default_folder, linear_problem, load_problem, measure, reference_gradient,
    summary, table,
)


def test_linear_errors_shrink_with_tolerance_and_counts_are_filled():
    rows = compare(linear_problem(), ["backsolve", "quadrature", "direct"], [1e-3, 1e-7], repeats=1)
    by = {(r.method, r.tol): r for r in rows}
    for name in ("backsolve", "quadrature", "direct"):
        loose, tight = by[(name, 1e-3)], by[(name, 1e-7)]
        assert tight.error < 1e-6 and tight.error < loose.error / 100
        assert tight.fwd_nfe > loose.fwd_nfe > 0 and tight.wall_s > 0 and not tight.note
    backsolve, direct = by[("backsolve", 1e-7)], by[("direct", 1e-7)]
    assert backsolve.bwd_nfe > 0 and backsolve.cost == backsolve.fwd_nfe + backsolve.bwd_nfe + backsolve.bwd_vjp
    # Autograd through the solver: no f evaluation backwards, one VJP per forward evaluation.
    assert direct.bwd_nfe == 0 and direct.bwd_vjp == direct.fwd_nfe and direct.cost == 2 * direct.fwd_nfe
    assert all(len(r.walls) == 1 for r in rows)
    # By default a median of 3 timed runs, not one noisy run.
    assert build_parser().parse_args(["compare"]).repeats == 3


def test_contracting_problem_shows_backsolve_failing_and_direct_not():
    rows = compare(contracting_problem(), ["backsolve", "direct"], [1e-3], repeats=1)
    by = {r.method: r for r in rows}
    # Garbage is refused (SolveError, docs/gradient_trust.md); a merely degraded gradient warns.
    back = by["backsolve"]
    assert "failed: SolveError" in back.note or (back.error > 0.1 and "ReconstructionWarning" in back.note and back.warned), back.note
    assert by["direct"].error < 1e-3 and not by["direct"].warned
    (line,) = summary(rows)
    assert "fewest evaluations direct" in line and "not to be trusted here: backsolve" in line


def test_peak_memory_is_repeatable_and_sees_what_direct_keeps():
    """The same pass reads the same peak every time; autograd through the solver keeps
    every step's graph (its peak grows with the steps), backsolve does not."""
    setup, reference = linear_problem(), None
    reference = reference_gradient(setup)
    cpu = torch.device("cpu")
    peaks = {}
    for name in ("backsolve", "direct"):
        for tol in (1e-3, 1e-8):
            first, second = (measure(setup, name, tol, reference, dtype=torch.float64, device=cpu, repeats=1)
                             for _ in range(2))
            assert first.peak_mb == second.peak_mb > 0, (name, tol)
            peaks[name, tol] = first.peak_mb
    assert peaks["direct", 1e-8] > 2 * peaks["direct", 1e-3]
    assert peaks["backsolve", 1e-8] < 1.5 * peaks["backsolve", 1e-3]


def test_direct_reference_matches_the_analytic_one():
    setup = linear_problem()
    analytic = reference_gradient(setup)
    setup.reference = None
    by_solver = reference_gradient(setup)
    assert float((by_solver - analytic).norm() / analytic.norm()) < 1e-9


def test_user_problem_file(tmp_path):
    path = tmp_path / "problem.py"
    path.write_text(
        "import torch\n"
        "def make():\n"
        "    k = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)\n"
        "    return dict(func=lambda t, y: -k * y, y0=torch.ones(3, dtype=torch.float64),\n"
        "                t=torch.tensor([0.0, 1.0], dtype=torch.float64), params=[k])\n"
        "def bad():\n"
        "    return dict(func=None, y0=1)\n"
    )
    setup = load_problem(f"{path}:make")
    rows = compare(setup, ["quadrature"], [1e-6], repeats=1)
    assert rows[0].error < 1e-5
    with pytest.raises(CommandError, match="missing keys"):
        load_problem(f"{path}:bad")
    with pytest.raises(CommandError, match="no callable"):
        load_problem(f"{path}:nothing")
    with pytest.raises(CommandError, match="does not exist"):
        load_problem(f"{tmp_path}/absent.py:make")
    with pytest.raises(CommandError, match="unknown problem"):
        load_problem("circle")


def test_failures_are_rows_not_crashes():
    def blow_up(t, y):
        return y**3 * 100

    setup = Setup(blow_up, torch.ones(2, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64),
                  reference=lambda: (torch.ones(2, dtype=torch.float64),))
    (row,) = compare(setup, ["backsolve"], [1e-3], repeats=1)
    assert row.error is None and row.note.startswith("failed: SolveError")


def test_table():
    rows = [Row("backsolve", 1e-3, 1e-4, 20, 30, 30, 0.01, 1.5), Row("direct", 1e-3, None, note="failed: X")]
    text = table(rows).splitlines()
    assert text[0].split()[:3] == ["method", "tol", "grad"] and "failed: X" in text[-1] and "-" in text[-1]
    assert rows[0].cost == 80 and rows[1].cost is None


def test_command_line_writes_results(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["compare", "linear", "--methods", "backsolve,quadrature", "--tolerances", "1e-4", "--repeats", "2"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "quadrature" in printed and "grad rel. error" in printed and "median of 2" in printed
    out = tmp_path / "runs" / "compare" / "linear"  # one folder per problem: no run overwrites another's
    record = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in record["rows"]] == ["backsolve", "quadrature"]
    assert all(math.isfinite(r["error"]) and r["error"] < 1e-3 for r in record["rows"])
    assert (out / "results.csv").read_text().startswith("method,tol,error")
    assert (out / "compare.png").stat().st_size > 1000


def test_user_factory_errors_are_one_line(tmp_path, capsys):
    path = tmp_path / "mine.py"
    path.write_text("def needs(n):\n    return {}\ndef broken():\n    raise ValueError('no data here')\n")
    for factory, words in (("needs", ["needs(n)", "no arguments"]), ("broken", ["broken()", "ValueError", "no data here"])):
        assert main(["compare", f"{path}:{factory}", "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and str(path) in err and all(w in err for w in words), err
    (tmp_path / "bad.py").write_text("import nonexistent_module_xyz\n")
    assert main(["compare", f"{tmp_path / 'bad.py'}:f", "--out", str(tmp_path / "o")]) == 2
    assert "nonexistent_module_xyz" in capsys.readouterr().err
    assert main(["compare", "linear", "--out", str(path)]) == 2
    assert "--out" in capsys.readouterr().err
    assert default_folder(f"{path}:needs").endswith("compare/mine-needs")


@pytest.mark.parametrize(
    "argv, match",
    [
        (["compare", "linear", "--methods", "nope"], "unknown gradient method"),
        (["compare", "linear", "--tolernces", "1e-3"], "--tolerances"),
        (["compare", "linear", "--solver", "rk4"], "adaptive"),
        (["compare", "circle"], "unknown problem"),
    ],
)
def test_command_line_errors(argv, match, capsys, tmp_path):
    try:
        status = main(argv + ["--out", str(tmp_path)])
    except SystemExit as exc:  # argparse's own errors
        status = exc.code
    assert status == 2
    assert match in capsys.readouterr().err
