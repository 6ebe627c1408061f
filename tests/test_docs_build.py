"""The documentation site builds in strict mode: a broken link between pages, a missing
anchor or an API reference (``[name][torchadjoint.x]``, ``::: torchadjoint.x``) that does
not resolve fails the build, and so this test. Skipped where the docs extra is not
installed (``pip install -e ".[docs]"``; CI installs it)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("mkdocs", reason='the docs extra is not installed: pip install -e ".[docs]"')
pytest.importorskip("mkdocstrings", reason='the docs extra is not installed: pip install -e ".[docs]"')
pytest.importorskip("material", reason='the docs extra is not installed: pip install -e ".[docs]"')


def test_docs_build_strict(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    # The API pages read src/ (mkdocs.yml's paths); the CLI help hook imports it from there too.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src")] + [p for p in [env.get("PYTHONPATH")] if p])
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    # The API reference was rendered from the docstrings, and the CLI help was generated.
    api = (site / "api" / "solve" / "index.html").read_text(encoding="utf-8")
    assert "dy/dt = func(t, y)" in api  # from solve's docstring: the page's own text lacks it
    cli = (site / "cli" / "index.html").read_text(encoding="utf-8")
    assert "usage: torchadjoint train" in cli and "usage: torchadjoint compare" in cli
    assert "cli-help:" not in cli
