"""What ``fusedopt bench`` writes: the CSV's fields, the tables on stdout (every row of each
suite, and the byte floors), a PNG of GB/s per implementation and a Markdown summary.
"""

from __future__ import annotations

from pathlib import Path

import fusedopt
from fusedopt.cli import bench_losses, bench_optim, common
from fusedopt.cli.bench_harness import IMPLS, SUITES, Context

SUITE_TITLES = {"optim": "optimizer step, every row", "losses": "loss forward + backward, every row"}

CSV_FIELDS = [
    "gpu",
    "torch",
    "triton",
    "cuda",
    "timestamp_utc",
    "suite",
    "case",
    "impl",
    "layout",
    "dtype",
    "tensors",
    "numel",
    "bytes_per_elt",
    "bytes",
    "ms",
    "ms_p20",
    "ms_p80",
    "gbps",
    "copy_gbps",
    "pct_copy_bw",
    "fusedopt_speedup",
    "peak_extra_mib",
    "graph_ms",
    "graph_p20",
    "graph_p80",
    "graph_gbps",
    "graph_fusedopt_speedup",
    "graph_note",
    "impl_bytes_per_elt",
    "status",
    "note",
]
OPTIM_COLUMNS = [
    ("case", "optimizer", ""),
    ("layout", "layout", ""),
    ("dtype", "dtype", ""),
    ("impl", "impl", ""),
    ("ms", "ms", ".4f"),
    ("ms_p20", "p20", ".4f"),
    ("ms_p80", "p80", ".4f"),
    ("mb", "MB moved", ".1f"),
    ("gbps", "GB/s", ".0f"),
    ("pct_copy_bw", "% copy", ".1f"),
    ("fusedopt_speedup", "ours x", ".2f"),
    ("peak_extra_mib", "extra MiB", ".1f"),
    ("graph_ms", "graph ms", ".4f"),
    ("graph_fusedopt_speedup", "graph ours x", ".2f"),
    ("status", "status", ""),
    ("notes", "note", ""),
]
LOSS_COLUMNS = [
    ("case", "loss", ""),
    ("layout", "shape", ""),
    ("dtype", "dtype", ""),
    ("impl", "impl", ""),
    ("ms", "ms", ".4f"),
    ("ms_p20", "p20", ".4f"),
    ("ms_p80", "p80", ".4f"),
    ("mb", "MB floor", ".1f"),
    ("gbps", "GB/s", ".0f"),
    ("pct_copy_bw", "% copy", ".1f"),
    ("fusedopt_speedup", "ours x", ".2f"),
    ("peak_extra_mib", "extra MiB", ".1f"),
    ("status", "status", ""),
    ("notes", "note", ""),
]


TIMING_KEYS = {"ms", "ms_p20", "ms_p80", "gbps", "pct_copy_bw", "fusedopt_speedup", "peak_extra_mib"}
TIMING_KEYS |= {"graph_ms", "graph_fusedopt_speedup"}


def row_columns(suite: str, timed: bool) -> list[common.Column]:
    """The table columns of a suite; without timings, those that would only hold '-' are left out."""
    columns = OPTIM_COLUMNS if suite == "optim" else LOSS_COLUMNS
    return columns if timed else [c for c in columns if c[0] not in TIMING_KEYS]


def ordered(rows: list[dict], suite: str) -> list[dict]:
    """A suite's rows grouped by (case, layout, dtype), implementations in their run order."""
    mine = [r for r in rows if r["suite"] == suite]
    first: dict[tuple, int] = {}
    for i, r in enumerate(mine):
        first.setdefault((r["dtype"], r["layout"], r["case"]), i)
    return sorted(mine, key=lambda r: (first[(r["dtype"], r["layout"], r["case"])], IMPLS.index(r["impl"])))


