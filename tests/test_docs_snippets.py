"""Every ```python block of the README and of docs/ runs, so a snippet that does not work
cannot land.

The blocks of one page run in order in one namespace (a tutorial builds on its earlier
blocks), in a fresh temporary working directory, with warnings turned into errors (a
snippet that warns shows the reader a warning it does not explain); a snippet that means
to show a warning catches it. Torch runs on one thread here. A block that is deliberately not runnable is preceded
by the line ``<!-- no-run: REASON -->``; the reason is required. A block whose fence names
a file, ```` ```python title="my_problem.py" ````, is also written to that file (later blocks
of the page may import it or pass it to the command line). A page of another's
making whose blocks assume names defined elsewhere gets them from ``PAGE_SETUP`` below.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import List, NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))

FENCE = re.compile(r"^(?P<indent> *)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.S | re.M)
TITLE = re.compile(r'title="(?P<title>[^"]+)"')
NO_RUN = re.compile(r"<!-- no-run: *(?P<reason>.*?) *-->\s*$")

# Names a page's blocks use without defining them (pages whose text shows calls on the
# reader's own func, y0, t). Keyed by path relative to the repository root.
PAGE_SETUP = {
    "docs/migration.md": """
import torch
import torchadjoint

class _Field(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)

    def forward(self, t, y):
        return self.lin(y)

func = _Field()
y0 = torch.randn(3, 2)
t = torch.linspace(0.0, 1.0, 4)
""",
}


class Block(NamedTuple):
    page: Path
    line: int  # 1-based line of the opening fence
    code: str
    skip_reason: str  # "" when the block runs
    title: str  # the file name a ```python title="NAME" block is written to, else ""


def python_blocks(page: Path) -> List[Block]:
    """The ```python blocks of a markdown page, with their no-run markers."""
    text = page.read_text(encoding="utf-8")
    blocks = []
    for match in FENCE.finditer(text):
        if match.group("info").strip().split(" ")[0] not in ("python", "py"):
            continue
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = NO_RUN.search(before)
        indent = len(match.group("indent"))
        code = "\n".join(x[indent:] for x in match.group("body").splitlines())
        title = TITLE.search(match.group("info"))
        blocks.append(Block(page, line, code, marker.group("reason") if marker else "", title.group("title") if title else ""))
    return blocks


def _pages_with_python():
    return [p for p in PAGES if python_blocks(p)]


def test_the_pages_hold_python_blocks():
    """The extraction finds the snippets (a broken pattern would make every test vacuous)."""
    names = {p.relative_to(ROOT).as_posix() for p in _pages_with_python()}
    assert {"README.md", "docs/index.md", "docs/tutorials/own-model.md"} <= names


def test_no_run_markers_give_a_reason_and_are_rare():
    blocks = [b for p in PAGES for b in python_blocks(p)]
    skipped = [b for b in blocks if b.skip_reason]
    text = "\n".join((ROOT / p).read_text(encoding="utf-8") for p in PAGES)
    assert text.count("<!-- no-run:") == len(skipped), "a no-run marker that does not stand right before a python block"
    assert all(b.skip_reason.strip() for b in skipped)
    assert len(skipped) <= max(1, len(blocks) // 10), f"too many blocks marked no-run: {[(b.page.name, b.line) for b in skipped]}"


@pytest.mark.parametrize("page", _pages_with_python(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_blocks_run(page: Path, tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    threads = torch.get_num_threads()
    # One thread: the snippets are tiny, and threads only contend on a loaded machine.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    namespace = {"__name__": "__docs_snippet__"}
    setup = PAGE_SETUP.get(page.relative_to(ROOT).as_posix())
    if setup:
        exec(compile(setup, f"PAGE_SETUP[{page.name}]", "exec"), namespace)
    try:
        for block in python_blocks(page):
            if block.skip_reason:
                continue
            where = f"{page.relative_to(ROOT)}:{block.line}"
            if block.title:
                (tmp_path / block.title).write_text(block.code + "\n", encoding="utf-8")
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                # Third-party deprecations are not the snippet's doing.
                warnings.filterwarnings("default", category=DeprecationWarning)
                try:
                    exec(compile(block.code, where, "exec"), namespace)
                except Exception as exc:
                    raise AssertionError(f"the python block at {where} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        torch.set_num_threads(threads)
