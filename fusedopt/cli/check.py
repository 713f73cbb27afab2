"""``python -m fusedopt check``: every fused optimizer (each param and state tensor, step after step),
loss (value and input gradient), the ops on a linear head: the fused linear cross-entropy and the
linear log-probs (value and gradients of input, weight, bias), and the fused linear distillation
loss (value and the student's gradients) against torch on this machine, with verdicts. The cases,
runners and tolerances are
``fusedopt.testing``'s."""

from __future__ import annotations

import argparse
import itertools
import math
import time
import warnings

import torch

from fusedopt import testing
from fusedopt.cli import common
from fusedopt.testing import DistillationCase, LinearCECase, OptimCase, Result, describe
from fusedopt.tolerance import (
    LINEAR_CE_TOLERANCE,
    LINEAR_DISTILLATION_TOLERANCE,
    LOSS_TOLERANCE,
    MUON_TOLERANCE,
    OPTIM_TOLERANCE,
)

# The registries: testing's lists themselves, so appending a case here checks it.
OPTIM_CASES: list[OptimCase] = testing.OPTIM_CASES
MUON_CASES: list[OptimCase] = testing.MUON_CASES
LOSS_CASES: list[testing.LossCase] = testing.LOSS_CASES
LINEAR_CE_CASES: list[LinearCECase] = testing.LINEAR_CE_CASES
DISTILLATION_CASES: list[DistillationCase] = testing.DISTILLATION_CASES
# CPU (the interpreter): 28 tensors (~9k elements, ragged blocks), 33 x 1000 loss inputs, linear
# cross-entropy 33 x 24 -> 1000 classes in chunks of 8 rows (five, the last of one row): about a
# minute on two cores. CUDA: ~5.2M elements (the large-block launch), GPT-2's vocabulary.
SIZES = {  # flag: (CPU, CUDA, help)
    "width": (16, 256, "d_model of the GPT-shaped params"),
    "layers": (2, 4, "transformer blocks of the GPT-shaped params"),
    "vocab": (97, 8191, "rows of its embedding matrix"),
    "rows": (33, 256, "rows of the loss inputs (linear cross-entropy: tokens)"),
    "classes": (1000, 50257, "columns of the loss inputs (cross-entropy classes)"),
    "hidden": (24, 256, "hidden size of the linear cross-entropy's input"),
    "chunk_rows": (8, 64, "tokens per chunk of the linear cross-entropy"),
}
OPTIM_ERRORS = "per tensor, the largest over the param list; step counters compared exactly"
KINDS = {  # kind: (plural, what its error columns are, its tolerance table)
    "optimizer": ("optimizers", OPTIM_ERRORS, OPTIM_TOLERANCE),
    "loss": ("losses", "of the loss value and of the input gradient", LOSS_TOLERANCE),
    "linear_ce": (
        "linear heads",
        "of the value (linear_log_probs: log-probs and entropy) and of the gradients of input, linear_weight, "
        "linear_bias, torch = the composition F.cross_entropy(F.linear(...)) (log_softmax(F.linear(...) / T)) "
        "in fp64 from the same values",
        LINEAR_CE_TOLERANCE,
    ),
    "distillation": (
        "linear distillation",
        "of the loss value and of the student's gradients of input, weight, bias, torch = the "
        "composition (both heads' F.linear, the divergence from their log_softmax) in fp64 from the same values",
        LINEAR_DISTILLATION_TOLERANCE,
    ),
}
ERROR_ORDER = ["param", "value", "grad", "grad_input", "grad_weight", "grad_bias"]
ERROR_ORDER += ["momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
FIELDS = ["kind", "name", "options", "dtype", "steps", "shape"]  # then the errors, ratio, verdict ...


def add_arguments(parser: argparse.ArgumentParser) -> None:
    groups = list(dict.fromkeys(c.group for c in [*OPTIM_CASES, *MUON_CASES]))
    losses = list(dict.fromkeys(c.name for c in [*LOSS_CASES, *LINEAR_CE_CASES, *DISTILLATION_CASES]))
    common.add_names(parser, "--optimizers", groups, groups, "optimizers (none given: skip them)", "*")
    common.add_names(parser, "--losses", losses, losses, "losses (none given: skip them)", "*")
    common.add_names(parser, "--dtypes", common.DTYPES, ["fp32", "bf16"], "param and input dtypes")
    parser.add_argument("--steps", type=int, default=5, metavar="N", help="optimizer steps (default: 5)")
    for flag, (cpu, cuda, what) in SIZES.items():
        help = f"{what} (default: {cpu} on CPU, {cuda} with CUDA)"
        parser.add_argument(f"--{flag.replace('_', '-')}", type=int, metavar="N", help=help)
    out = "folder of check_<UTC time>.csv and .png (default: %(default)s)"
    parser.add_argument("--out", default="fusedopt-check", metavar="DIR", help=out)
    parser.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")


def optimizer_result(case: OptimCase, dtype: torch.dtype, device: str, shapes, steps: int):
    """``case`` on the named ``shapes`` (``testing.gpt_shapes``) and its ``extra_params``,
    random grads every step."""
    shapes = [*shapes, *case.extra_params]
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to(dtype).to(device) for _, s in shapes]

    def grads(ps: list[torch.Tensor], step: int) -> list[torch.Tensor]:
        return [torch.randn(p.shape, generator=gen).to(device=device, dtype=dtype) for p in ps]

    names = [n for n, _ in shapes]
    if case.group == "muon":
        return testing.compare_muon(case, params, grads, steps, names)
    return testing.compare_optimizer(case, params, grads, steps, names=names)


