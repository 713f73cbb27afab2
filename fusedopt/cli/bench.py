"""``python -m fusedopt bench``: optimizer steps (suite ``optim``), losses, the AMP optimizer phase
(``amp``) and the host time of a step (``host``) against torch: ms, bytes moved at least, GB/s,
share of a device-to-device copy, fusedopt's speed-up, peak extra memory. Without CUDA only host
time is measured; the other suites run once on tiny inputs. ``sm90`` (not by default): the
compiler's facts about every launched kernel variant for an H100, on any machine (no GPU):
``sm90.csv``, ``.md``, ``.png``."""

from __future__ import annotations

import argparse
import functools
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import triton.testing

import fusedopt
from fusedopt.cli import bench_amp, bench_losses, bench_optim, bench_sm90, common

SUITES = dict(optim=bench_optim.OPTIM, losses=bench_losses.SUITE, amp=bench_amp.SUITE, host=bench_optim.HOST)
STATIC = ("sm90",)  # compiled, not run: fusedopt.cli.bench_sm90, in a child process without the interpreter
IMPLS = list(dict.fromkeys(impl for suite in SUITES.values() for impl in suite.impls))
COPY_NUMEL = 256 * 2**20  # fp32 elements of the copy that "% copy" refers to
# fmt: off
CSV_FIELDS = [
    "gpu", "torch", "triton", "cuda", "timestamp_utc",  # the environment, on every row
    "suite", "case", "impl", "layout", "dtype", "tensors", "numel", "bytes_per_elt", "bytes",
    "ms", "ms_p20", "ms_p80", "gbps", "copy_gbps", "pct_copy_bw", "fusedopt_speedup", "peak_extra_mib",
    "graph_ms", "graph_p20", "graph_p80", "graph_gbps", "graph_fusedopt_speedup", "graph_note",
    "impl_bytes_per_elt", "status", "note",
]
ROW_COLUMNS = [
    ("case", "case", ""), ("layout", "layout", ""), ("dtype", "dtype", ""), ("impl", "impl", ""),
    ("ms", "ms", ".4f"), ("ms_p20", "p20", ".4f"), ("ms_p80", "p80", ".4f"), ("mb", "MB floor", ".1f"),
    ("impl_bytes_per_elt", "impl B/elt", "d"), ("gbps", "GB/s", ".0f"), ("pct_copy_bw", "% copy", ".1f"),
    ("fusedopt_speedup", "ours x", ".2f"), ("peak_extra_mib", "extra MiB", ".1f"), ("graph_ms", "graph ms", ".4f"),
    ("graph_fusedopt_speedup", "graph ours x", ".2f"), ("status", "status", ""), ("notes", "note", ""),
]
FLOOR_COLUMNS = [
    ("case", "case", ""), ("impl", "impl", ""), ("layout", "layout", ""), ("dtype", "dtype", ""),
    ("tensors", "tensors", "d"), ("numel", "elements", ","), ("bytes_per_elt", "B/elt", "d"),
    ("impl_bytes_per_elt", "impl B/elt", "d"), ("mb", "MB", ".1f"),
    ("passes", "passes: read -> written, once per element", ""),
]
HEADLINE_COLUMNS = [  # then fusedopt's speed-up over each other implementation
    ("case", "case", ""), ("layout", "layout", ""), ("dtype", "dtype", ""), ("ms", "fusedopt ms", ".4f"),
    ("gbps", "GB/s", ".0f"), ("pct_copy_bw", "% of copy", ".1f"), ("graph_ms", "graph ms", ".4f"),
]
# fmt: on


def add_arguments(parser: argparse.ArgumentParser) -> None:
    names = functools.partial(common.add_names, parser)
    optimizers, layouts = bench_optim.OPTIMIZERS, bench_optim.LAYOUTS
    what = "what to run (space- or comma-separated, as every list here; sm90: sm_90 compiler facts, no GPU needed)"
    names("--suites", [*SUITES, *STATIC], SUITES, what)
    help_ = "optim, host: optimizers (sgd: momentum=0.9; adamw-*: low-precision options, not by default)"
    names("--optimizers", optimizers, bench_optim.DEFAULT_OPTIMIZERS, help_)
    names("--layouts", layouts, layouts, f"optim, host: layouts ({bench_optim.LAYOUT_HELP})")
    names("--losses", bench_losses.LOSSES, bench_losses.LOSSES, "losses: cases, <loss>-<shape>")
    names("--dtypes", common.DTYPES, ["fp32", "bf16"], "param and input dtypes (amp: fp32 master params)")
    names("--impls", IMPLS, IMPLS, "implementations; each suite takes those it has")
    smoke = "tiny inputs, every code path once, nothing timed (implied without CUDA, host suite excepted)"
    parser.add_argument("--smoke", action="store_true", help=smoke)
    out = "folder of bench_<UTC time>.csv, .png and .md, and of sm90.csv, .md, .png (default: %(default)s)"
    parser.add_argument("--out", default="fusedopt-bench", metavar="DIR", help=out)
    budget = "rows not started after SECONDS are written as skipped (compiled rows run last)"
    parser.add_argument("--budget", type=float, metavar="SECONDS", help=budget)
    parser.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")


