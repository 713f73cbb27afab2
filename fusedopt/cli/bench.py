"""``python -m fusedopt bench``: fused optimizer steps, losses, the AMP optimizer phase and the
host time of a step, against torch.

Suites (``--suites``, default all): ``optim`` (``fusedopt.cli.bench_optim``): one step of each
fused optimizer against torch's for-loop, foreach, fused and torch.compile'd steps on three
layouts, plus a CUDA-graph replay figure for the small-tensor layout; ``losses``
(``bench_losses``): forward + backward of the fused losses against eager torch and
torch.compile; ``amp`` (``bench_amp``): the whole optimizer phase of an AMP step (GradScaler,
clipping, AdamW) on GPT-2 small, torch's recipe against fusedopt's, eager and in a CUDA graph;
``host`` (``bench_host``): the host time of ``opt.step()``, kernel excluded.

Every row: median ms with 20th/80th percentiles (triton.testing.do_bench, L2 flushed; host:
time.perf_counter), the bytes the row must move at least (``fusedopt.floors``), the GB/s that
implies, its share of a device-to-device copy measured in the same run, fusedopt's speed-up over
the row (row ms / fusedopt ms) and the peak memory above what was allocated before. Output: a
table per suite on stdout, and in --out a CSV (GPU name, torch/triton/CUDA versions, UTC
timestamp on every row), a PNG and a Markdown summary.

Without CUDA only host time is measured: device timings need a CUDA GPU (interpreter timings are
not performance). The other suites then run their smoke version (every code path once, on tiny
inputs); the byte floors are printed, and the CSV, PNG and summary still written.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import fusedopt
from fusedopt.cli import bench_losses, bench_optim, common
from fusedopt.cli.bench_harness import IMPLS, SUITES, Context, SigtermGuard, Stopped, copy_row, finish_row
from fusedopt.cli.bench_report import CSV_FIELDS, report

COPY_NUMEL = 256 * 2**20  # fp32 elements of the device-to-device copy reference (1 GiB)


class Names(argparse.Action):
    """Names from ``names``, space- or comma-separated (``--suites optim,losses``)."""

    def __init__(self, *args, names, **kwargs):
        self.names = list(names)
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        out = [n for v in values for n in v.split(",") if n]
        if bad := [n for n in out if n not in self.names]:
            parser.error(f"{option_string}: unknown {', '.join(bad)} (choose from {', '.join(self.names)})")
        setattr(namespace, self.dest, out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    def choice(flag: str, names, default, what: str, nargs: str = "+") -> None:
        parser.add_argument(
            flag,
            nargs=nargs,
            action=Names,
            names=names,
            default=list(default),
            metavar="NAME",
            help=f"{what}; from: {', '.join(names)} (default: {' '.join(default) or 'none'})",
        )

    def number(flag: str, kind: type, default, metavar: str, what: str) -> None:
        parser.add_argument(
            flag, type=kind, default=default, metavar=metavar, help=f"{what} (default: %(default)s)"
        )

    optimizers, layouts = bench_optim.OPTIMIZERS, bench_optim.LAYOUTS
    choice("--suites", SUITES, SUITES, "what to run (space- or comma-separated, as every list here)")
    choice("--optimizers", optimizers, optimizers, "optim, host: optimizers (sgd: momentum=0.9)")
    choice("--layouts", layouts, layouts, f"optim, host: layouts ({bench_optim.LAYOUT_HELP})")
    choice("--graph-layouts", layouts, bench_optim.GRAPH_LAYOUTS, "optim: layouts that also get the CUDA-graph replay figure (none: no graphs)", nargs="*")  # fmt: skip
    choice("--losses", bench_losses.LOSSES, bench_losses.LOSSES, "losses: cases, <loss>-<shape>")
    choice(
        "--dtypes", common.DTYPES, ["fp32", "bf16"], "param and input dtypes (amp: fp32 master params always)"
    )
    choice("--impls", IMPLS, IMPLS, "implementations; each suite takes those it has")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny inputs, every code path once, nothing timed (implied without CUDA, host suite excepted)",
    )
    parser.add_argument(
        "--out",
        default="fusedopt-bench",
        metavar="DIR",
        help="folder of bench_<UTC time>.csv, .png and .md (default: %(default)s)",
    )
    number("--warmup", int, 25, "MS", "do_bench warm-up time, ms")
    number("--rep", int, 100, "MS", "do_bench repetition time, ms")
    number("--host-steps", int, 200, "N", "host: timed steps per row, after 10 untimed ones")
    number("--copy-numel", int, COPY_NUMEL, "N", "fp32 elements of the copy that %% copy refers to")
    number("--budget", float, None, "SECONDS", "rows not started within this time are written as skipped (compiled rows run last)")  # fmt: skip
    parser.add_argument(
        "--compile-backend",
        metavar="NAME",
        help="torch.compile backend of the torch-compile rows (default: inductor with CUDA; eager "
        "without, where only the smoke run compiles and inductor's C++ build would take minutes)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def timing_enabled(device: str, smoke: bool) -> bool:
    """Device rows are timed on CUDA only, and not in a smoke run."""
    return device == "cuda" and not smoke


def run(args: argparse.Namespace) -> int:
    """The benchmark (without CUDA or with --smoke, the smoke run); 1 if a fusedopt row failed."""
    device = common.default_device()
    ctx = Context(
        device=device,
        smoke=args.smoke,
        timed=timing_enabled(device, args.smoke),
        warmup=args.warmup,
        rep=args.rep,
        host_steps=args.host_steps,
        compile_backend=args.compile_backend or ("inductor" if device == "cuda" else "eager"),
        graph_layouts=(),
    )
    # a smoke run on CUDA captures its one tiny layout; CUDA graphs need CUDA
    if ctx.cuda and args.graph_layouts:
        ctx.graph_layouts = ("smoke",) if ctx.tiny else tuple(args.graph_layouts)
    env = common.environment()
    print(
        f"fusedopt {fusedopt.__version__} bench: torch {env['torch']}, triton {env['triton']}, {env['timestamp_utc']}"
    )
    where = env["gpu"] + (f" (CUDA {env['cuda']})" if env["cuda"] else " (no CUDA GPU)")
    print(f"device: {where}: fusedopt runs {common.kernel_path(device)}")
    print(f"suites: {', '.join(args.suites)}")
    if warning := common.interpreter_warning():
        print(warning + " Timings mean nothing.")
    if not ctx.cuda and set(args.suites) - {"host"}:
        print(
            "Timings need a CUDA GPU: nothing is timed here (interpreter timings are not performance).\n"
            "Smoke run instead: every implementation runs once on tiny inputs, so the code paths are "
            "tested; the CSV rows have no timings."
        )
    elif args.smoke:
        print("--smoke: every implementation runs once on tiny inputs; nothing is timed.")
    if not ctx.cuda and not args.smoke and "host" in args.suites:
        print("host suite: timed (host time is real on CPU; the kernels are not launched: dry_run)")
    if {"optim", "losses"} & set(args.suites):
        print(f"torch-compile rows: torch.compile(backend={ctx.compile_backend!r})")
    if not ctx.cuda and args.graph_layouts and "optim" in args.suites:
        print("CUDA-graph replay figure: needs CUDA, not run")

    stamp = env["timestamp_utc"].replace("-", "").replace(":", "")
    log = common.CsvLog(Path(args.out) / f"bench_{stamp}.csv", CSV_FIELDS)
    copy_gbps = None
    if ctx.timed:
        copy = copy_row(args.copy_numel, ctx)
        copy_gbps = copy["bytes"] / (copy["ms"] * 1e-3) / 1e9
        finish_row(copy, env, copy_gbps, {})
        log.write(copy)
        print(
            f"device-to-device copy, {args.copy_numel:,} fp32 elements: {copy['ms']:.4f} ms "
            f"(p20 {copy['ms_p20']:.4f}, p80 {copy['ms_p80']:.4f}) = {copy_gbps:.0f} GB/s (read + write)"
        )
    print()

    jobs = [case for suite in args.suites for case in SUITES[suite].cases(args, ctx)]
    # compiled rows last (slow to compile), so a run cut short has all the others
    jobs.sort(key=lambda job: job.impl == "torch-compile")
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
            if stopped is None and args.budget is not None and time.perf_counter() - start > args.budget:
                stopped = f"--budget {args.budget:g}s reached"
            if stopped:
                row = {**job.base_row(), "status": "skipped", "note": stopped}
            else:
                try:
                    row = job.run(ctx)
                except Exception as e:  # a path this build lacks must not end the run
                    row = {**job.base_row(), "status": "error", "note": common.short_error(e)}
                    failures += job.impl == "fusedopt"
                    ctx.release()
                except (Stopped, KeyboardInterrupt) as e:  # report what was measured, then stop
                    stopped = "interrupted" if isinstance(e, KeyboardInterrupt) else str(e)
                    row = {**job.base_row(), "status": "skipped", "note": stopped}
                    failures += 1
            finish_row(row, env, copy_gbps, ours)
            log.write(row)
            rows.append(row)
            progress.advance(f"{row['case']} {row['layout']} {row['dtype']} {row['impl']}: {row['status']}")
    ctx.drop_params()
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
