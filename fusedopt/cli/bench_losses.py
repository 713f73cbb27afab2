"""Loss suite of ``python -m fusedopt bench``: forward + backward of the fused losses.

Each row times ``torch.autograd.grad(loss(input, ...), input)`` (so no implementation pays for
accumulating into ``.grad``) for fusedopt's op, torch's eager op and ``torch.compile`` of
torch's op, and the peak memory above the inputs. ``bytes_per_elt`` is the byte floor of the
op (``fusedopt.floors.LOSSES``: what any implementation must read and write), the same for
every implementation, so GB/s compares time directly; ``impl_bytes_per_elt`` is what each
implementation moves by the tables in ``fusedopt/losses.py`` and ``fusedopt/cross_entropy.py``
(fp32; scaled by the element size).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fusedopt import floors
from fusedopt import functional as FF
from fusedopt.cli import common

TITLE = "loss forward + backward, every row"
HEADERS = ("loss", "shape")
FLOOR_TITLE = (
    "byte floor of loss forward + backward (mean: read x; pointwise: read x, y, write dx; "
    "cross-entropy: read z, write dz)"
)
IMPLS = ("fusedopt", "torch-eager", "torch-compile")


@dataclass(frozen=True)
class LossBench:
    """One benchmarked loss and shape; ``impl_fp32``: the bytes each implementation moves per
    fp32 element (the byte floor is ``fusedopt.floors.LOSSES[op]``)."""

    op: str  # the name in fusedopt.functional and torch.nn.functional (torch.mean for "mean")
    inputs: str  # "reduce", "regression" or "classification"
    shape: tuple[int, ...]
    smoke_shape: tuple[int, ...]
    impl_fp32: dict[str, int] = field(default_factory=dict)


_N = 64 * 2**20
_MEAN = {"fusedopt": 4, "torch-eager": 8, "torch-compile": 8}
_POINTWISE = {"fusedopt": 12, "torch-eager": 36, "torch-compile": 20}
_CE = {"fusedopt": 12, "torch-eager": 24, "torch-compile": 16}
LOSSES: dict[str, LossBench] = {
    "mean-64m": LossBench("mean", "reduce", (_N,), (1000,), _MEAN),
    "mse-64m": LossBench("mse_loss", "regression", (_N,), (1000,), _POINTWISE),
    "l1-64m": LossBench("l1_loss", "regression", (_N,), (1000,), _POINTWISE),
    "smooth_l1-64m": LossBench("smooth_l1_loss", "regression", (_N,), (1000,), _POINTWISE),
    "huber-64m": LossBench("huber_loss", "regression", (_N,), (1000,), _POINTWISE),
    "ce-8192x50257": LossBench("cross_entropy", "classification", (8192, 50257), (8, 129), _CE),
    "ce-4096x128256": LossBench("cross_entropy", "classification", (4096, 128256), (8, 257), _CE),
}


def torch_op(op: str) -> Callable[..., torch.Tensor]:
    return torch.mean if op == "mean" else getattr(F, op)


def loss_fn(op: str, impl: str, compile_backend: str) -> Callable[..., torch.Tensor]:
    if impl == "fusedopt":
        return getattr(FF, op)
    if impl == "torch-compile":
        torch.compiler.reset()
        return torch.compile(torch_op(op), backend=compile_backend)
    return torch_op(op)


@dataclass(frozen=True)
class Case:
    """One row: a loss and shape, a dtype, an implementation."""

    loss: str
    dtype: str
    impl: str
    smoke: bool

    @property
    def spec(self) -> LossBench:
        return LOSSES[self.loss]

    def shape(self) -> tuple[int, ...]:
        return self.spec.smoke_shape if self.smoke else self.spec.shape

    def base_row(self) -> dict:
        spec, dtype = self.spec, common.DTYPES[self.dtype]
        numel = math.prod(self.shape())
        per_elt = floors.LOSSES[spec.op].bytes_per_element(dtype)
        return {
            "suite": "losses",
            "case": spec.op,
            "impl": self.impl,
            "layout": "x".join(
                f"{n >> 20}M" if n >= 2**20 and n % 2**20 == 0 else str(n) for n in self.shape()
            ),
            "dtype": self.dtype,
            "tensors": 1,
            "numel": numel,
            "bytes_per_elt": per_elt,
            "bytes": per_elt * numel,
            "impl_bytes_per_elt": spec.impl_fp32.get(self.impl, 0) * dtype.itemsize // 4 or None,
        }

    def run(self, ctx) -> dict:
        """Forward + backward timed (or, in a smoke run, only run) and its peak memory."""
        try:
            return _measure(self, ctx)
        finally:
            ctx.release()  # the inputs are gone by now


def cases(args, ctx) -> list[Case]:
    """Every row, compiled ones last (slow to compile)."""
    impls = [i for i in IMPLS if i in args.impls]
    eager = [i for i in impls if i != "torch-compile"]
    out = [Case(name, d, i, ctx.tiny) for name in args.losses for d in args.dtypes for i in eager]
    if "torch-compile" in impls:
        out += [Case(name, d, "torch-compile", ctx.tiny) for name in args.losses for d in args.dtypes]
    return out


def make_inputs(case: Case, device: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The differentiated input (requires grad) and the other arguments."""
    dtype, shape = common.DTYPES[case.dtype], case.shape()
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, device=device, dtype=dtype, generator=gen).requires_grad_()
    if case.spec.inputs == "reduce":
        return x, []
    if case.spec.inputs == "regression":
        return x, [torch.randn(shape, device=device, dtype=dtype, generator=gen)]
    return x, [torch.randint(0, shape[1], (shape[0],), device=device, generator=gen)]


def _measure(case: Case, ctx) -> dict:
    row = case.base_row()
    x, rest = make_inputs(case, ctx.device)
    fn = loss_fn(case.spec.op, case.impl, ctx.compile_backend)

    def step():
        return torch.autograd.grad(fn(x, *rest), x)

    step()  # compile / warm up
    row.update(ctx.measure(step))
    return row


def floor_rows(args) -> list[dict]:
    rows = []
    for name in args.losses:
        for d in args.dtypes:
            row = Case(name, d, "fusedopt", smoke=False).base_row()
            rows.append({**row, "impl": None, "impl_bytes_per_elt": None, "tensors": None})
    return rows
