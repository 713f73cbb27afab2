"""Suite ``losses`` of ``python -m fusedopt bench``: ``torch.autograd.grad(loss(input, ...), input)``
for fusedopt's op, torch's and ``torch.compile`` of torch's (``fusedopt.testing.LOSS_CASES``); the
ops on a linear head: ``torch.autograd.grad(loss, [input, linear_weight])`` of
``fusedopt.functional.linear_cross_entropy`` against the composition
``F.cross_entropy(F.linear(input, linear_weight), target)``, eager and compiled; of
``fusedopt.functional.linear_log_probs`` (log-probs and entropy at temperature 0.7, random
upstream grads of both, as an RL trainer's loss gives them) against ``log_softmax(F.linear(...) /
T)``; and of the fused linear distillation loss (the JSD, β = 0.5, against a teacher head of the
student's shape) against its composition (``linear_distillation_reference``).
``bytes_per_elt``: the op's floor (``fusedopt.floors.LOSSES``); ``impl_bytes_per_elt``: what each
implementation moves (none given for the heads' ops, which are matmul-bound: their rows note
TFLOP/s of ``6 N H V``, the distillation's ``8 N H V``, instead).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from fusedopt import floors, testing
from fusedopt import functional as FF
from fusedopt.cli.common import DTYPES, Job, Suite, compiled
from fusedopt.losses.linear_cross_entropy import linear_cross_entropy_reference
from fusedopt.losses.linear_distillation import linear_distillation_reference
from fusedopt.losses.linear_log_probs import linear_log_probs_reference

TITLE = "loss forward + backward, every row"
FLOOR_TITLE = (
    "byte floor of loss forward + backward (mean: read x; pointwise: read x, y, write dx; "
    "cross-entropy: read z, write dz; linear cross-entropy: read x, W, write dx, dW; linear log-probs: the "
    "same; distillation: also read the teacher's x, W)"
)
IMPLS = ("fusedopt", "torch-eager", "torch-compile")
LINEAR = "linear_cross_entropy"
DISTILLATION = "linear_distillation_loss"
JSD = dict(divergence="jsd", beta=0.5)  # the distillation rows' divergence (GKD's)
HEADS = {  # op on a linear head: its composition and keywords (the fused op: fusedopt.functional's)
    LINEAR: (linear_cross_entropy_reference, {}),
    "linear_log_probs": (linear_log_probs_reference, dict(temperature=0.7, return_entropy=True)),
    DISTILLATION: (linear_distillation_reference, JSD),
}


@dataclass(frozen=True)
class Loss:
    """A row group: the op (a name of ``fusedopt.testing.LOSS_CASES``, or of ``HEADS``), its input
    shape timed on CUDA and its smoke shape (linear cross-entropy: tokens N, hidden H,
    vocabulary V), the linear cross-entropy's chunking for a CUDA and a smoke run (``("rows",
    2048, 16)``: ``chunk_rows``; ``("classes", ...)``: the vocabulary order, ``chunk_classes``;
    None: its default) and the implementations run."""

    op: str
    shape: tuple[int, ...]
    smoke: tuple[int, ...]
    chunks: tuple[str, int, int] | None = None
    impls: tuple[str, ...] = IMPLS


_N = 64 * 2**20
_LCE, _LCE_SMOKE = (8192, 4096, 128256), (64, 32, 257)  # N x H x V: 8k tokens, Llama 3 8B's head
LOSSES = {
    "mean-64m": Loss("mean", (_N,), (1000,)),
    "mse-64m": Loss("mse_loss", (_N,), (1000,)),
    "l1-64m": Loss("l1_loss", (_N,), (1000,)),
    "smooth_l1-64m": Loss("smooth_l1_loss", (_N,), (1000,)),
    "huber-64m": Loss("huber_loss", (_N,), (1000,)),
    "ce-8192x50257": Loss("cross_entropy", (8192, 50257), (8, 129)),
    "ce-4096x128256": Loss("cross_entropy", (4096, 128256), (8, 257)),
    # The default chunk (c V ~ N H: 512 rows here); 2048 rows: fewer passes over the fp32 sum of
    # the weight's gradient, more memory; the vocabulary order: no such sum, one matmul more.
    "lce-8192x4096x128256": Loss(LINEAR, _LCE, _LCE_SMOKE),
    "lce-8192x4096x128256-chunk2048": Loss(LINEAR, _LCE, _LCE_SMOKE, ("rows", 2048, 16), ("fusedopt",)),
    "lce-8192x4096x128256-vocab4096": Loss(LINEAR, _LCE, _LCE_SMOKE, ("classes", 4096, 100), ("fusedopt",)),
    # A student and a teacher of Llama 3 8B's head shape, the JSD (β = 0.5); the default chunk.
    "distill-8192x4096x128256": Loss(DISTILLATION, _LCE, _LCE_SMOKE),
    # per-token log-probs and entropy of the same head (the default chunk), through both outputs
    "llp-8192x4096x128256": Loss("linear_log_probs", _LCE, _LCE_SMOKE),
}
POINTWISE = ["mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss"]
IMPL_BYTES_FP32 = {  # op: bytes per fp32 element each implementation moves (scaled by the element size)
    "mean": {"fusedopt": 4, "torch-eager": 8, "torch-compile": 8},
    **{op: {"fusedopt": 12, "torch-eager": 36, "torch-compile": 20} for op in POINTWISE},
    "cross_entropy": {"fusedopt": 12, "torch-eager": 24, "torch-compile": 16},
}


def sizes(loss: Loss, tiny: bool) -> tuple[tuple[int, ...], dict]:
    """The shape and the linear cross-entropy's chunking keyword of a CUDA (or a smoke) run."""
    chunks = {}
    if loss.chunks:
        kind, cuda, smoke = loss.chunks
        chunks = {f"chunk_{kind}": smoke if tiny else cuda}
    return (loss.smoke if tiny else loss.shape), chunks