@dataclass(frozen=True)
class Context:
    """How this run measures its rows (what the suites' run functions read)."""

    device: str
    cuda: bool
    smoke: bool  # --smoke: every path once on tiny inputs, nothing timed
    timed: bool  # do_bench timings: CUDA and not --smoke
    tiny: bool  # smoke-sized inputs for the device suites: --smoke, or no CUDA
    compile_backend: str  # inductor; eager without CUDA (inductor's C++ build takes minutes)

    def measure(self, fn, memory: bool = True) -> dict:
        """Timing (median, p20, p80) and peak extra memory of ``fn``; a smoke run only calls it."""
        if not self.timed:
            fn()
            return {}
        median, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])  # L2 flushed each run
        out = {"ms": median, "ms_p20": p20, "ms_p80": p80}
        if memory:  # what one call allocates above what was allocated before it
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            out["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
        return out

    def release(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


def finish_row(row: dict, env: dict, copy_gbps: float | None, ours: dict[tuple, dict]) -> None:
    """Derived columns: status, MB, GB/s, % of copy, fusedopt's speed-up over the row; environment."""
    row.update(env)
    row.setdefault("status", "timed" if row.get("ms") else "smoke")
    row["mb"] = row["bytes"] / 1e6 if row.get("bytes") else None
    key = (row["suite"], row["case"], row["layout"], row["dtype"])
    if row["impl"] == "fusedopt":
        ours[key] = row
    for prefix in ("", "graph_"):
        ms, our_ms = row.get(f"{prefix}ms"), ours.get(key, {}).get(f"{prefix}ms")
        if ms and row.get("bytes"):
            row[f"{prefix}gbps"] = row["bytes"] / (ms * 1e-3) / 1e9
        if ms and our_ms:
            row[f"{prefix}fusedopt_speedup"] = ms / our_ms
    if row.get("gbps") and copy_gbps:
        row["copy_gbps"] = copy_gbps
        row["pct_copy_bw"] = 100 * row["gbps"] / copy_gbps
    row["notes"] = "; ".join(n for n in (row.get("note"), row.get("graph_note")) if n)


def _stop(signum, frame) -> None:
    """SIGTERM (e.g. from ``timeout``) during a row: stop as Ctrl-C does, with the report written."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # later ones are ignored until the report is written
    raise KeyboardInterrupt("stopped by SIGTERM")


def run_rows(jobs: list[common.Job], ctx: Context, args, env: dict, copy_gbps, log: common.CsvLog):
    """Every row, written to ``log`` as it is done; the rows, the number of failures, and why the
    rows not run were skipped (``--budget``, SIGTERM, Ctrl-C) or None."""
    rows: list[dict] = []
    ours: dict[tuple, dict] = {}  # fusedopt's row of each group, for the speed-ups
    failures, stopped = 0, None
    start = time.perf_counter()
    for done, (fixed, measure) in enumerate(jobs, 1):
        if not stopped and args.budget is not None and time.perf_counter() - start > args.budget:
            stopped = f"--budget {args.budget:g}s reached"
        row = dict(fixed)
        if stopped:
            row.update(status="skipped", note=stopped)
        else:
            try:
                row.update(measure(ctx))
                ctx.release()  # the row's tensors are gone by now
            except Exception as e:  # a path this build lacks must not end the run
                row.update(status="error", note=common.short_error(e))
                failures += row["impl"] == "fusedopt"
            except KeyboardInterrupt as e:  # report what was measured, then stop
                stopped = str(e) or "interrupted"
                row.update(status="skipped", note=stopped)
                failures += 1
        finish_row(row, env, copy_gbps, ours)
        log.writerow(row)
        rows.append(row)
        if not args.no_progress:
            what = f"{row['case']} {row['layout']} {row['dtype']} {row['impl']}: {row['status']}"
            common.progress("fusedopt bench", done, len(jobs), start, what)
    log.file.close()
    return rows, failures, stopped


def run(args: argparse.Namespace) -> int:
    """The benchmark (without CUDA or with --smoke, the smoke run), then the sm90 suite if asked;
    1 if a fusedopt row failed or a kernel did not compile for sm_90."""
    status = run_timed(args) if set(args.suites) - set(STATIC) else 0
    if "sm90" in args.suites:
        print(
            "\nsm90: compiling for sm_90 in a child process without TRITON_INTERPRET (fusedopt.cli.bench_sm90)"
        )
        status |= bench_sm90.run_in_child(args.out) != 0
    return int(status)


def run_timed(args: argparse.Namespace) -> int:
    """The timed suites (without CUDA or with --smoke, the smoke run); 1 if a fusedopt row failed."""
    cuda, smoke = torch.cuda.is_available(), args.smoke
    device = "cuda" if cuda else "cpu"
    timed, tiny = cuda and not smoke, smoke or not cuda
    ctx = Context(device, cuda, smoke, timed, tiny, compile_backend="inductor" if cuda else "eager")
    env = common.header("bench", device)
    print(f"suites: {', '.join(args.suites)}")
    if not ctx.cuda and set(args.suites) - {"host", *STATIC}:
        print("Timings need a CUDA GPU: nothing is timed here (interpreter timings are not performance).")
        print(
            "Smoke run instead: every implementation runs once on tiny inputs; the CSV rows have no timings."
        )
    elif args.smoke:
        print("--smoke: every implementation runs once on tiny inputs; nothing is timed.")
    if not ctx.cuda and not args.smoke and "host" in args.suites:
        print("host suite: timed (host time is real on CPU; the kernels are not launched: dry_run)")
    if {"optim", "losses"} & set(args.suites):
        print(f"torch-compile rows: torch.compile(backend={ctx.compile_backend!r})")
    if not ctx.cuda and "optim" in args.suites:
        print("CUDA-graph replay figure: needs CUDA, not run")
    log = common.CsvLog(args.out, "bench", env, CSV_FIELDS)
    copy_gbps = None
    if ctx.timed:  # the device-to-device copy of COPY_NUMEL fp32 elements: 100 % of "% copy"
        src = torch.randn(COPY_NUMEL, device=ctx.device)
        copy = {"suite": "copy", "case": "copy_", "impl": "torch", "layout": str(COPY_NUMEL), "dtype": "fp32"}
        copy.update(tensors=1, numel=COPY_NUMEL, bytes_per_elt=8, bytes=8 * COPY_NUMEL)  # read + write
        copy.update(ctx.measure(functools.partial(torch.empty_like(src).copy_, src), memory=False))
        del src
        ctx.release()
        copy_gbps = copy["bytes"] / (copy["ms"] * 1e-3) / 1e9
        finish_row(copy, env, copy_gbps, {})
        log.writerow(copy)
        print(
            f"device-to-device copy, {COPY_NUMEL:,} fp32 elements: {copy['ms']:.4f} ms (p20 "
            f"{copy['ms_p20']:.4f}, p80 {copy['ms_p80']:.4f}) = {copy_gbps:.0f} GB/s (read + write)"
        )
    print()

    jobs = [job for suite in args.suites if suite in SUITES for job in SUITES[suite].jobs(args, ctx)]
    # Compiled rows last (slow to compile), fewest tensors first: a run cut short has the others.
    jobs.sort(key=lambda job: (1 + job[0]["tensors"]) if job[0]["impl"] == "torch-compile" else 0)
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.")
            rows, failures, stopped = run_rows(jobs, ctx, args, env, copy_gbps, log)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a SIGTERM now must not cut the report
        report(rows, args, ctx, env, copy_gbps, log.path)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if stopped:
        print(f"stopped early ({stopped}): the rows not run are marked skipped")
    if failures:
        print(f"FAILED: {failures} fusedopt row(s) raised an error, or the run was cut (see the notes)")
    return 1 if failures else 0


def groups(rows: list[dict], suite: str) -> dict[tuple, dict[str, dict]]:
    """A suite's rows by (dtype, layout, case) in run order, each by implementation in the suite's order."""
    out: dict[tuple, dict[str, dict]] = {}
    for r in (r for r in rows if r["suite"] == suite):
        out.setdefault((r["dtype"], r["layout"], r["case"]), {})[r["impl"]] = r
    return {key: {i: group[i] for i in SUITES[suite].impls if i in group} for key, group in out.items()}


def columns(suite: str, candidates: list[common.Column]) -> list[common.Column]:
    """``candidates``, the case and layout headed with the suite's names."""
    names = dict(zip(("case", "layout"), SUITES[suite].headers, strict=True))
    return [(k, names.get(k, h), f) for k, h, f in candidates]


def headline(rows: list[dict], suite: str) -> tuple[list[dict], list[common.Column]]:
    """Per (case, layout, dtype): fusedopt's figures and its speed-up over each other path."""
    out = []
    for (dtype, layout, case), by_impl in groups(rows, suite).items():
        ours = by_impl.get("fusedopt", {})
        row = {k: ours.get(k) for k in ("ms", "gbps", "pct_copy_bw", "graph_ms")}
        row.update({f"x_{i}": r.get("fusedopt_speedup") for i, r in by_impl.items() if i != "fusedopt"})
        out.append({"case": case, "layout": layout, "dtype": dtype, **row})
    speedups = [(f"x_{i}", f"x vs {i.removeprefix('torch-')}", ".2f") for i in SUITES[suite].impls[1:]]
    return out, columns(suite, HEADLINE_COLUMNS + speedups)


def report(rows: list[dict], args, ctx: Context, env: dict, copy_gbps: float | None, csv_path: Path) -> None:
    """Tables on stdout; the PNG and the Markdown summary next to the CSV."""
    if ctx.timed:
        print("ours x = the row's ms / fusedopt's ms (above 1: fusedopt is faster); % copy = GB/s / copy's")
        print("MB floor: the bytes the row must move at least, the same for each implementation of a group\n")
    tables = []  # (title, rows, columns, suite or None for a floor table)
    for suite in (s for s in SUITES if any(r["suite"] == s for r in rows)):
        table = [r for group in groups(rows, suite).values() for r in group.values()]
        tables.append((SUITES[suite].title, table, columns(suite, ROW_COLUMNS), suite))
    for suite in (s for s in SUITES if s in args.suites):
        if floor := SUITES[suite].floor_rows(args):
            floor = [{**r, "mb": r["bytes"] / 1e6} for r in floor]
            tables.append((SUITES[suite].floor_title, floor, columns(suite, FLOOR_COLUMNS), None))
    for title, table, cols, suite in tables:
        if suite or not ctx.timed:
            print(f"{title}:\n{common.table_text(table, cols)}\n")

    png = common.save_plot(csv_path, plot_panels(tables, ctx, env, copy_gbps))
    lines = [f"# fusedopt bench: {env['gpu']}", ""]
    cuda = f", CUDA {env['cuda']}" if env["cuda"] else ""
    versions = f"fusedopt {fusedopt.__version__}, torch {env['torch']}, triton {env['triton']}{cuda}"
    lines += [f"{env['timestamp_utc']}; {versions}", ""]
    if ctx.timed:
        lines += [f"Device-to-device copy: {copy_gbps:.0f} GB/s (read + write): 100 % of `% of copy`.", ""]
    else:
        lines += ["**Smoke run: no device timings** (no CUDA GPU, or `--smoke`).", ""]
    lines += [f"Files: `{csv_path.name}`" + (f", `{png.name}`" if png else ""), ""]
    for title, table, cols, suite in tables:
        if suite and any(r.get("ms") for r in table):
            lines += [f"## {suite}: fusedopt and its speed-up over each other path (row ms / fusedopt ms)"]
            lines += ["", common.table_text(*headline(rows, suite), markdown=True), ""]
        lines += [f"## {title}", "", common.table_text(table, cols, markdown=True), ""]
    md = csv_path.with_suffix(".md")
    md.write_text("\n".join(lines))
    print(f"summary: {md}")


def plot_panels(tables, ctx: Context, env: dict, copy_gbps: float | None) -> list[common.Panel]:
    """Per suite, GB/s per implementation (host: ms); without device timings, the byte floors."""
    panels = []
    for title, table, _, suite in tables:
        bars = []
        if suite is None and not ctx.timed:  # a byte-floor table, and what each implementation moves
            for r in table:
                group = group_label(r) + (f" {r['impl']}" if r.get("impl") else "")
                bars.append((group, "byte floor", r["mb"]))
                if r.get("impl_bytes_per_elt"):
                    passes = r["impl_bytes_per_elt"] * r["numel"] / 1e6
                    bars.append((group, "the implementation's passes", passes))
            panels.append((f"smoke run, nothing timed: {title.split(' (')[0]}", "MB", bars, None))
        key = next((k for k in ("gbps", "ms") if any(r.get(k) for r in table)), None)
        if suite and key:
            for prefix, suffix in (("", ""), ("graph_", " (CUDA graph)")):
                bars += [(group_label(r), r["impl"] + suffix, r.get(prefix + key)) for r in table]
            what = "GB/s from the byte floor (higher is better)" if key == "gbps" else "ms (lower is better)"
            line = (copy_gbps, "device-to-device copy") if key == "gbps" and copy_gbps else None
            panels.append((f"{suite}: {what}, {env['gpu']}", key.replace("gbps", "GB/s"), bars, line))
    return panels


def group_label(r: dict) -> str:
    return f"{r['case'].split('(')[0].removeprefix('Fused')} {r['layout']} {r['dtype']}"
