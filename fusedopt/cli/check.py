"""``python -m fusedopt check``: fusedopt against torch on this machine, with verdicts.

Every optimizer case steps a GPT-shaped list of params (a 0-d scalar included) for ``--steps``
steps beside torch's class (for-loop path) on the same grads, every param and state tensor
compared; every loss case compares the value and the input gradient with ``torch.nn.functional``.
bf16/fp16 are compared with torch in fp32 rounded to the dtype. The cases (``OPTIM_CASES``,
``LOSS_CASES``: append one to check it), the runners and the tolerance contract are
``fusedopt.testing``'s. Output: tables and verdicts on stdout; in --out a CSV of every result and
a PNG of each result's error over what the tolerance allows.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
import warnings

import torch

from fusedopt import testing
from fusedopt.cli import common
from fusedopt.testing import OptimCase, Result, describe
from fusedopt.tolerance import LOSS_TOLERANCE, OPTIM_TOLERANCE

# The registries: testing's lists themselves, so appending a case here checks it.
OPTIM_CASES: list[OptimCase] = testing.OPTIM_CASES
LOSS_CASES: list[testing.LossCase] = testing.LOSS_CASES
# CPU: the kernels run in the interpreter; 28 tensors (~9k elements, ragged blocks) and 33 x 1000
# loss inputs keep the check near half a minute on two cores. CUDA: ~5.2M elements (the
# optimizers' large-block launch), GPT-2's vocabulary for the losses.
SIZES = {  # flag: (CPU, CUDA, help)
    "width": (16, 256, "d_model of the GPT-shaped params"),
    "layers": (2, 4, "transformer blocks of the GPT-shaped params"),
    "vocab": (97, 8191, "rows of its embedding matrix"),
    "rows": (33, 256, "rows of the loss inputs"),
    "classes": (1000, 50257, "columns of the loss inputs (cross-entropy classes)"),
}
KINDS = {  # kind: (plural, what its error columns are, its tolerance table)
    "optimizer": (
        "optimizers",
        "per tensor, the largest over the param list; step counters compared exactly",
        OPTIM_TOLERANCE,
    ),
    "loss": ("losses", "of the loss value and of the input gradient", LOSS_TOLERANCE),
}
ERROR_ORDER = ["param", "value", "grad", "momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
FIELDS = ["kind", "name", "options", "dtype", "steps", "shape"]  # then the errors, RESULT_FIELDS
RESULT_FIELDS = ["ratio", "verdict", "worst", "notes"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    groups = list(dict.fromkeys(c.group for c in OPTIM_CASES))
    losses = list(dict.fromkeys(c.name for c in LOSS_CASES))
    common.add_names(parser, "--optimizers", groups, groups, "optimizers (none given: skip them)", "*")
    common.add_names(parser, "--losses", losses, losses, "losses (none given: skip them)", "*")
    common.add_names(parser, "--dtypes", common.DTYPES, ["fp32", "bf16"], "param and input dtypes")
    parser.add_argument("--steps", type=int, default=5, metavar="N", help="optimizer steps (default: 5)")
    for flag, (cpu, cuda, what) in SIZES.items():
        help = f"{what} (default: {cpu} on CPU, {cuda} with CUDA)"
        parser.add_argument(f"--{flag}", type=int, metavar="N", help=help)
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    out = "folder of check_<UTC time>.csv and .png (default: %(default)s)"
    parser.add_argument("--out", default="fusedopt-check", metavar="DIR", help=out)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def optimizer_result(case: OptimCase, dtype: torch.dtype, device: str, shapes, steps: int, seed: int):
    """``case`` on the named ``shapes`` (``testing.gpt_shapes``), random grads every step."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(dtype).to(device) for _, s in shapes]

    def grads(ps: list[torch.Tensor], step: int) -> list[torch.Tensor]:
        return [torch.randn(p.shape, generator=gen).to(device=device, dtype=dtype) for p in ps]

    return testing.compare_optimizer(case, params, grads, steps, names=[n for n, _ in shapes])