def base_row(name: str, dtype: str, impl: str | None, smoke: bool) -> dict:
    loss = LOSSES[name]
    shape, chunks = sizes(loss, smoke)
    itemsize = DTYPES[dtype].itemsize
    per_elt = floors.LOSSES[loss.op].bytes_per_element(DTYPES[dtype])
    layout = "x".join(f"{n >> 20}M" if n >= 2**20 and n % 2**20 == 0 else str(n) for n in shape)
    for key, value in chunks.items():
        layout += f"-{'vocab' if key == 'chunk_classes' else 'chunk'}{value}"
    row = {"suite": "losses", "case": loss.op, "impl": impl, "layout": layout, "dtype": dtype}
    if loss.op in HEADS:  # the floor's elements: the (student's) input's and weight's
        tokens, hidden, vocab = shape
        row.update(tensors=2, numel=(tokens + vocab) * hidden)
    else:
        row.update(tensors=1, numel=math.prod(shape))
    row.update(bytes_per_elt=per_elt, bytes=per_elt * row["numel"])
    impl_fp32 = IMPL_BYTES_FP32.get(loss.op, {}).get(impl)
    return {**row, "impl_bytes_per_elt": impl_fp32 * itemsize // 4 if impl_fp32 else None}


def time_loss(name: str, dtype: str, impl: str, ctx) -> dict:
    """Forward + backward timed (a smoke run: only run) and its peak memory."""
    loss = LOSSES[name]
    if loss.op in HEADS:
        return time_linear_head(loss, dtype, impl, ctx)
    case = next(c for c in testing.LOSS_CASES if c.name == loss.op)
    shape, _ = sizes(loss, ctx.tiny)
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


def time_linear_head(loss: Loss, dtype: str, impl: str, ctx) -> dict:
    """Forward + backward of an op on a linear head (gradients of the input and the weight;
    per-token outputs back-propagated with random grads), as :func:`time_loss`: the linear
    cross-entropy, the log-probs and entropy, or the distillation loss (its teacher a head of the
    same shape, no gradient). A timed row notes its TFLOP/s (three matmuls, ``6 N H V``: those the
    gradients need, though the log-probs' backward recomputes the logits; the distillation's
    teacher logits one more: ``8 N H V``)."""
    (tokens, hidden, vocab), chunks = sizes(loss, ctx.tiny)
    gen = torch.Generator(ctx.device).manual_seed(0)
    like = dict(device=ctx.device, dtype=DTYPES[dtype])

    def head():
        x = torch.randn(tokens, hidden, generator=gen, **like)
        return x, torch.randn(vocab, hidden, generator=gen, **like).mul_(hidden**-0.5)

    x, w = (t.requires_grad_() for t in head())
    reference, kwargs = HEADS[loss.op]
    if loss.op == DISTILLATION:
        args = (x, w, *head())
    else:
        args = (x, w, torch.randint(0, vocab, (tokens,), device=ctx.device, generator=gen))
    matmuls = 4 if loss.op == DISTILLATION else 3  # the work asked for, not a recomputation's
    if impl == "fusedopt":
        fn = functools.partial(getattr(FF, loss.op), **chunks)
    elif impl == "torch-compile":
        fn = compiled(reference, ctx.compile_backend)
    else:
        fn = reference
    outputs = 2 if kwargs.get("return_entropy") else 1
    per_token = loss.op == "linear_log_probs"  # its outputs are per token: random upstream grads
    grads = (
        [torch.randn(tokens, device=ctx.device, generator=gen) for _ in range(outputs)] if per_token else None
    )

    def step():
        out = fn(*args, **kwargs)
        return torch.autograd.grad(out if isinstance(out, tuple) else (out,), [x, w], grads)

    step()  # compile / warm up
    out = ctx.measure(step)
    if out.get("ms"):
        flops = 2 * matmuls * tokens * hidden * vocab
        out["note"] = (
            f"{flops / (out['ms'] * 1e-3) / 1e12:.3g} TFLOP/s ({2 * matmuls}NHV = {flops / 1e12:.3g} TFLOP)"
        )
    return out


def jobs(args, ctx) -> list[Job]:
    keys = [(name, d, i) for name in args.losses for d in args.dtypes for i in LOSSES[name].impls]
    keys = [key for key in keys if key[2] in args.impls]
    return [(base_row(*key, ctx.tiny), functools.partial(time_loss, *key)) for key in keys]


def floor_rows(args) -> list[dict]:
    rows = [base_row(name, d, None, smoke=False) for name in args.losses for d in args.dtypes]
    return [{**row, "tensors": None} for row in rows]


SUITE = Suite(TITLE, ("loss", "shape"), IMPLS, jobs, FLOOR_TITLE, floor_rows)
