"""One case of ``fusedopt check``, run: the case types (:class:`OptimCase`, :class:`LossCase`),
the sizes and the GPT-shaped param list, :class:`Result` (the comparison with torch against the
tolerance contract of ``fusedopt.tolerance``) and the runners :func:`run_optim_case` and
:func:`run_loss_case`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fusedopt.cli import common
from fusedopt.tolerance import LOSS_TOLERANCE, OPTIM_TOLERANCE, allowed_error, round_to_storage_

LOW_PRECISION = (torch.bfloat16, torch.float16)


# Cases ----------------------------------------------------------------------------------------


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
    if low:  # state torch creates in its constructor (Adagrad's sum) is stored in the dtype too
        round_to_storage_(ref, theirs, dtype)
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