def run(args: argparse.Namespace) -> int:
    """The selected cases; the tables, CSV, PNG and verdict. 0 if every case passed."""
    device = common.default_device()
    column = 1 if device == "cuda" else 0  # of SIZES
    size = {k: v[column] if getattr(args, k) is None else getattr(args, k) for k, v in SIZES.items()}
    optim_cases = [c for c in OPTIM_CASES if c.group in args.optimizers]
    loss_cases = [c for c in LOSS_CASES if c.name in args.losses]
    dtypes = [common.DTYPES[d] for d in args.dtypes]
    shapes = testing.gpt_shapes(size["width"], size["layers"], size["vocab"])
    numel = sum(math.prod(s) for _, s in shapes)
    env = common.header("check", device)
    print(
        f"optimizers: {len(optim_cases)} option sets x {len(dtypes)} dtypes, {args.steps} steps on a GPT-shaped "
        f"param list ({len(shapes)} tensors, {numel:,} elements: d={size['width']}, {size['layers']} layers, "
        f"vocab {size['vocab']}, a 0-d scalar), against torch.optim's for-loop path (foreach=False)\n"
        f"losses: {len(loss_cases)} cases x {len(dtypes)} dtypes, inputs {size['rows']}x{size['classes']}, "
        "value and input gradient against torch.nn.functional\n"
    )
    jobs = [*itertools.product(optim_cases, dtypes), *itertools.product(loss_cases, dtypes)]
    progress = common.Progress(len(jobs), "fusedopt check", not args.no_progress)
    start = time.perf_counter()
    results = []
    with warnings.catch_warnings():
        # The interpreter evaluates masked-off lanes too (inf - inf there is harmless).
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.")
        for case, dtype in jobs:
            optim = isinstance(case, OptimCase)
            try:
                if optim:
                    result = optimizer_result(case, dtype, device, shapes, args.steps, args.seed)
                else:
                    result = testing.compare_loss(
                        case, dtype, device, size["rows"], size["classes"], args.seed
                    )
            except Exception as e:
                name = common.DTYPE_NAMES[dtype]
                if optim:
                    result = Result(
                        "optimizer", case.fused_cls.__name__, describe(case.kwargs), name, args.steps
                    )
                else:
                    options = describe(case.kwargs, "weight" if case.weighted else "")
                    result = Result("loss", case.name, options, name)
                result.error = common.short_error(e)
            results.append(result)
            progress.advance(f"{result.name} {result.dtype}")
    return report(results, dtypes, time.perf_counter() - start, env, args.out)


def tolerance_text(table: dict, dtypes: list[torch.dtype]) -> str:
    parts = []
    for dt in dtypes:
        tol, name = table[dt], common.DTYPE_NAMES[dt]
        if "ulps" in tol:
            parts.append(f"{name}: {tol['ulps']:g} rounding step(s) of the dtype + 8·2⁻²⁴·max|torch|")
        elif "atol" in tol:
            parts.append(f"{name}: rtol {tol['rtol']:g}, atol {tol['atol']:g}")
        else:
            parts.append(f"{name}: rtol {tol['rtol']:g}, atol rtol·max|torch|")
    return "; ".join(parts)


def error_rank(key: str) -> tuple[int, str]:
    """Error columns in ``ERROR_ORDER``, then any other state key alphabetically."""
    return (ERROR_ORDER.index(key) if key in ERROR_ORDER else len(ERROR_ORDER), key)


def as_row(r: Result) -> dict:
    row = {k: getattr(r, k) for k in FIELDS}
    row.update(r.errors, ratio=None if r.error else r.ratio, verdict=r.verdict, worst=r.worst)
    row["notes"] = "; ".join([*r.notes, *([r.error] if r.error else [])])
    return row


def report(results: list[Result], dtypes: list[torch.dtype], elapsed: float, env: dict, out: str) -> int:
    """A table per kind with its tolerances, a line per case that did not pass, the CSV and PNG,
    the verdict; 0 if every case passed."""
    errors = sorted({k for r in results for k in r.errors}, key=error_rank)
    rows = [as_row(r) for r in results]
    log = common.CsvLog(out, "check", env, [*env, *FIELDS, *errors, *RESULT_FIELDS])
    for row in rows:
        log.write(env | row)
    log.close()
    panels = []
    for kind, (plural, what, table) in KINDS.items():
        mine = [row for row in rows if row["kind"] == kind]
        if not mine:
            continue
        optional = [("steps", "steps", "d"), ("shape", "input", "")]
        optional += [(k, "params" if k == "param" else k, ".1e") for k in errors]
        columns = [("name", kind, ""), ("options", "options", ""), ("dtype", "dtype", "")]
        columns += [c for c in optional if any(row.get(c[0]) not in (None, "") for row in mine)]
        columns += [("ratio", "err/tol", ".2f"), ("verdict", "verdict", "")]
        print(common.table_text(mine, columns))
        print(
            f"columns: max|ours - torch| / max|torch| {what}.\ntolerance: {tolerance_text(table, dtypes)}\n"
        )
        groups = list(dict.fromkeys(f"{row['name']} {row['options']}" for row in mine))
        series = {dtype: [None] * len(groups) for dtype in dict.fromkeys(row["dtype"] for row in mine)}
        for row in mine:
            series[row["dtype"]][groups.index(f"{row['name']} {row['options']}")] = row["ratio"]
        title = f"{plural}: the largest element error / what the tolerance allows there, {env['gpu']}"
        panels.append((title, "err/tol (<= 1 passes)", groups, series, (1.0, "tolerance")))
    print("err/tol: the largest element error divided by what the tolerance allows there (<= 1 passes).")
    failed = [r for r in results if r.verdict != "PASS"]
    for r in failed:
        detail = r.error or "; ".join([*([f"worst {r.worst}"] if r.ratio > 1 else []), *r.notes[:3]])
        print(f"{r.verdict}: {r.name} ({r.options}) {r.dtype}: {detail}")
    common.save_plot(log.path, panels)
    if failed:
        print(f"FAILED: {len(failed)} of {len(results)} checks ({elapsed:.1f}s)")
        return 1
    print(f"OK: all {len(results)} checks within tolerance ({elapsed:.1f}s)")
    return 0
