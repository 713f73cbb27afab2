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
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import fusedopt
from fusedopt import functional as FF
from fusedopt.cli import common
from fusedopt.tolerance import LOSS_TOLERANCE, OPTIM_TOLERANCE, allowed_error, round_to_storage_

LOW_PRECISION = (torch.bfloat16, torch.float16)


# Registries -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimCase:
    """A fused optimizer and the torch.optim class it must match, with one set of options."""

    group: str  # the name ``--optimizers`` selects it by
    fused_cls: type[torch.optim.Optimizer]
    torch_cls: type[torch.optim.Optimizer]
    kwargs: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.fused_cls.__name__


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
    # fusedopt's max_grad_norm against torch's clip_grad_norm_(params, max_norm) before the step.
    OptimCase("sgd", fusedopt.FusedSGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, max_grad_norm=1.0)),
    OptimCase("adamw", fusedopt.FusedAdamW, torch.optim.AdamW, dict(lr=0.01, max_grad_norm=1.0)),
]


@dataclass(frozen=True)
class LossCase:
    """A fused op and torch's, with one set of options.

    ``inputs``: ``"reduce"`` (one float matrix), ``"regression"`` (input and target matrices) or
    ``"classification"`` (logits and class indices; ``weighted`` adds a class weight). A 0-d
    result is back-propagated with ``grad_output``, any other with a random tensor.
    """

    name: str
    fused: Callable[..., torch.Tensor]
    reference: Callable[..., torch.Tensor]
    inputs: str
    kwargs: dict = field(default_factory=dict)
    grad_output: float = 1.0
    weighted: bool = False


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

SHORT = {"momentum": "mom", "dampening": "damp", "weight_decay": "wd", "decoupled_weight_decay": "decoupled"}


def describe(kwargs: dict, extra: str = "") -> str:
    """Options in a few characters: ``lr=0.1 mom=0.9 nesterov wd=0.01``."""
    parts = []
    for k, v in kwargs.items():
        k = SHORT.get(k, k)
        parts.append(k if v is True else f"{k}={tuple(v) if isinstance(v, list) else v}")
    return " ".join([*parts, extra]).strip() or "defaults"


# Sizes ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    width: int  # d_model of the GPT-shaped param list
    layers: int
    vocab: int
    rows: int  # loss inputs: rows x classes (regression inputs have the same shape)
    classes: int


SIZES = {
    # CPU: the kernels run in the interpreter; 28 tensors (~9k elements, ragged blocks) and
    # 33 x 1000 loss inputs keep the whole check near a minute on two cores.
    "cpu": Sizes(width=16, layers=2, vocab=97, rows=33, classes=1000),
    # CUDA: ~5.2M elements (the optimizers' large-block launch), GPT-2's vocabulary for the losses.
    "cuda": Sizes(width=256, layers=4, vocab=8191, rows=256, classes=50257),
}


def model_shapes(width: int, layers: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a small GPT's params (torch ``nn.Linear`` layout: out x in)."""
    d = width
    shapes: list[tuple[str, tuple[int, ...]]] = [("wte", (vocab, d))]
    for i in range(layers):
        h = f"h.{i}."
        shapes += [
            (h + "ln_1.weight", (d,)),
            (h + "ln_1.bias", (d,)),
            (h + "attn.qkv.weight", (3 * d, d)),
            (h + "attn.qkv.bias", (3 * d,)),
            (h + "attn.proj.weight", (d, d)),
            (h + "attn.proj.bias", (d,)),
            (h + "ln_2.weight", (d,)),
            (h + "ln_2.bias", (d,)),
            (h + "mlp.fc.weight", (4 * d, d)),
            (h + "mlp.fc.bias", (4 * d,)),
            (h + "mlp.proj.weight", (d, 4 * d)),
            (h + "mlp.proj.bias", (d,)),
        ]
    return [*shapes, ("ln_f.weight", (d,)), ("ln_f.bias", (d,)), ("logit_scale", ())]


# Comparison -----------------------------------------------------------------------------------


@dataclass
class Result:
    """One case in one dtype: the largest relative error of each compared tensor kind."""

    kind: str  # "optimizer" or "loss"
    name: str
    options: str
    dtype: str
    steps: int | None = None
    shape: str = ""
    errors: dict[str, float] = field(default_factory=dict)  # kind -> max|a-e| / max|e|
    ratio: float = 0.0  # largest element error / what the tolerance allows there
    worst: str = ""  # where ``ratio`` was reached
    notes: list[str] = field(default_factory=list)  # contract breaches other than values
    error: str = ""  # an exception

    @property
    def verdict(self) -> str:
        if self.error:
            return "ERROR"
        return "PASS" if self.ratio <= 1.0 and not self.notes else "FAIL"

    def compare(
        self, what: str, where: str, actual: torch.Tensor, expected: torch.Tensor, table: dict
    ) -> None:
        """Fold one tensor into the errors of ``what`` and into ``ratio``."""
        if actual.shape != expected.shape:
            self.notes.append(f"{where}: shape {tuple(actual.shape)} vs torch {tuple(expected.shape)}")
            return
        dtype = actual.dtype
        a = actual.detach().cpu().double()
        e = expected.detach().cpu().to(dtype)
        self.errors.setdefault(what, 0.0)
        if a.numel() == 0:
            return
        ed = e.double()
        err = (a - ed).abs()
        nan_a, nan_e = a.isnan(), ed.isnan()
        err = torch.where(nan_a | nan_e, torch.where(nan_a == nan_e, 0.0, math.inf), err)
        scale = float(ed.nan_to_num().abs().max())
        rel = float(err.max()) / scale if scale > 0 else float(err.max())
        self.errors[what] = max(self.errors[what], rel)
        ratios = err / allowed_error(e.nan_to_num(), dtype, table).clamp_min(1e-300)
        i = int(ratios.argmax())
        if float(ratios.flatten()[i]) > self.ratio:
            self.ratio = float(ratios.flatten()[i])
            idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), a.shape)) if a.dim() else ()
            self.worst = (
                f"{where}{list(idx) if idx else ''}: {a.flatten()[i].item():.9g} vs torch "
                f"{ed.flatten()[i].item():.9g}"
            )


