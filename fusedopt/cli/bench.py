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
import time
import warnings
from pathlib import Path

import fusedopt
from fusedopt.cli import bench_losses, bench_optim, common
from fusedopt.cli.bench_harness import (
    IMPLS,
    SUITES,
    Context,
    SigtermGuard,
    Stopped,
    copy_bandwidth,
    finish_row,
)
from fusedopt.cli.bench_report import CSV_FIELDS, report

COPY_NUMEL = 256 * 2**20  # fp32 elements of the device-to-device copy reference (1 GiB)


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
