"""What ``fusedopt bench`` writes: the CSV's fields, the tables on stdout (every row of each
suite, and the byte floors), a PNG and a Markdown summary. One writer for every suite: a suite's
table has the columns its rows fill, headed with its names for the case and layout.
"""

from __future__ import annotations

from pathlib import Path

import fusedopt
from fusedopt.cli import common
from fusedopt.cli.bench_harness import IMPLS, SUITES, Context

# fmt: off
CSV_FIELDS = [
    "gpu", "torch", "triton", "cuda", "timestamp_utc",  # the environment, on every row
    "suite", "case", "impl", "layout", "dtype", "tensors", "numel", "bytes_per_elt", "bytes",
    "ms", "ms_p20", "ms_p80", "gbps", "copy_gbps", "pct_copy_bw", "fusedopt_speedup", "peak_extra_mib",
    "graph_ms", "graph_p20", "graph_p80", "graph_gbps", "graph_fusedopt_speedup", "graph_note",
    "impl_bytes_per_elt", "status", "note",
]
# fmt: on
ROW_COLUMNS: list[common.Column] = [
    ("case", "case", ""),
    ("layout", "layout", ""),
    ("dtype", "dtype", ""),
    ("impl", "impl", ""),
    ("ms", "ms", ".4f"),
    ("ms_p20", "p20", ".4f"),
    ("ms_p80", "p80", ".4f"),
    ("mb", "MB floor", ".1f"),
    ("impl_bytes_per_elt", "impl B/elt", "d"),
    ("gbps", "GB/s", ".0f"),
    ("pct_copy_bw", "% copy", ".1f"),
    ("fusedopt_speedup", "ours x", ".2f"),
    ("peak_extra_mib", "extra MiB", ".1f"),
    ("graph_ms", "graph ms", ".4f"),
    ("graph_fusedopt_speedup", "graph ours x", ".2f"),
    ("status", "status", ""),
    ("notes", "note", ""),
]
FLOOR_COLUMNS: list[common.Column] = [
    ("case", "case", ""),
    ("impl", "impl", ""),
    ("layout", "layout", ""),
    ("dtype", "dtype", ""),
    ("tensors", "tensors", "d"),
    ("numel", "elements", ","),
    ("bytes_per_elt", "B/elt", "d"),
    ("impl_bytes_per_elt", "impl B/elt", "d"),
    ("mb", "MB", ".1f"),
    ("passes", "passes: read -> written, once per element", ""),
]


def columns(suite: str, rows: list[dict], candidates: list[common.Column]) -> list[common.Column]:
    """The ``candidates`` some row fills, the case and layout headed with the suite's names."""
    names = dict(zip(("case", "layout"), SUITES[suite].HEADERS, strict=True))
    return [
        (k, names.get(k, h), f) for k, h, f in candidates if any(r.get(k) not in (None, "") for r in rows)
    ]


def ordered(rows: list[dict], suite: str) -> list[dict]:
    """A suite's rows grouped by (case, layout, dtype), implementations in their run order."""
    mine = [r for r in rows if r["suite"] == suite]
    first: dict[tuple, int] = {}
    for i, r in enumerate(mine):
        first.setdefault((r["dtype"], r["layout"], r["case"]), i)
    return sorted(mine, key=lambda r: (first[(r["dtype"], r["layout"], r["case"])], IMPLS.index(r["impl"])))


