"""Turn benchmark results into docs/benchmarks.md and PNG plots.

A benchmark's ``run(quick) -> dict`` is rendered as follows (every key optional):

- ``title`` (heading), ``notes`` (a markdown paragraph under it), ``markdown`` (printed as is);
- ``sections``: a list of ``{"title", "columns", "rows"}`` tables (``rows`` are lists of
  cells; floats are printed with 3 significant figures, ``None`` as "—");
- ``plots``: a list of plot specifications ``{"file", "title", "xlabel", "ylabel",
  "kind": "line" | "bar", "logx", "logy", "series": {label: [xs, ys]}}`` (for ``"bar"``:
  ``"series": {label: value}``), drawn here with matplotlib into the image folder;
- ``headline``: ``{description: number}`` pairs, listed and collected for the summary;
- ``metrics``: raw numbers for the driver (not rendered).

Anything else in the dict (as other benchmarks return it) is rendered as nested
key/value tables, so no result is dropped.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Any, Iterable, List, Optional, Sequence

RENDERED_KEYS = {"name", "title", "notes", "markdown", "sections", "plots", "headline", "device", "skipped", "metrics",
                 "elapsed_s"}


def fmt(x: Any) -> str:
    """A table cell: ints as is, floats with about 3 significant figures, None as a dash."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, numbers.Integral):
        return str(int(x))
    if isinstance(x, numbers.Real):
        x = float(x)
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        if x == int(x) and abs(x) < 1e6:
            return str(int(x))
        if abs(x) >= 100:
            return f"{x:.0f}"
        if abs(x) >= 1e-3:
            return f"{x:.3g}"
        return f"{x:.2e}"
    text = str(x)
    return text.replace("|", "\\|").replace("\n", " ")


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(fmt(c) for c in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = list(row) + [None] * (len(columns) - len(row))
        lines.append("| " + " | ".join(fmt(c) for c in cells) + " |")
    return "\n".join(lines)


def print_sections(result: dict) -> None:
    """Print a benchmark's ``result["sections"]`` (title, optional notes, columns, rows) as
    plain text, for running one benchmark module on its own."""
    for section in result["sections"]:
        print(f"\n## {section['title']}")
        if section.get("notes"):
            print(section["notes"])
        print(" | ".join(str(c) for c in section["columns"]))
        for row in section["rows"]:
            print(" | ".join(fmt(x) for x in row))


def _is_scalar(x: Any) -> bool:
    return x is None or isinstance(x, (numbers.Number, str, bool))


def generic(value: Any, title: str = "", depth: int = 0) -> List[str]:
    """Render any nested result (dicts of scalars, dicts of dicts, lists of dicts) as tables."""
    out: List[str] = []
    if isinstance(value, dict):
        scalars = {k: v for k, v in value.items() if _is_scalar(v)}
        nested = {k: v for k, v in value.items() if not _is_scalar(v)}
        # A dict of same-keyed dicts of scalars is one table (rows = outer keys).
        if nested and not scalars and all(isinstance(v, dict) and all(_is_scalar(x) for x in v.values()) for v in nested.values()):
            columns: List[str] = []
            for v in nested.values():
                columns += [k for k in v if k not in columns]
            if title:
                out.append(f"**{title}**\n")
            out.append(table([""] + columns, [[k] + [v.get(c) for c in columns] for k, v in nested.items()]))
            out.append("")
            return out
        if scalars:
            if title:
                out.append(f"**{title}**\n")
            out.append(table(["quantity", "value"], list(scalars.items())))
            out.append("")
        for k, v in nested.items():
            out += generic(v, f"{title} / {k}" if title else str(k), depth + 1)
    elif isinstance(value, (list, tuple)):
        if value and all(isinstance(v, dict) and all(_is_scalar(x) for x in v.values()) for v in value):
            columns = []
            for v in value:
                columns += [k for k in v if k not in columns]
            if title:
                out.append(f"**{title}**\n")
            out.append(table(columns, [[v.get(c) for c in columns] for v in value]))
            out.append("")
        elif value and all(_is_scalar(v) for v in value):
            out.append(f"**{title}**: " + ", ".join(fmt(v) for v in value) + "\n")
        else:
            for i, v in enumerate(value):
                out += generic(v, f"{title}[{i}]", depth + 1)
    else:
        out.append(f"**{title}**: {fmt(value)}\n")
    return out


def draw(plot: dict, image_dir: str) -> Optional[str]:
    """Draw one plot specification into ``image_dir``; returns the file path (None if
    matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    os.makedirs(image_dir, exist_ok=True)
    path = os.path.join(image_dir, plot["file"])
    fig, ax = plt.subplots(figsize=plot.get("size", (6.4, 4.0)), dpi=110)
    kind = plot.get("kind", "line")
    series = plot["series"]
    if kind == "bar":
        labels = list(series)
        values = [series[k] for k in labels]
        colors = [("#1f77b4" if "torchadjoint" in k else "#aaaaaa") for k in labels]
        ax.barh(range(len(labels)), values, color=colors)
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels, fontsize=8)
        ax.invert_yaxis()
        for i, v in enumerate(values):
            ax.text(v, i, " " + fmt(v), va="center", fontsize=7)
        if plot.get("logx"):
            ax.set_xscale("log")
    else:
        markers = "osD^v<>ph*"
        for i, (label, (xs, ys)) in enumerate(series.items()):
            style = "-" if "torchadjoint" in label else "--"
            ax.plot(xs, ys, style, marker=markers[i % len(markers)], label=label, markersize=4)
        if plot.get("logx"):
            ax.set_xscale("log")
        if plot.get("logy"):
            ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    ax.set_title(plot.get("title", ""), fontsize=9)
    ax.set_xlabel(plot.get("xlabel", ""))
    ax.set_ylabel(plot.get("ylabel", ""))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def render(result: dict, image_dir: str, doc_dir: str) -> str:
    """Markdown for one benchmark's result (plots drawn as a side effect)."""
    lines: List[str] = [f"## {result.get('title', result.get('name', 'Benchmark'))}", ""]
    if result.get("skipped"):
        return "\n".join(lines + [f"Not measured: {result['skipped']}", ""])
    if result.get("notes"):
        lines += [result["notes"], ""]
    if result.get("markdown"):
        lines += [result["markdown"], ""]
    for section in result.get("sections", []):
        if section.get("title"):
            lines += [f"### {section['title']}", ""]
        if section.get("notes"):
            lines += [section["notes"], ""]
        lines += [table(section["columns"], section["rows"]), ""]
    for plot in result.get("plots", []):
        path = draw(plot, image_dir)
        if path is not None:
            rel = os.path.relpath(path, doc_dir)
            lines += [f"![{plot.get('title', plot['file'])}]({rel})", ""]
    if result.get("headline"):
        lines += ["Headline figures:", ""]
        lines += [table(["measurement", "value"], list(result["headline"].items())), ""]
    rest = {k: v for k, v in result.items() if k not in RENDERED_KEYS}
    if rest:
        lines += generic(rest)
    if result.get("elapsed_s") is not None:
        lines += [f"*(this benchmark ran for {result['elapsed_s']:.0f} s)*", ""]
    return "\n".join(lines)


def document(results: List[dict], *, machine: str, command: str, quick: bool, device: str,
             targets: Optional[List[List[Any]]] = None, elapsed_s: Optional[float] = None, cpu_s: Optional[float] = None,
             image_dir: str = "docs/img", doc_path: str = "docs/benchmarks.md", preamble: str = "") -> str:
    """The whole docs/benchmarks.md."""
    doc_dir = os.path.dirname(os.path.abspath(doc_path))
    image_dir = os.path.abspath(image_dir)
    head = [
        "# Benchmarks",
        "",
        "Every number on this page was produced by one run of the committed program",
        "",
        f"```bash\n{command}\n```",
        "",
        f"on: {machine}; device: {device}" + (f"; total run time {elapsed_s / 60:.1f} min" if elapsed_s else "")
        + (f" ({cpu_s / 60:.1f} min of CPU time)" if cpu_s else "") + ".",
        "",
    ]
    if quick:
        head += ["**Quick mode** (smaller problems, single runs): these numbers check that the program works; "
                 "they are not the reported benchmark.", ""]
    head += [
        "torchadjoint and its peers (torchdiffeq, torchode) solve the same problems with the same method "
        "(dopri5), tolerances, dtype, device and thread count; runs alternate between libraries and medians "
        "are reported. Ratios are ours / theirs, measured in the same run: below 1 means torchadjoint is "
        "cheaper. nfe counts calls of the vector field f (a batched call counts once).",
        "",
    ]
    if preamble:
        head += [preamble, ""]
    if targets:
        head += ["## Targets", "", table(["target", "measured by", "value", "goal", "met"], targets), ""]
        missed = sorted({row[0] for row in targets if row[-1] is False})
        if missed:
            floors = [fmt(value) for r in results
                      for key, value in (r.get("headline") or {}).items() if "bare loop (floor)" in key]
            floor = (" The same evaluations in a bare dopri5 loop with no solver logic (fixed steps, no error "
                     "control, checks or bookkeeping; the backsolve section) measure " + ", ".join(floors) +
                     " × ideal in the same run: the floor of an eager PyTorch loop on this machine.") if floors else ""
            head += ["Not met: " + "; ".join(missed) + ". What stands in the way is measured below: the "
                     "`× ideal cost` columns (wall time over the cost of the run's own calls of f and VJPs) and "
                     "the cProfile sections of problem 2, which split each pass into f, VJPs and the solver's "
                     "own work." + floor, ""]
    body = [render(r, image_dir, doc_dir) for r in results]
    return "\n".join(head + body).rstrip() + "\n"
