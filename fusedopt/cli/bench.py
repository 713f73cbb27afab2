"""``python -m fusedopt bench``: fused optimizer steps and losses against torch, timed on CUDA.

Suites: ``optim`` (``fusedopt.cli.bench_optim``): one step of FusedAdam, FusedAdamW and
FusedSGD(momentum=0.9) against torch's for-loop, foreach, fused and torch.compile'd steps on
three layouts, plus a CUDA-graph replay figure for the small-tensor layout; ``losses``
(``fusedopt.cli.bench_losses``): forward + backward of the fused losses against eager torch and
torch.compile.

Every row: median ms with 20th/80th percentiles (triton.testing.do_bench, L2 flushed), the
bytes the step must move at least (a written-out formula), the GB/s that implies, its share of a
device-to-device copy measured in the same run, fusedopt's speed-up over the row
(row ms / fusedopt ms) and the peak memory above what was allocated before. Output: a table on
stdout, and in --out a CSV (GPU name, torch/triton/CUDA versions, UTC timestamp on every row), a
PNG of GB/s per implementation and a Markdown summary.

Without CUDA nothing is timed: timings need a CUDA GPU (interpreter timings are not
performance). The command then runs the smoke version (every code path once, on tiny inputs),
prints the byte-floor table, and still writes the CSV (rows without timings), PNG and summary.
"""

from __future__ import annotations

import argparse
import functools
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

import fusedopt
from fusedopt.cli import bench_losses, bench_optim, common

SUITES = ("optim", "losses")
SUITE_TITLES = {"optim": "optimizer step, every row", "losses": "loss forward + backward, every row"}
IMPLS = ("fusedopt", "torch-forloop", "torch-foreach", "torch-fused", "torch-eager", "torch-compile")
assert set(IMPLS) == set(bench_optim.IMPLS + bench_losses.IMPLS)
COPY_NUMEL = 256 * 2**20  # fp32 elements of the device-to-device copy reference (1 GiB)

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