def headline(rows: list[dict], suite: str) -> list[dict]:
    """Per (case, layout, dtype): fusedopt's figures and its speed-up over each torch path."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in ordered(rows, suite):
        groups.setdefault((r["case"], r["layout"], r["dtype"]), {})[r["impl"]] = r
    out = []
    for (case, layout, dtype), by_impl in groups.items():
        ours = by_impl.get("fusedopt", {})
        row = {
            "case": case,
            "layout": layout,
            "dtype": dtype,
            "ms": ours.get("ms"),
            "gbps": ours.get("gbps"),
            "pct_copy_bw": ours.get("pct_copy_bw"),
            "graph_ms": ours.get("graph_ms"),
        }
        for impl, r in by_impl.items():
            row[f"x_{impl}"] = r.get("fusedopt_speedup") if impl != "fusedopt" else None
        out.append(row)
    return out


def headline_columns(suite: str) -> list[tuple[str, str, str]]:
    impls = bench_optim.IMPLS if suite == "optim" else bench_losses.IMPLS
    columns = [
        ("case", "optimizer" if suite == "optim" else "loss", ""),
        ("layout", "layout" if suite == "optim" else "shape", ""),
        ("dtype", "dtype", ""),
        ("ms", "fusedopt ms", ".4f"),
        ("gbps", "GB/s", ".0f"),
        ("pct_copy_bw", "% of copy", ".1f"),
    ]
    if suite == "optim":
        columns.append(("graph_ms", "graph ms", ".4f"))
    return columns + [(f"x_{i}", f"x vs {i.removeprefix('torch-')}", ".2f") for i in impls[1:]]


def report(rows: list[dict], args, ctx: Context, env: dict, copy_gbps: float | None, csv_path: Path) -> None:
    """Tables on stdout; the PNG and the Markdown summary next to the CSV."""
    suites = [s for s in SUITES if any(r["suite"] == s for r in rows)]
    sections = []
    for suite in suites:
        sections.append((SUITE_TITLES[suite], ordered(rows, suite), row_columns(suite, ctx.timed)))
    if ctx.timed:
        print(
            "ours x = the row's ms / fusedopt's ms (above 1: fusedopt is faster); % copy = GB/s / copy GB/s"
        )
        print("MB moved / MB floor: the byte floor, the same for every implementation of a row's group\n")
    for title, table_rows, columns in sections:
        print(f"{title}:")
        print(common.table_text(table_rows, columns) + "\n")
    floors = []
    if "optim" in args.suites:
        floor = bench_optim.byte_floor_rows(args.optimizers, args.layouts, args.dtypes)
        floors.append(
            (
                "byte floor of one optimizer step (read p, g, state; write p, state)",
                floor,
                bench_optim.BYTE_FLOOR_COLUMNS,
            )
        )
    if "losses" in args.suites:
        floor = bench_losses.byte_floor_rows(args.losses, args.dtypes)
        floors.append(
            (
                "byte floor of loss forward + backward (mean: read x; pointwise: read x, y, write dx; cross-entropy: read z, write dz)",
                floor,
                bench_losses.BYTE_FLOOR_COLUMNS,
            )
        )
    if not ctx.timed:
        for title, floor, columns in floors:
            print(title + ":")
            print(common.table_text(floor, columns) + "\n")

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
        lines += ["**Smoke run: nothing was timed** (no CUDA GPU, or `--smoke`).", ""]
    else:
        lines += [
            f"Device-to-device copy: {copy_gbps:.0f} GB/s (read + write), the 100 % of `% of copy`.",
            "",
        ]
    lines.append(f"Files: `{csv_path.name}`" + (f", `{png.name}`" if png else ""))
    lines.append("")
    for suite in suites:
        if ctx.timed:
            lines += [
                f"## {suite}: fusedopt and its speed-up over each torch path (row ms / fusedopt ms)",
                "",
            ]
            lines += [common.table_text(headline(rows, suite), headline_columns(suite), markdown=True), ""]
        columns = row_columns(suite, ctx.timed)
        lines += [f"## {SUITE_TITLES[suite]}", ""]
        lines += [common.table_text(ordered(rows, suite), columns, markdown=True), ""]
    for title, floor, columns in floors:
        lines += [f"## {title}", "", common.table_text(floor, columns, markdown=True), ""]
    return "\n".join(lines)


def plot(path: Path, rows, floors, ctx: Context, env: dict, copy_gbps: float | None) -> str | None:
    """GB/s per implementation (one panel per suite); a smoke run plots the byte floors instead.

    Returns why no PNG was written, or None. Uses matplotlib's object API (Agg), so the
    process's pyplot backend is left alone.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed"
    panels = []
    if ctx.timed:
        for suite in SUITES:
            table = ordered(rows, suite)
            if not table:
                continue
            groups = list(dict.fromkeys(_group_label(r) for r in table))
            series: dict[str, list[float | None]] = {}
            for prefix, suffix in (("", ""), ("graph_", " (CUDA graph)")):
                for r in table:
                    if r.get(f"{prefix}gbps"):
                        values = series.setdefault(r["impl"] + suffix, [None] * len(groups))
                        values[groups.index(_group_label(r))] = r[f"{prefix}gbps"]
            title = f"{suite}: GB/s from the byte floor (higher is better), {env['gpu']}"
            panels.append((title, "GB/s", groups, series, copy_gbps))
    else:
        for title, floor, _ in floors:
            groups = [_group_label(r) for r in floor]
            series = {"byte floor": [r["bytes"] / 1e6 for r in floor]}
            panels.append(("smoke run, nothing timed: " + title.split(" (")[0], "MB", groups, series, None))
    if not panels:
        return "no rows to plot"
    bars = max(len(p[2]) * max(len(p[3]), 1) for p in panels)
    fig = Figure(figsize=(min(24.0, max(8.0, 0.25 * bars)), 4.8 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (title, ylabel, groups, series, hline) in zip(axes, panels, strict=True):
        n = max(len(series), 1)
        bar = 0.8 / n
        for i, (label, values) in enumerate(series.items()):
            xs = [g + (i - (n - 1) / 2) * bar for g in range(len(groups))]
            points = [(x, v) for x, v in zip(xs, values, strict=True) if v is not None]
            ax.bar([x for x, _ in points], [v for _, v in points], bar, label=label)
        if hline:
            ax.axhline(hline, linestyle="--", color="gray", label="device-to-device copy")
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