def run_optim_case(case: OptimCase, dtype: torch.dtype, device: str, sizes: Sizes, steps: int, seed: int):
    """``steps`` steps of ``case`` and of torch on the same params and grads; the comparison."""
    result = Result("optimizer", case.name, describe(case.kwargs), common.DTYPE_NAMES[dtype], steps)
    shapes = model_shapes(sizes.width, sizes.layers, sizes.vocab)
    low = dtype in LOW_PRECISION
    ref_dtype = torch.float32 if low else dtype
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen).to(dtype) for _, s in shapes]
    ours = [t.to(device).clone().requires_grad_() for t in init]
    theirs = [t.to(device, ref_dtype).clone().requires_grad_() for t in init]
    opt = case.fused_cls(ours, **case.kwargs)
    torch_kwargs = {k: v for k, v in case.kwargs.items() if k != "max_grad_norm"}
    ref = case.torch_cls(theirs, foreach=False, **torch_kwargs)
    for _ in range(steps):
        for p, q in zip(ours, theirs, strict=True):
            g = torch.randn(p.shape, generator=gen).to(device=device, dtype=dtype)
            p.grad, q.grad = g, g.to(ref_dtype)
        opt.step()
        if "max_grad_norm" in case.kwargs:
            torch.nn.utils.clip_grad_norm_(theirs, case.kwargs["max_grad_norm"], foreach=False)
        ref.step()
        if low:  # the oracle: torch in fp32, params and state rounded to the dtype after each step
            round_to_storage_(ref, theirs, dtype)
    for (name, _), p, q in zip(shapes, ours, theirs, strict=True):
        result.compare("param", name, p, q, OPTIM_TOLERANCE)
        mine, expected = opt.state[p], ref.state[q]
        if set(mine) != set(expected):
            result.notes.append(f"{name}: state keys {sorted(mine)} vs torch {sorted(expected)}")
        for key in expected:
            if key not in mine:
                continue
            if key == "step":
                if float(mine[key]) != float(expected[key]):
                    result.notes.append(f"{name}: step {float(mine[key])} vs torch {float(expected[key])}")
                continue
            if mine[key].dtype != p.dtype:
                result.notes.append(f"{name}: state[{key}] is {mine[key].dtype}, param {p.dtype}")
            result.compare(key, f"{name} state[{key}]", mine[key], expected[key], OPTIM_TOLERANCE)
    return result


def loss_inputs(case: LossCase, dtype: torch.dtype, device: str, sizes: Sizes, gen: torch.Generator):
    """Positional args (the first one differentiated) and tensor kwargs of one loss case."""
    shape = (sizes.rows, sizes.classes)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    if case.inputs == "reduce":
        return [x], {}
    if case.inputs == "regression":
        return [x, torch.randn(shape, generator=gen).to(device=device, dtype=dtype)], {}
    if case.inputs != "classification":
        raise ValueError(f"unknown inputs {case.inputs!r}")
    target = torch.randint(0, sizes.classes, (sizes.rows,), generator=gen)
    if "ignore_index" in case.kwargs:
        target[::5] = case.kwargs["ignore_index"]
    extra = {}
    if case.weighted:
        extra["weight"] = (torch.rand(sizes.classes, generator=gen) + 0.5).to(device=device, dtype=dtype)
    return [x, target.to(device)], extra


