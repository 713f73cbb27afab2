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

The verdict is the tolerance contract of ``fusedopt.tolerance``. Both registries are plain
lists: a test (or a user) can append a case, e.g. a broken optimizer, and see it flagged.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch
import torch.nn.functional as F

import fusedopt
from fusedopt import functional as FF
from fusedopt.cli import common
from fusedopt.cli.check_report import report
from fusedopt.cli.check_runner import (
    SIZES,
    LossCase,
    OptimCase,
    Result,
    Sizes,
    describe,
    model_shapes,
    run_loss_case,
    run_optim_case,
)

# Registries -----------------------------------------------------------------------------------

OPTIM_CASES: list[OptimCase] = [
    OptimCase("sgd", fusedopt.FusedSGD, torch.optim.SGD, dict(lr=0.1, weight_decay=0.1)),
    OptimCase("sgd", fusedopt.FusedSGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    OptimCase(
        "sgd",
        fusedopt.FusedSGD,
        torch.optim.SGD,
        dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    ),
    OptimCase(
        "sgd",
        fusedopt.FusedSGD,
        torch.optim.SGD,
        dict(lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.1, maximize=True),
    ),
    OptimCase("adam", fusedopt.FusedAdam, torch.optim.Adam, dict(lr=0.01)),
    OptimCase("adam", fusedopt.FusedAdam, torch.optim.Adam, dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
    OptimCase(
        "adam", fusedopt.FusedAdam, torch.optim.Adam, dict(lr=0.01, betas=(0.8, 0.9), eps=1e-3, maximize=True)
    ),
    OptimCase(
        "adam",
        fusedopt.FusedAdam,
        torch.optim.Adam,
        dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
    ),
    OptimCase("adamw", fusedopt.FusedAdamW, torch.optim.AdamW, dict(lr=0.01)),
    OptimCase(
        "adamw",
        fusedopt.FusedAdamW,
        torch.optim.AdamW,
        dict(lr=0.01, weight_decay=0.5, amsgrad=True, maximize=True),
    ),
    OptimCase("rmsprop", fusedopt.FusedRMSprop, torch.optim.RMSprop, dict(lr=0.01, weight_decay=0.1)),
    OptimCase(
        "rmsprop",
        fusedopt.FusedRMSprop,
        torch.optim.RMSprop,
        dict(lr=0.01, alpha=0.9, momentum=0.5, centered=True, maximize=True),
    ),
    OptimCase("adagrad", fusedopt.FusedAdagrad, torch.optim.Adagrad, dict(lr=0.05, lr_decay=0.01)),
    OptimCase(
        "adagrad",
        fusedopt.FusedAdagrad,
        torch.optim.Adagrad,
        dict(lr=0.05, initial_accumulator_value=0.1, weight_decay=0.1, maximize=True),
    ),
    # fusedopt's max_grad_norm against torch's clip_grad_norm_(params, max_norm) before the step.
    OptimCase("sgd", fusedopt.FusedSGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, max_grad_norm=1.0)),
    OptimCase("adamw", fusedopt.FusedAdamW, torch.optim.AdamW, dict(lr=0.01, max_grad_norm=1.0)),
]

LOSS_CASES: list[LossCase] = [
    LossCase("mean", FF.mean, torch.mean, "reduce"),
    LossCase("mean", FF.mean, torch.mean, "reduce", dict(dim=-1)),
    LossCase("mse_loss", FF.mse_loss, F.mse_loss, "regression"),
    LossCase("mse_loss", FF.mse_loss, F.mse_loss, "regression", dict(reduction="sum"), grad_output=-1.25),
    LossCase("mse_loss", FF.mse_loss, F.mse_loss, "regression", dict(reduction="none")),
    LossCase("l1_loss", FF.l1_loss, F.l1_loss, "regression"),
    LossCase("smooth_l1_loss", FF.smooth_l1_loss, F.smooth_l1_loss, "regression", dict(beta=0.5)),
    LossCase(
        "huber_loss", FF.huber_loss, F.huber_loss, "regression", dict(delta=0.5, reduction="sum"), -1.25
    ),
    LossCase("cross_entropy", FF.cross_entropy, F.cross_entropy, "classification"),
    LossCase(
        "cross_entropy",
        FF.cross_entropy,
        F.cross_entropy,
        "classification",
        dict(label_smoothing=0.1, ignore_index=3),
        grad_output=-1.25,
    ),
    LossCase(
        "cross_entropy",
        FF.cross_entropy,
        F.cross_entropy,
        "classification",
        dict(reduction="none"),
        weighted=True,
    ),
]


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
    shapes = model_shapes(sizes.width, sizes.layers, sizes.vocab)
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
                    result = run_optim_case(case, dtype, device, sizes, args.steps, args.seed)
                except Exception as e:
                    result = Result("optimizer", case.name, describe(case.kwargs), common.DTYPE_NAMES[dtype])
                    result.steps, result.error = args.steps, common.short_error(e)
                optim_results.append(result)
                progress.advance(f"{case.name} {result.dtype}")
        for case in loss_cases:
            for dtype in dtypes:
                try:
                    result = run_loss_case(case, dtype, device, sizes, args.seed)
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
