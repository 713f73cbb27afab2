"""``python -m fusedopt check``: fusedopt against torch on this machine, with verdicts.

Optimizers: every case of ``OPTIM_CASES`` steps a GPT-shaped list of params (embedding,
per-layer LayerNorm, attention and MLP matrices and biases, a 0-d scalar) for ``--steps``
steps, beside the matching ``torch.optim`` class (for-loop path, ``foreach=False``) fed the
same grads. fp32/fp64 are compared with torch on the same tensors; bf16/fp16 with "torch in
fp32, params and state rounded to the dtype after every step". Every param and every state
tensor is compared, ``step`` exactly.

Losses: every case of ``LOSS_CASES`` runs the ``fusedopt.functional`` op and the
``torch.nn.functional`` op (in fp32 for bf16/fp16, the result rounded) on the same inputs;
the value and the gradient of the input are compared.

The cases, the runners and the verdict (the tolerance contract of ``fusedopt.tolerance``) are
:mod:`fusedopt.testing`'s, shared with the tests; ``OPTIM_CASES`` and ``LOSS_CASES`` here are
those plain lists: a test (or a user) can append a case, e.g. a broken optimizer, and see it
flagged.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from dataclasses import dataclass

import torch

import fusedopt
from fusedopt import testing
from fusedopt.cli import common
from fusedopt.cli.check_report import report
from fusedopt.testing import OptimCase, Result, compare_loss, compare_optimizer, describe, gpt_shapes

# The registries: testing's lists themselves, so appending a case here checks it.
OPTIM_CASES: list[OptimCase] = testing.OPTIM_CASES
LOSS_CASES: list[testing.LossCase] = testing.LOSS_CASES


@dataclass(frozen=True)
class Sizes:
    width: int  # d_model of the GPT-shaped param list
    layers: int
    vocab: int
    rows: int  # loss inputs: rows x classes (regression inputs have the same shape)
    classes: int


SIZES = {
    # CPU: the kernels run in the interpreter; 28 tensors (~9k elements, ragged blocks) and
    # 33 x 1000 loss inputs keep the whole check near half a minute on two cores.
    "cpu": Sizes(width=16, layers=2, vocab=97, rows=33, classes=1000),
    # CUDA: ~5.2M elements (the optimizers' large-block launch), GPT-2's vocabulary for the losses.
    "cuda": Sizes(width=256, layers=4, vocab=8191, rows=256, classes=50257),
}


def optimizer_result(case: OptimCase, dtype: torch.dtype, device: str, sizes: Sizes, steps: int, seed: int):
    """``case`` on the GPT-shaped params, random grads every step."""
    shapes = gpt_shapes(sizes.width, sizes.layers, sizes.vocab)
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(dtype).to(device) for _, s in shapes]

    def grads(ps: list[torch.Tensor], step: int) -> list[torch.Tensor]:
        return [torch.randn(p.shape, generator=gen).to(device=device, dtype=dtype) for p in ps]

    return compare_optimizer(case, params, grads, steps, names=[n for n, _ in shapes])


# Command --------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    groups = list(dict.fromkeys(c.group for c in OPTIM_CASES))
    losses = list(dict.fromkeys(c.name for c in LOSS_CASES))
    parser.add_argument(
        "--optimizers",
        nargs="*",
        metavar="NAME",
        help=f"optimizers to check, from: {', '.join(groups)} (default: all; none given: skip them)",
    )
    parser.add_argument(
        "--losses",
        nargs="*",
        metavar="NAME",
        help=f"losses to check, from: {', '.join(losses)} (default: all; none given: skip them)",
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=list(common.DTYPES),
        default=["fp32", "bf16"],
        metavar="NAME",
        help=f"param and input dtypes, from: {', '.join(common.DTYPES)} (default: fp32 bf16)",
    )
    parser.add_argument(
        "--steps", type=int, default=5, metavar="N", help="optimizer steps per case (default: 5)"
    )
    cpu, cuda = SIZES["cpu"], SIZES["cuda"]
    for flag, what in (
        ("width", "d_model of the GPT-shaped params"),
        ("layers", "transformer blocks of the GPT-shaped params"),
        ("vocab", "rows of its embedding matrix"),
        ("rows", "rows of the loss inputs"),
        ("classes", "columns of the loss inputs (cross-entropy classes)"),
    ):
        parser.add_argument(
            f"--{flag}",
            type=int,
            metavar="N",
            help=f"{what} (default: {getattr(cpu, flag)} on CPU, {getattr(cuda, flag)} with CUDA)",
        )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def selected(requested: list[str] | None, available: list[str], what: str) -> list[str]:
    if requested is None:
        return available
    unknown = sorted(set(requested) - set(available))
    if unknown:
        raise SystemExit(f"fusedopt check: unknown {what} {unknown}; choose from {available}")
    return requested


def run(args: argparse.Namespace) -> int:
    """Run the selected cases, print both tables and the verdict; 0 if every case passed."""
    device = common.default_device()
    base = SIZES[device]
    sizes = Sizes(
        **{k: getattr(args, k) if getattr(args, k) is not None else v for k, v in vars(base).items()}
    )
    groups = selected(args.optimizers, list(dict.fromkeys(c.group for c in OPTIM_CASES)), "optimizers")
    names = selected(args.losses, list(dict.fromkeys(c.name for c in LOSS_CASES)), "losses")
    dtypes = [common.DTYPES[d] for d in args.dtypes]
    optim_cases = [c for c in OPTIM_CASES if c.group in groups]
    loss_cases = [c for c in LOSS_CASES if c.name in names]
    shapes = gpt_shapes(sizes.width, sizes.layers, sizes.vocab)
    numel = sum(math.prod(s) for _, s in shapes)

    env = common.environment()
    print(
        f"fusedopt {fusedopt.__version__} check: torch {env['torch']}, triton {env['triton']}, {env['timestamp_utc']}"
    )
    where = env["gpu"] + (f" (CUDA {env['cuda']})" if env["cuda"] else " (no CUDA GPU)")
    print(f"device: {where}: {common.kernel_path(device)}")
    if warning := common.interpreter_warning():
        print(warning)
    print(
        f"optimizers: {len(optim_cases)} option sets x {len(dtypes)} dtypes, {args.steps} steps on a GPT-shaped "
        f"param list ({len(shapes)} tensors, {numel:,} elements: d={sizes.width}, {sizes.layers} layers, "
        f"vocab {sizes.vocab}, a 0-d scalar), against torch.optim's for-loop path (foreach=False)"
    )
    print(
        f"losses: {len(loss_cases)} cases x {len(dtypes)} dtypes, inputs {sizes.rows}x{sizes.classes}, "
        "value and input gradient against torch.nn.functional"
    )
    print()

    progress = common.Progress(
        (len(optim_cases) + len(loss_cases)) * len(dtypes), "fusedopt check", not args.no_progress
    )
    start = time.perf_counter()
    optim_results: list[Result] = []
    loss_results: list[Result] = []
    with warnings.catch_warnings():
        # The interpreter evaluates masked-off lanes too (inf - inf there is harmless).
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.")
        for case in optim_cases:
            for dtype in dtypes:
                try:
                    result = optimizer_result(case, dtype, device, sizes, args.steps, args.seed)
                except Exception as e:
                    name = case.fused_cls.__name__
                    result = Result(
                        "optimizer", name, describe(case.kwargs), common.DTYPE_NAMES[dtype], args.steps
                    )
                    result.error = common.short_error(e)
                optim_results.append(result)
                progress.advance(f"{result.name} {result.dtype}")
        for case in loss_cases:
            for dtype in dtypes:
                try:
                    result = compare_loss(case, dtype, device, sizes.rows, sizes.classes, args.seed)
                except Exception as e:
                    extra = "weight" if case.weighted else ""
                    result = Result(
                        "loss", case.name, describe(case.kwargs, extra), common.DTYPE_NAMES[dtype]
                    )
                    result.error = common.short_error(e)
                loss_results.append(result)
                progress.advance(f"{case.name} {result.dtype}")
    elapsed = time.perf_counter() - start
    return report(optim_results, loss_results, dtypes, elapsed)