def headline(rows: list[dict], suite: str) -> tuple[list[dict], list[common.Column]]:
    """Per (case, layout, dtype): fusedopt's figures and its speed-up over each other path."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in ordered(rows, suite):
        groups.setdefault((r["case"], r["layout"], r["dtype"]), {})[r["impl"]] = r
    out = []
    for (case, layout, dtype), by_impl in groups.items():
        ours = by_impl.get("fusedopt", {})
        row = {"case": case, "layout": layout, "dtype": dtype}
        row.update({k: ours.get(k) for k in ("ms", "gbps", "pct_copy_bw", "graph_ms")})
        row.update({f"x_{i}": r.get("fusedopt_speedup") for i, r in by_impl.items() if i != "fusedopt"})
        out.append(row)
    candidates = [
        ("case", "", ""),
        ("layout", "", ""),
        ("dtype", "dtype", ""),
        ("ms", "fusedopt ms", ".4f"),
        ("gbps", "GB/s", ".0f"),
        ("pct_copy_bw", "% of copy", ".1f"),
        ("graph_ms", "graph ms", ".4f"),
    ]
    candidates += [(f"x_{i}", f"x vs {i.removeprefix('torch-')}", ".2f") for i in SUITES[suite].IMPLS[1:]]
    return out, columns(suite, out, candidates)


def report(rows: list[dict], args, ctx: Context, env: dict, copy_gbps: float | None, csv_path: Path) -> None:
    """Tables on stdout; the PNG and the Markdown summary next to the CSV."""
    suites = [s for s in SUITES if any(r["suite"] == s for r in rows)]
    if ctx.timed:
        print(
            "ours x = the row's ms / fusedopt's ms (above 1: fusedopt is faster); % copy = GB/s / copy GB/s"
        )
        print(
            "MB floor: the bytes the row must move at least, the same for every implementation of a group\n"
        )
    for suite in suites:
        table = ordered(rows, suite)
        print(f"{SUITES[suite].TITLE}:")
        print(common.table_text(table, columns(suite, table, ROW_COLUMNS)) + "\n")
    floors = []
    for suite in (s for s in SUITES if s in args.suites):
        if floor := SUITES[suite].floor_rows(args):
            for r in floor:
                r["mb"] = r["bytes"] / 1e6
            floors.append((SUITES[suite].FLOOR_TITLE, floor, columns(suite, floor, FLOOR_COLUMNS)))
    if not ctx.timed:
        for title, floor, cols in floors:
            print(title + ":")
            print(common.table_text(floor, cols) + "\n")

    png = csv_path.with_suffix(".png")
    problem = plot(png, rows, floors, ctx, env, copy_gbps)
    md = csv_path.with_suffix(".md")
    md.write_text(markdown(rows, suites, floors, ctx, env, copy_gbps, csv_path, png if not problem else None))
    print(f"CSV: {csv_path}")
    print(f"PNG: {png}" if not problem else f"PNG: not written ({problem})")
    print(f"summary: {md}")


def markdown(rows, suites, floors, ctx, env, copy_gbps, csv_path: Path, png: Path | None) -> str:
    lines = [f"# fusedopt bench: {env['gpu']}", ""]
    lines.append(
        f"{env['timestamp_utc']}; fusedopt {fusedopt.__version__}, torch {env['torch']}, triton {env['triton']}"
        + (f", CUDA {env['cuda']}" if env["cuda"] else "")
    )
    lines.append("")
    if not ctx.timed:
        lines += ["**Smoke run: no device timings** (no CUDA GPU, or `--smoke`).", ""]
    else:
        lines += [
            f"Device-to-device copy: {copy_gbps:.0f} GB/s (read + write), the 100 % of `% of copy`.",
            "",
        ]
    lines.append(f"Files: `{csv_path.name}`" + (f", `{png.name}`" if png else ""))
    lines.append("")
    for suite in suites:
        table = ordered(rows, suite)
        if any(r.get("ms") for r in table):
            lines += [
                f"## {suite}: fusedopt and its speed-up over each other path (row ms / fusedopt ms)",
                "",
            ]
            lines += [common.table_text(*headline(rows, suite), markdown=True), ""]
        lines += [f"## {SUITES[suite].TITLE}", ""]
        lines += [common.table_text(table, columns(suite, table, ROW_COLUMNS), markdown=True), ""]
    for title, floor, cols in floors:
        lines += [f"## {title}", "", common.table_text(floor, cols, markdown=True), ""]
    return "\n".join(lines)


def plot(path: Path, rows, floors, ctx: Context, env: dict, copy_gbps: float | None) -> str | None:
    """Per suite, GB/s per implementation (host: ms); without device timings, the byte floors too.

    Returns why no PNG was written, or None. Uses matplotlib's object API (Agg), so the
    process's pyplot backend is left alone.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed"
    panels = []
    for suite in SUITES:
        table = ordered(rows, suite)
        key = next((k for k in ("gbps", "ms") if any(r.get(k) for r in table)), None)
        if key is None:
            continue
        groups = list(dict.fromkeys(_group_label(r) for r in table))
        series: dict[str, list[float | None]] = {}
        for prefix, suffix in (("", ""), ("graph_", " (CUDA graph)")):
            for r in table:
                if r.get(prefix + key):
                    values = series.setdefault(r["impl"] + suffix, [None] * len(groups))
                    values[groups.index(_group_label(r))] = r[prefix + key]
        what = "GB/s from the byte floor (higher is better)" if key == "gbps" else "ms (lower is better)"
        panels.append((f"{suite}: {what}, {env['gpu']}", key.replace("gbps", "GB/s"), groups, series, key))
    if not ctx.timed:
        for title, floor, _ in floors:
            groups = [_group_label(r) + (f" {r['impl']}" if r.get("impl") else "") for r in floor]
            series = {"byte floor": [r["bytes"] / 1e6 for r in floor]}
            if any(r.get("impl_bytes_per_elt") for r in floor):
                series["the implementation's passes"] = [
                    r["impl_bytes_per_elt"] * r["numel"] / 1e6 for r in floor
                ]
            panels.append(("smoke run, nothing timed: " + title.split(" (")[0], "MB", groups, series, None))
    if not panels:
        return "no rows to plot"
    bars = max(len(p[2]) * max(len(p[3]), 1) for p in panels)
    fig = Figure(figsize=(min(24.0, max(8.0, 0.25 * bars)), 4.8 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (title, ylabel, groups, series, key) in zip(axes, panels, strict=True):
        n = max(len(series), 1)
        bar = 0.8 / n
        for i, (label, values) in enumerate(series.items()):
            xs = [g + (i - (n - 1) / 2) * bar for g in range(len(groups))]
            points = [(x, v) for x, v in zip(xs, values, strict=True) if v is not None]
            ax.bar([x for x, _ in points], [v for _, v in points], bar, label=label)
        if key == "gbps" and copy_gbps:
            ax.axhline(copy_gbps, linestyle="--", color="gray", label="device-to-device copy")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    return None


def _group_label(r: dict) -> str:
    name = r["case"].split("(")[0].removeprefix("Fused")
    return f"{name} {r['layout']} {r['dtype']}"