@dataclass
class Context:
    """How rows are measured in this run."""

    device: str
    timed: bool  # CUDA and not --smoke
    warmup: int
    rep: int
    compile_backend: str
    graph_layouts: tuple[str, ...]

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def measure(self, fn, memory: bool = True) -> dict:
        """Timing (median, p20, p80) and peak extra memory of ``fn``; a smoke run only calls it."""
        if not self.timed:
            fn()
            return {}
        t = common.do_bench(fn, self.warmup, self.rep)
        out = {"ms": t.ms, "ms_p20": t.p20, "ms_p80": t.p80}
        if memory:
            out["peak_extra_mib"] = common.peak_extra_mib(fn)
        return out

    def release(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


def copy_bandwidth(numel: int, ctx: Context) -> tuple[common.Timing, float]:
    """Device-to-device copy of ``numel`` fp32 elements: its timing and GB/s (read + write bytes)."""
    src = torch.randn(numel, device="cuda")
    dst = torch.empty_like(src)
    timing = common.do_bench(functools.partial(dst.copy_, src), ctx.warmup, ctx.rep)
    del src, dst
    ctx.release()
    return timing, 2 * numel * 4 / (timing.ms * 1e-3) / 1e9


def add_arguments(parser: argparse.ArgumentParser) -> None:
    def choice(flag: str, choices, default, what: str, nargs: str = "+") -> None:
        parser.add_argument(
            flag,
            nargs=nargs,
            choices=list(choices),
            default=list(default),
            metavar="NAME",
            help=f"{what}; from: {', '.join(choices)} (default: {' '.join(default) or 'none'})",
        )

    choice("--suites", SUITES, SUITES, "what to run: optimizer steps and/or loss forward + backward")
    choice("--optimizers", bench_optim.OPTIMIZERS, bench_optim.OPTIMIZERS, "optimizers (sgd: momentum=0.9)")
    choice(
        "--layouts", bench_optim.LAYOUTS, bench_optim.LAYOUTS, f"param layouts ({bench_optim.LAYOUT_HELP})"
    )
    choice(
        "--graph-layouts",
        bench_optim.LAYOUTS,
        bench_optim.GRAPH_LAYOUTS,
        "layouts that also get the CUDA-graph replay figure (none: no graphs)",
        nargs="*",
    )
    choice("--losses", bench_losses.LOSSES, bench_losses.LOSSES, "loss cases, <loss>-<shape>")
    choice("--dtypes", common.DTYPES, ["fp32", "bf16"], "param and input dtypes")
    choice("--impls", IMPLS, IMPLS, "implementations; each suite takes those it has")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny inputs, every code path once, nothing timed (implied without CUDA)",
    )
    parser.add_argument(
        "--out",
        default="fusedopt-bench",
        metavar="DIR",
        help="folder of bench_<UTC time>.csv, .png and .md (default: %(default)s)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=25,
        metavar="MS",
        help="do_bench warm-up time, ms (default: %(default)s)",
    )
    parser.add_argument(
        "--rep",
        type=int,
        default=100,
        metavar="MS",
        help="do_bench repetition time, ms (default: %(default)s)",
    )
    parser.add_argument(
        "--copy-numel",
        type=int,
        default=COPY_NUMEL,
        metavar="N",
        help="fp32 elements of the device-to-device copy, the %% of copy reference (default: %(default)s)",
    )
    parser.add_argument(
        "--compile-backend",
        metavar="NAME",
        help="torch.compile backend of the torch-compile rows (default: inductor with CUDA; eager "
        "without, where only the smoke run compiles and inductor's C++ build would take minutes)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        metavar="SECONDS",
        help="rows not started within this time are written as skipped (compiled rows run last)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def timing_enabled(device: str, smoke: bool) -> bool:
    """Rows are timed on CUDA only, and not in a smoke run."""
    return device == "cuda" and not smoke


def run(args: argparse.Namespace) -> int:
    """The benchmark (or, without CUDA or with --smoke, the smoke run); 1 if a fusedopt row failed."""
    device = common.default_device()
    tiny = args.smoke or device != "cuda"  # smoke-sized inputs
    ctx = Context(
        device=device,
        timed=timing_enabled(device, args.smoke),
        warmup=args.warmup,
        rep=args.rep,
        compile_backend=args.compile_backend or ("inductor" if device == "cuda" else "eager"),
        # a smoke run on CUDA captures its one tiny layout; CUDA graphs need CUDA
        graph_layouts=()
        if device != "cuda"
        else ("smoke",)
        if tiny and args.graph_layouts
        else tuple(args.graph_layouts),
    )
    env = common.environment()
    print(
        f"fusedopt {fusedopt.__version__} bench: torch {env['torch']}, triton {env['triton']}, {env['timestamp_utc']}"
    )
    where = env["gpu"] + (f" (CUDA {env['cuda']})" if env["cuda"] else " (no CUDA GPU)")
    print(f"device: {where}: fusedopt runs {common.kernel_path(device)}")
    if warning := common.interpreter_warning():
        print(warning + " Timings mean nothing.")
    if device != "cuda":
        print(
            "Timings need a CUDA GPU: nothing is timed here (interpreter timings are not performance).\n"
            "Smoke run instead: every implementation runs once on tiny inputs, so the code paths are "
            "tested; the CSV rows have no timings."
        )
    elif args.smoke:
        print("--smoke: every implementation runs once on tiny inputs; nothing is timed.")
    print(f"torch-compile rows: torch.compile(backend={ctx.compile_backend!r})")
    if device != "cuda" and args.graph_layouts:
        print("CUDA-graph replay figure: needs CUDA, not run")

    copy_gbps = None
    stamp = env["timestamp_utc"].replace("-", "").replace(":", "")
    out = Path(args.out)
    log = common.CsvLog(out / f"bench_{stamp}.csv", CSV_FIELDS)
    if ctx.timed:
        copy, copy_gbps = copy_bandwidth(args.copy_numel, ctx)
        print(
            f"device-to-device copy, {args.copy_numel:,} fp32 elements: {copy.ms:.4f} ms "
            f"(p20 {copy.p20:.4f}, p80 {copy.p80:.4f}) = {copy_gbps:.0f} GB/s (read + write)"
        )
        log.write(
            {
                **env,
                "suite": "copy",
                "case": "copy_",
                "impl": "torch",
                "layout": str(args.copy_numel),
                "dtype": "fp32",
                "tensors": 1,
                "numel": args.copy_numel,
                "bytes_per_elt": 8,
                "bytes": 8 * args.copy_numel,
                "ms": copy.ms,
                "ms_p20": copy.p20,
                "ms_p80": copy.p80,
                "gbps": copy_gbps,
                "copy_gbps": copy_gbps,
                "pct_copy_bw": 100.0,
                "status": "timed",
            }
        )
    print()

    jobs: list = []
    if "optim" in args.suites:
        impls = [i for i in bench_optim.IMPLS if i in args.impls]
        layouts = ["smoke"] if tiny else args.layouts
        jobs += bench_optim.cases(args.optimizers, layouts, args.dtypes, impls)
    if "losses" in args.suites:
        impls = [i for i in bench_losses.IMPLS if i in args.impls]
        jobs += bench_losses.cases(args.losses, args.dtypes, impls, smoke=tiny)

    params = bench_optim.Params(device)
    progress = common.Progress(len(jobs), "fusedopt bench", not args.no_progress)
    rows: list[dict] = []
    ours: dict[tuple, dict] = {}
    failures = 0
    start = time.perf_counter()
    stopped = None  # why the remaining rows were skipped
    guard = SigtermGuard().__enter__()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.")
        for job in jobs:
            base = job.base_row()
            if stopped is None and args.budget is not None and time.perf_counter() - start > args.budget:
                stopped = f"--budget {args.budget:g}s reached"
            if stopped:
                row = {**base, "status": "skipped", "note": stopped}
            else:
                try:
                    if isinstance(job, bench_optim.Case):
                        row = bench_optim.run_case(job, params.get(job), ctx)
                    else:
                        row = bench_losses.run_case(job, ctx)
                    row["status"] = "timed" if ctx.timed else "smoke"
                except Exception as e:  # a path this build lacks must not end the run
                    row = {**base, "status": "error", "note": common.short_error(e)}
                    failures += job.impl == "fusedopt"
                    ctx.release()
                except (Stopped, KeyboardInterrupt) as e:  # report what was measured, then stop
                    stopped = "interrupted" if isinstance(e, KeyboardInterrupt) else str(e)
                    row = {**base, "status": "skipped", "note": stopped}
                    failures += 1
            finish_row(row, env, copy_gbps, ours)
            log.write(row)
            rows.append(row)
            progress.advance(f"{row['case']} {row['layout']} {row['dtype']} {row['impl']}: {row['status']}")
    params.params = []
    log.close()
    guard.raising = False
    try:
        report(rows, args, ctx, env, copy_gbps, log.path)
    finally:
        guard.__exit__()
    if stopped:
        print(f"stopped early ({stopped}): the rows not run are marked skipped")
    if failures:
        print(
            f"FAILED: {failures} fusedopt row(s) raised an error, or the run was interrupted (see the notes)"
        )
    return 1 if failures else 0


class Stopped(BaseException):
    """SIGTERM (e.g. from ``timeout``) during a row: not an ``Exception``, so no row swallows it."""


class SigtermGuard:
    """While installed, the first SIGTERM raises ``Stopped`` in the rows loop; later ones, and any
    during the report, are ignored, so a run cut by ``timeout`` still writes its tables, plot
    and summary (``timeout --kill-after`` leaves a few seconds for that)."""

    def __init__(self):
        self.raising = True
        self.received = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        first = not self.received
        self.received = True
        if first and self.raising:
            raise Stopped("stopped by SIGTERM")

    def __enter__(self) -> SigtermGuard:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def finish_row(row: dict, env: dict, copy_gbps: float | None, ours: dict[tuple, dict]) -> None:
    """Derived columns: GB/s, % of copy, fusedopt's speed-up over the row; environment."""
    row.update(env)
    row["mb"] = row["bytes"] / 1e6
    for prefix in ("", "graph_"):
        ms = row.get(f"{prefix}ms")
        if ms:
            row[f"{prefix}gbps"] = row["bytes"] / (ms * 1e-3) / 1e9
    if row.get("gbps") and copy_gbps:
        row["copy_gbps"] = copy_gbps
        row["pct_copy_bw"] = 100 * row["gbps"] / copy_gbps
    key = (row["suite"], row["case"], row["layout"], row["dtype"])
    if row["impl"] == "fusedopt":
        ours[key] = row
    mine = ours.get(key, {})
    for prefix in ("", "graph_"):
        if row.get(f"{prefix}ms") and mine.get(f"{prefix}ms"):
            row[f"{prefix}fusedopt_speedup"] = row[f"{prefix}ms"] / mine[f"{prefix}ms"]
    row["notes"] = "; ".join(n for n in (row.get("note"), row.get("graph_note")) if n)


# Report ---------------------------------------------------------------------------------------


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