def run_loss_case(case: LossCase, dtype: torch.dtype, device: str, sizes: Sizes, seed: int) -> Result:
    """Value and input gradient of ``case.fused`` against ``case.reference``."""
    extra_name = "weight" if case.weighted else ""
    result = Result("loss", case.name, describe(case.kwargs, extra_name), common.DTYPE_NAMES[dtype])
    gen = torch.Generator().manual_seed(seed)
    args, extra = loss_inputs(case, dtype, device, sizes, gen)
    result.shape = "x".join(str(n) for n in args[0].shape)
    ref_dtype = torch.float32 if dtype in LOW_PRECISION else dtype

    def upcast(t):
        return t.to(ref_dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    x = args[0].clone().requires_grad_()
    xr = upcast(args[0]).clone().requires_grad_()
    ours = case.fused(x, *args[1:], **case.kwargs, **extra)
    theirs = case.reference(
        xr, *map(upcast, args[1:]), **case.kwargs, **{k: upcast(v) for k, v in extra.items()}
    )
    if ours.dim() == 0:
        go = torch.full((), case.grad_output, device=device)
    else:
        go = torch.randn(ours.shape, generator=gen).to(device)
    (grad,) = torch.autograd.grad(ours, x, go.to(ours.dtype))
    (grad_ref,) = torch.autograd.grad(theirs, xr, go.to(theirs.dtype))
    for what, t in (("value", ours), ("grad", grad)):
        if t.dtype != dtype:
            result.notes.append(f"{what} dtype {t.dtype} for {dtype} inputs (torch: {dtype})")
    result.compare("value", "value", ours, theirs, LOSS_TOLERANCE)
    result.compare("grad", "grad", grad, grad_ref, LOSS_TOLERANCE)
    return result


# Report ---------------------------------------------------------------------------------------

STATE_ORDER = ["momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"]


def optimizer_table(results: list[Result]) -> str:
    keys = sorted({k for r in results for k in r.errors if k != "param"}, key=_state_rank)
    columns = [
        ("name", "optimizer", ""),
        ("options", "options", ""),
        ("dtype", "dtype", ""),
        ("steps", "steps", "d"),
        ("param", "params", ".1e"),
        *((k, k, ".1e") for k in keys),
        ("ratio", "err/tol", ".2f"),
        ("verdict", "verdict", ""),
    ]
    return common.table_text([_row(r) for r in results], columns)


def loss_table(results: list[Result]) -> str:
    columns = [
        ("name", "loss", ""),
        ("options", "options", ""),
        ("dtype", "dtype", ""),
        ("shape", "input", ""),
        ("value", "value", ".1e"),
        ("grad", "grad", ".1e"),
        ("ratio", "err/tol", ".2f"),
        ("verdict", "verdict", ""),
    ]
    return common.table_text([_row(r) for r in results], columns)


def _state_rank(key: str) -> tuple[int, str]:
    return (STATE_ORDER.index(key) if key in STATE_ORDER else len(STATE_ORDER), key)


def _row(r: Result) -> dict:
    row = {"name": r.name, "options": r.options, "dtype": r.dtype, "steps": r.steps, "shape": r.shape}
    row.update(r.errors)
    row["ratio"] = None if r.error else r.ratio
    row["verdict"] = r.verdict
    return row


def tolerance_lines(table: dict, dtypes: list[torch.dtype]) -> str:
    parts = []
    for dt in dtypes:
        tol = table[dt]
        name = common.DTYPE_NAMES[dt]
        if "ulps" in tol:
            parts.append(f"{name}: {tol['ulps']:g} rounding step(s) of the dtype + 8·2⁻²⁴·max|torch|")
        elif "atol" in tol:
            parts.append(f"{name}: rtol {tol['rtol']:g}, atol {tol['atol']:g}")
        else:
            parts.append(f"{name}: rtol {tol['rtol']:g}, atol rtol·max|torch|")
    return "; ".join(parts)


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

    if optim_results:
        print(optimizer_table(optim_results))
        print(
            "columns: max|ours - torch| / max|torch| per tensor, the largest over the param list; "
            f"step counters compared exactly.\ntolerance: {tolerance_lines(OPTIM_TOLERANCE, dtypes)}\n"
        )
    if loss_results:
        print(loss_table(loss_results))
        print(
            "columns: max|ours - torch| / max|torch| of the loss value and of the input gradient.\n"
            f"tolerance: {tolerance_lines(LOSS_TOLERANCE, dtypes)}\n"
        )
    print("err/tol: the largest element error divided by what the tolerance allows there (<= 1 passes).")
    results = optim_results + loss_results
    failed = [r for r in results if r.verdict != "PASS"]
    for r in failed:
        detail = r.error or "; ".join([*([f"worst {r.worst}"] if r.ratio > 1 else []), *r.notes[:3]])
        print(f"{r.verdict}: {r.name} ({r.options}) {r.dtype}: {detail}")
    if failed:
        print(f"FAILED: {len(failed)} of {len(results)} checks ({elapsed:.1f}s)")
        return 1
    print(f"OK: all {len(results)} checks within tolerance ({elapsed:.1f}s)")
    return 0
