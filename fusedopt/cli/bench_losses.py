"""Loss suite of ``python -m fusedopt bench``: forward + backward of the fused losses.

Each row times ``torch.autograd.grad(loss(input, ...), input)`` (so no implementation pays for
accumulating into ``.grad``) for fusedopt's op, torch's eager op and ``torch.compile`` of
torch's op, and the peak memory above the inputs. ``bytes_per_elt`` is the byte floor of the
op (what any implementation must read and write), the same for every implementation, so GB/s
compares time directly; ``impl_bytes_per_elt`` is what each implementation moves by the tables
in ``fusedopt/losses.py`` and ``fusedopt/cross_entropy.py`` (fp32; scaled by the element size).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fusedopt import functional as FF
from fusedopt.cli import common

IMPLS = ("fusedopt", "torch-eager", "torch-compile")


@dataclass(frozen=True)
class LossBench:
    """One benchmarked loss and shape.

    Byte floors per input element, fp32, ``reduction="mean"``, ``grad_output`` 1:
    ``mean``: read x (4); its gradient is ``grad / N`` expanded, no memory.
    Pointwise losses: read x and target (8), write dx (4): 12.
    Cross-entropy, per logit: read z (4), write dz (4): 8.
    """

    op: str  # the name in fusedopt.functional and torch.nn.functional (torch.mean for "mean")
    inputs: str  # "reduce", "regression" or "classification"
    shape: tuple[int, ...]
    smoke_shape: tuple[int, ...]
    floor_fp32: int
    impl_fp32: dict[str, int] = field(default_factory=dict)


_POINTWISE = {"fusedopt": 12, "torch-eager": 36, "torch-compile": 20}
_N = 64 * 2**20
LOSSES: dict[str, LossBench] = {
    "mean-64m": LossBench(
        "mean", "reduce", (_N,), (1000,), 4, {"fusedopt": 4, "torch-eager": 8, "torch-compile": 8}
    ),
    "mse-64m": LossBench("mse_loss", "regression", (_N,), (1000,), 12, _POINTWISE),
    "l1-64m": LossBench("l1_loss", "regression", (_N,), (1000,), 12, _POINTWISE),
    "smooth_l1-64m": LossBench("smooth_l1_loss", "regression", (_N,), (1000,), 12, _POINTWISE),
    "huber-64m": LossBench("huber_loss", "regression", (_N,), (1000,), 12, _POINTWISE),
    "ce-8192x50257": LossBench(
        "cross_entropy",
        "classification",
        (8192, 50257),
        (8, 129),
        8,
        {"fusedopt": 12, "torch-eager": 24, "torch-compile": 16},
    ),
    "ce-4096x128256": LossBench(
        "cross_entropy",
        "classification",
        (4096, 128256),
        (8, 257),
        8,
        {"fusedopt": 12, "torch-eager": 24, "torch-compile": 16},
    ),
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
        per_elt = spec.floor_fp32 * dtype.itemsize // 4  # the fp32 floors are multiples of 4
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


def cases(losses: list[str], dtypes: list[str], impls: list[str], smoke: bool) -> list[Case]:
    """Every row, compiled ones last (slow to compile)."""
    eager = [i for i in impls if i != "torch-compile"]
    out = [Case(name, d, i, smoke) for name in losses for d in dtypes for i in eager]
    if "torch-compile" in impls:
        out += [Case(name, d, "torch-compile", smoke) for name in losses for d in dtypes]
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


def run_case(case: Case, ctx) -> dict:
    """One row: forward + backward timed (or, in a smoke run, only run) and its peak memory."""
    try:
        return _measure(case, ctx)
    finally:
        ctx.release()  # the inputs are gone by now


def _measure(case: Case, ctx) -> dict:
    row = case.base_row()
    x, rest = make_inputs(case, ctx.device)
    fn = loss_fn(case.spec.op, case.impl, ctx.compile_backend)

    def step():
        return torch.autograd.grad(fn(x, *rest), x)

    step()  # compile / warm up
    row.update(ctx.measure(step))
    return row


def byte_floor_rows(losses: list[str], dtypes: list[str]) -> list[dict]:
    rows = []
    for name in losses:
        for d in dtypes:
            row = Case(name, d, "fusedopt", smoke=False).base_row()
            row["mb"] = row["bytes"] / 1e6
            rows.append(row)
    return rows


BYTE_FLOOR_COLUMNS = [
    ("case", "loss", ""),
    ("layout", "shape", ""),
    ("dtype", "dtype", ""),
    ("numel", "elements", ","),
    ("bytes_per_elt", "B/elt", "d"),
    ("mb", "MB", ".1f"),
]
