"""Suite ``losses`` of ``python -m fusedopt bench``: ``torch.autograd.grad(loss(input, ...), input)``
for fusedopt's op, torch's and ``torch.compile`` of torch's (``fusedopt.testing.LOSS_CASES``).
``bytes_per_elt``: the op's floor (``fusedopt.floors.LOSSES``); ``impl_bytes_per_elt``: what each
implementation moves.
"""

from __future__ import annotations

import functools
import math

import torch

from fusedopt import floors, testing
from fusedopt.cli.common import DTYPES, Job, Suite, compiled

TITLE = "loss forward + backward, every row"
FLOOR_TITLE = (
    "byte floor of loss forward + backward (mean: read x; pointwise: read x, y, write dx; "
    "cross-entropy: read z, write dz)"
)
IMPLS = ("fusedopt", "torch-eager", "torch-compile")
_N = 64 * 2**20
LOSSES = {  # name: (op, shape, smoke shape)
    "mean-64m": ("mean", (_N,), (1000,)),
    "mse-64m": ("mse_loss", (_N,), (1000,)),
    "l1-64m": ("l1_loss", (_N,), (1000,)),
    "smooth_l1-64m": ("smooth_l1_loss", (_N,), (1000,)),
    "huber-64m": ("huber_loss", (_N,), (1000,)),
    "ce-8192x50257": ("cross_entropy", (8192, 50257), (8, 129)),
    "ce-4096x128256": ("cross_entropy", (4096, 128256), (8, 257)),
}
POINTWISE = ["mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss"]
IMPL_BYTES_FP32 = {  # op: bytes per fp32 element each implementation moves (scaled by the element size)
    "mean": {"fusedopt": 4, "torch-eager": 8, "torch-compile": 8},
    **{op: {"fusedopt": 12, "torch-eager": 36, "torch-compile": 20} for op in POINTWISE},
    "cross_entropy": {"fusedopt": 12, "torch-eager": 24, "torch-compile": 16},
}


def base_row(name: str, dtype: str, impl: str | None, smoke: bool) -> dict:
    op, shape, smoke_shape = LOSSES[name]
    shape = smoke_shape if smoke else shape
    numel, itemsize = math.prod(shape), DTYPES[dtype].itemsize
    per_elt = floors.LOSSES[op].bytes_per_element(DTYPES[dtype])
    layout = "x".join(f"{n >> 20}M" if n >= 2**20 and n % 2**20 == 0 else str(n) for n in shape)
    row = {"suite": "losses", "case": op, "impl": impl, "layout": layout, "dtype": dtype}
    row.update(tensors=1, numel=numel, bytes_per_elt=per_elt, bytes=per_elt * numel)
    impl_fp32 = IMPL_BYTES_FP32[op].get(impl)
    return {**row, "impl_bytes_per_elt": impl_fp32 * itemsize // 4 if impl_fp32 else None}


def time_loss(name: str, dtype: str, impl: str, ctx) -> dict:
    """Forward + backward timed (a smoke run: only run) and its peak memory."""
    op, shape, smoke_shape = LOSSES[name]
    case = next(c for c in testing.LOSS_CASES if c.name == op)
    shape = smoke_shape if ctx.tiny else shape
    gen = torch.Generator(ctx.device).manual_seed(0)
    x = torch.randn(shape, device=ctx.device, dtype=DTYPES[dtype], generator=gen).requires_grad_()
    if case.inputs == "reduce":
        rest = []
    elif case.inputs == "regression":
        rest = [torch.randn(shape, device=ctx.device, dtype=x.dtype, generator=gen)]
    else:  # classification
        rest = [torch.randint(0, shape[1], (shape[0],), device=ctx.device, generator=gen)]
    fn = case.fused if impl == "fusedopt" else case.reference
    if impl == "torch-compile":
        fn = compiled(fn, ctx.compile_backend)

    def step():
        return torch.autograd.grad(fn(x, *rest), x)

    step()  # compile / warm up
    return ctx.measure(step)


def jobs(args, ctx) -> list[Job]:
    impls = [i for i in IMPLS if i in args.impls]
    keys = [(name, d, i) for name in args.losses for d in args.dtypes for i in impls]
    return [(base_row(*key, ctx.tiny), functools.partial(time_loss, *key)) for key in keys]


def floor_rows(args) -> list[dict]:
    rows = [base_row(name, d, None, smoke=False) for name in args.losses for d in args.dtypes]
    return [{**row, "tensors": None} for row in rows]


SUITE = Suite(TITLE, ("loss", "shape"), IMPLS, jobs, FLOOR_TITLE, floor_rows)