def run(args: argparse.Namespace) -> int:
    """The selected cases; the tables, CSV, PNG and verdict. 0 if every case passed."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    column = 1 if device == "cuda" else 0  # of SIZES
    size = {k: v[column] if getattr(args, k) is None else getattr(args, k) for k, v in SIZES.items()}
    optim_cases = [c for c in OPTIM_CASES if c.group in args.optimizers]
    muon_cases = [c for c in MUON_CASES if c.group in args.optimizers]
    loss_cases = [c for c in LOSS_CASES if c.name in args.losses]
    linear_cases = [c for c in LINEAR_CE_CASES if c.name in args.losses]
    distillation_cases = [c for c in DISTILLATION_CASES if c.name in args.losses]
    dtypes = [common.DTYPES[d] for d in args.dtypes]
    shapes = testing.gpt_shapes(size["width"], size["layers"], size["vocab"])
    numel = sum(math.prod(s) for _, s in shapes)
    extras = "".join(
        f"; {case.fused_cls.__name__}({describe(case.kwargs)}) adds "
        + ", ".join(f"{name} {tuple(shape)}" for name, shape in case.extra_params)
        for case in optim_cases
        if case.extra_params
    )
    env = common.header("check", device)
    print(
        f"optimizers: {len(optim_cases)} option sets x {len(dtypes)} dtypes, {args.steps} steps on a GPT-shaped "
        f"param list ({len(shapes)} tensors, {numel:,} elements: d={size['width']}, {size['layers']} layers, "
        f"vocab {size['vocab']}, a 0-d scalar{extras}), against torch.optim's for-loop path (foreach=False)\n"
        f"muon: {len(muon_cases)} option sets x {len(dtypes)} dtypes on the same params, FusedMuon's Muon group (the "
        "hidden matrices) against torch.optim.Muon, its use_muon=False group (the rest) against torch.optim.AdamW\n"
        f"losses: {len(loss_cases)} cases x {len(dtypes)} dtypes, inputs {size['rows']}x{size['classes']}, "
        "value and input gradient against torch.nn.functional (z_loss, softcap: their plain-torch composition)\n"
        f"linear heads: {len(linear_cases)} cases x {len(dtypes)} dtypes, {size['rows']} tokens x "
        f"{size['hidden']} features -> {size['classes']} classes in chunks of {size['chunk_rows']} (linear_log_probs: "
        "its own chunks), value and gradients of input, linear_weight, linear_bias against the composition in fp64\n"
        f"linear distillation: {len(distillation_cases)} cases x {len(dtypes)} dtypes, {size['rows']} tokens, a "
        f"student of {size['hidden']} and a teacher of {size['hidden'] + 8} features -> {size['classes']} classes, "
        "value and the student's gradients against the composition in fp64\n"
    )
    jobs = [*itertools.product([*optim_cases, *muon_cases], dtypes), *itertools.product(loss_cases, dtypes)]
    jobs += itertools.product(linear_cases, dtypes)
    jobs += itertools.product(distillation_cases, dtypes)
    start = time.perf_counter()
    results = []
    with warnings.catch_warnings():
        # The interpreter evaluates masked-off lanes too (inf - inf there is harmless).
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.")
        for done, (case, dtype) in enumerate(jobs, 1):
            try:
                if isinstance(case, OptimCase):
                    result = optimizer_result(case, dtype, device, shapes, args.steps)
                elif isinstance(case, LinearCECase):
                    result = testing.compare_linear_cross_entropy(
                        case, dtype, device, size["rows"], size["hidden"], size["classes"],
                        chunk_rows=size["chunk_rows"],
                    )  # fmt: skip
                elif isinstance(case, DistillationCase):
                    result = testing.compare_linear_distillation(
                        case, dtype, device, size["rows"], size["hidden"], size["classes"]
                    )
                else:
                    result = testing.compare_loss(case, dtype, device, size["rows"], size["classes"])
            except Exception as e:
                result = failed_result(case, dtype, args.steps)
                result.error = common.short_error(e)
            results.append(result)
            if not args.no_progress:
                common.progress("fusedopt check", done, len(jobs), start, f"{result.name} {result.dtype}")
    return report(results, dtypes, time.perf_counter() - start, env, args.out)


def failed_result(case, dtype: torch.dtype, steps: int) -> Result:
    """The row of a case whose run raised."""
    dtype_name = common.DTYPE_NAMES[dtype]
    if isinstance(case, OptimCase):
        result = Result("optimizer", case.fused_cls.__name__, describe(case.kwargs), dtype_name)
        result.steps = steps
        return result
    if isinstance(case, LinearCECase):
        return Result("linear_ce", case.name, case.options, dtype_name)
    if isinstance(case, DistillationCase):
        return Result("distillation", case.name, case.options, dtype_name)
    return Result("loss", case.name, describe(case.kwargs, "weight" if case.weighted else ""), dtype_name)


def tolerance_text(table: dict, dtypes: list[torch.dtype]) -> str:
    parts = []
    for dt in dtypes:
        tol, name = table[dt], common.DTYPE_NAMES[dt]
        if "torch" in tol:
            parts.append(
                f"{name}: {tol['torch']:g}·max|torch in {name} - torch| + {tol['rtol']:.3g}·max|torch|"
            )
        elif "ulps" in tol:
            atol = f" + {tol['atol']:g}" if "atol" in tol else ""
            parts.append(f"{name}: {tol['ulps']:g} rounding step(s) of the dtype + 8·2⁻²⁴·max|torch|{atol}")
        elif "atol" in tol:
            parts.append(f"{name}: rtol {tol['rtol']:g}, atol {tol['atol']:g}")
        else:
            parts.append(f"{name}: rtol {tol['rtol']:g}, atol rtol·max|torch|")
    return "; ".join(parts)


def report(results: list[Result], dtypes: list[torch.dtype], elapsed: float, env: dict, out: str) -> int:
    """A table per kind with its tolerances, a line per case that did not pass, the CSV and PNG,
    the verdict; 0 if every case passed."""
    order = {k: i for i, k in enumerate(ERROR_ORDER)}  # then any other state key alphabetically
    errors = sorted({k for r in results for k in r.errors}, key=lambda k: (order.get(k, len(order)), k))
    log = common.CsvLog(out, "check", env, [*env, *FIELDS, *errors, "ratio", "verdict", "worst", "notes"])
    rows = []
    for r in results:
        row = {k: getattr(r, k) for k in FIELDS} | r.errors
        row.update(ratio=None if r.error else r.ratio, verdict=r.verdict, worst=r.worst)
        row["notes"] = "; ".join([*r.notes, *([r.error] if r.error else [])])
        log.writerow(env | row)
        rows.append(row)
    log.file.close()
    panels = []
    for kind, (plural, what, table) in KINDS.items():
        mine = [row for row in rows if row["kind"] == kind]
        if not mine:
            continue
        columns = [("name", kind, ""), ("options", "options", ""), ("dtype", "dtype", "")]
        columns += [("steps", "steps", "d"), ("shape", "input", "")]
        columns += [(k, "params" if k == "param" else k, ".1e") for k in errors]
        columns += [("ratio", "err/tol", ".2f"), ("verdict", "verdict", "")]
        print(common.table_text(mine, columns))
        muon = (
            f"; FusedMuon's Muon-group params (bf16 Newton-Schulz noise): {tolerance_text(MUON_TOLERANCE, dtypes)}"
            if any(row["name"] == "FusedMuon" for row in mine)
            else ""
        )
        print(
            f"columns: max|ours - torch| / max|torch| {what}.\ntolerance: {tolerance_text(table, dtypes)}{muon}\n"
        )
        bars = [(f"{row['name']} {row['options']}", row["dtype"], row["ratio"]) for row in mine]
        title = f"{plural}: the largest element error / what the tolerance allows there, {env['gpu']}"
        panels.append((title, "err/tol (<= 1 passes)", bars, (1.0, "tolerance")))
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
