"""Fused linear + cross-entropy: the language-model loss
``F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)`` without ever
holding the logits of all the tokens.

Layers: the chunk loop and its custom ops in ``fusedopt.losses._linear_cross_entropy_launch`` (which
reuses the cross-entropy kernels of ``fusedopt.kernels.cross_entropy`` and adds
``fusedopt.kernels.linear_cross_entropy``) → :class:`_LinearCrossEntropy` →
:func:`linear_cross_entropy` (and ``fusedopt.functional`` / ``fusedopt.nn``).

**When the gradients are computed.** For ``mean`` and ``sum`` the forward computes the
gradients autograd will need (of the input, the linear weight, the bias: those that require
grad, none under ``no_grad``), chunk by chunk, while the chunk's logits are in the buffer; the
backward only multiplies them by ``grad_output`` (on the device, in place the first time, no
work when it is 1). For ``none`` the gradient of the weight is ``Σ_i g_i dz_iᵀ x_i`` with each
row's ``grad_output`` ``g_i``, which only the backward knows: the forward keeps each row's
log-sum-exp (4 B per token) and the backward recomputes the chunks' logits (one matmul more).

**Memory model** (N tokens, hidden size H, vocabulary V, chunk of c rows; ``s`` the bytes of
the matmul dtype, 2 for bf16). Held at the peak of the forward of ``mean``/``sum``, beyond the
inputs:

=================================  ==================================  ==========================
tensor                             fused (this op)                     composition (eager torch)
=================================  ==================================  ==========================
logits                             one chunk: c V s                    N V s (and, for fp32
                                                                       loss math, N V 4 more)
log-softmax kept for the backward  none                                N V s
gradient of the logits             in place in the chunk               N V s (and N V s for the
                                                                       zeroed nll gradient)
grad of the input                  N H (input dtype)                   N H, in the backward
grad of the weight                 V H 4 (fp32 accumulator; it is the  V H s, in the backward
                                   gradient itself for fp32 weights)
=================================  ==================================  ==========================

with ``c`` chosen so that ``c V ≈ N H`` (``chunk_rows``). The chunk buffer and the accumulator
are freed when the forward returns; what is kept until the backward is the gradients (N H + V H
in their dtypes), no logits. A bf16 weight gets its gradient summed over the chunks in fp32
and rounded once, as the composition's single matmul does.

**create_graph.** A backward that autograd records (``create_graph=True``: double backward,
Hessian-vector products, MAML) differentiates the composition instead (the matmul in the same
dtype, the loss in fp32 under autocast), from the inputs the forward keeps for it (references to
``input``, the weight and the bias: no copy; ``input`` held until the backward, ``N x H``), so
second derivatives are torch's. Every other backward is the fused one.

``chunk_classes`` selects the vocabulary order (blocks of classes, all the tokens each): no
``V x H`` fp32 accumulator (``grad_weight`` written once per block), an ``N x H`` fp32 sum of
``grad_input`` instead, and the logits computed twice (see ``docs/losses.md``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.overrides import has_torch_function_variadic

from fusedopt._multi_tensor import TL_DTYPE, runs_triton
from fusedopt.losses import _linear_cross_entropy_launch as launch
from fusedopt.losses import _vocab_parallel as vocab_parallel
from fusedopt.losses._common import differentiable_grads, scaled_copy
from fusedopt.losses._cross_entropy_launch import _scale_grad
from fusedopt.losses.cross_entropy import (
    arguments,
    check_softcap,
    check_z_loss,
    cross_entropy_composition,
    torch_cross_entropy,
)

AUTOCAST_INPUTS = (torch.float32, torch.float16, torch.bfloat16)  # the dtypes autocast casts


class _Options(NamedTuple):
    """The non-tensor arguments of :class:`_LinearCrossEntropy` (``block`` 0: token chunks;
    ``shard``: a vocabulary-parallel head's, or None)."""

    ignore_index: int
    reduction: str
    label_smoothing: float
    chunk: int
    block: int
    mm_dtype: torch.dtype
    out_dtype: torch.dtype
    z_loss: float
    softcap: float
    shard: object


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward and backward of :func:`linear_cross_entropy`, with the arguments as it leaves
    them: ``x`` the input as [N, H], ``needs`` the gradients to compute (input, weight, bias)."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, class_weight, options, needs):
        o = options
        loss, gi, gw, gb, stats, lse = launch.forward(
            x, weight, bias, target, class_weight, o.ignore_index, o.reduction, o.label_smoothing, o.z_loss,
            o.softcap, o.chunk, o.block, *needs, o.mm_dtype, o.out_dtype, shard=o.shard,
        )  # fmt: skip
        ctx.needs, ctx.reduction, ctx.options = needs, o.reduction, options
        if o.reduction == "none":
            ctx.save_for_backward(x, weight, bias, target, class_weight, stats, lse)
        else:  # the operands only for a backward with create_graph (references, no copy)
            ctx.save_for_backward(x, weight, bias, target, class_weight)
            keep_grads(ctx, (gi, gw, gb), needs, stats.dtype, x.device)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():  # create_graph=True: a backward autograd records
            x, weight, bias, target, class_weight = ctx.saved_tensors[:5]
            o = ctx.options
            if o.shard is not None:
                raise NotImplementedError(
                    "linear_cross_entropy: create_graph=True with a vocabulary-sharded weight (the composition "
                    "of a rank's slice is not the loss): use linear_cross_entropy_reference there"
                )

            def composition(x, weight, bias):
                with torch.autocast(x.device.type, enabled=False):
                    mm = o.mm_dtype
                    logits = F.linear(x.to(mm), weight.to(mm), bias.to(mm) if bias is not None else None)
                # fp32 softmax math from the logits (fp64 for fp64), as the kernels
                return torch_cross_entropy(
                    logits, target.reshape(-1), class_weight, o.ignore_index, o.reduction, o.label_smoothing,
                    o.z_loss, o.softcap,
                )  # fmt: skip

            go = grad_output.reshape(-1) if o.reduction == "none" else grad_output
            grads = differentiable_grads(composition, (x, weight, bias), ctx.needs, go)
            return *grads, None, None, None, None
        if ctx.reduction == "none":
            x, weight, bias, target, class_weight, stats, lse = ctx.saved_tensors
            o = ctx.options
            grads = launch.backward_none(
                x, weight, bias, target, class_weight, stats, lse, grad_output, o.ignore_index,
                o.label_smoothing, o.z_loss, o.softcap, o.chunk, o.block, *ctx.needs, o.mm_dtype, shard=o.shard,
            )  # fmt: skip
            grads = tuple(g if need else None for g, need in zip(grads, ctx.needs, strict=True))
        else:
            grads = kept_grads(ctx, grad_output)
        return *grads, None, None, None, None


def keep_grads(ctx, grads: tuple, needs: tuple[bool, ...], dtype: torch.dtype, device: torch.device) -> None:
    """In the forward of a reduced (``mean``/``sum``) loss of a head: keep on ``ctx`` the
    gradients it computed for a ``grad_output`` of 1 (those in ``needs``) for
    :func:`kept_grads`; ``dtype``: of the factor they hold (the loss math's)."""
    ctx.grads = tuple(g if need else None for g, need in zip(grads, needs, strict=True))
    ctx.applied = torch.empty((), dtype=dtype, device=device)
    ctx.first = True


def kept_grads(ctx, grad_output: torch.Tensor) -> tuple:
    """The backward of such a loss: the kept gradients times ``grad_output`` (in place the first
    time in eager, :func:`_scale_grad`; new tensors while compiling, :func:`scaled_copy`)."""
    if torch.compiler.is_compiling():
        return tuple(g if g is None else scaled_copy(g, grad_output) for g in ctx.grads)
    grads = tuple(g if g is None else _scale_grad(g, grad_output, ctx.applied, ctx.first) for g in ctx.grads)
    ctx.first = False
    return grads


def head_mode(
    input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor, *others: torch.Tensor | None
) -> tuple[bool, bool, torch.dtype]:
    """What a chunked op over the head ``F.linear(input, linear_weight, ...)`` runs:
    ``(fusable, autocast, mm_dtype)``: whether the kernels take these tensors (no subclass such
    as DTensor; devices and dtypes Triton runs on), whether autocast casts the head's matmul,
    and the matmul's dtype (autocast's, else the input's)."""
    present = [t for t in (input, linear_weight, *others) if t is not None]
    fusable = not has_torch_function_variadic(*present, target) and all(
        runs_triton(t.device) and t.dtype in TL_DTYPE for t in present
    )
    device_type = input.device.type
    autocast = (
        torch.is_autocast_enabled(device_type)
        and input.dtype in AUTOCAST_INPUTS
        and linear_weight.dtype in AUTOCAST_INPUTS
    )
    return fusable, autocast, torch.get_autocast_dtype(device_type) if autocast else input.dtype


def linear_cross_entropy_reference(
    input, linear_weight, target, linear_bias=None, weight=None, ignore_index=-100, reduction="mean",
    label_smoothing=0.0, *, z_loss=0.0, softcap=None,
) -> torch.Tensor:  # fmt: skip
    """The composition this op equals, in plain torch: its fallback and its test oracle. The
    logits' class dim (last, as ``F.linear`` makes them) is moved to dim 1 for inputs of three or
    more dims, where ``F.cross_entropy`` expects it; then
    :func:`fusedopt.losses.cross_entropy.cross_entropy_composition` (``F.cross_entropy`` without
    a ``z_loss`` or a ``softcap``)."""
    logits = F.linear(input, linear_weight, linear_bias)
    if logits.dim() > 2:
        logits = logits.movedim(-1, 1)
    return cross_entropy_composition(
        logits, target, weight, ignore_index, reduction, label_smoothing, z_loss=z_loss, softcap=softcap
    )


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    chunk_rows: int | None = None,
    chunk_classes: int | None = None,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Cross-entropy of the logits ``F.linear(input, linear_weight, linear_bias)`` without
    materializing them: same value, dtype, shape, gradients and errors as
    :func:`linear_cross_entropy_reference`.

    Args:
        input: hidden states (H,), (N, H) or (B, T, ..., H); fp32, fp64, fp16, bf16.
        linear_weight: (V, H), the input's dtype (under autocast: any of fp32/fp16/bf16).
        target: class indices of the input's leading shape ((), (N,), (B, T, ...)), int64 or
            uint8.
        linear_bias: (V,) or None.
        weight: (V,) class weights or None.
        ignore_index, reduction, label_smoothing: as ``torch.nn.functional.cross_entropy``.
        chunk_rows: tokens per chunk (default: about ``N H / V``, rounded up to a multiple of
            256, so that a chunk's logits are about the size of the input). A larger chunk is
            faster and holds more; it does not change the result beyond rounding.
        chunk_classes: the vocabulary order instead of token chunks: all the tokens, in blocks
            of this many classes, and one matmul more (the logits twice: their log-sum-exp
            first). No ``V x H`` fp32 accumulator: each block's weight gradient is one matmul
            over all the tokens, written once. Exclusive with ``chunk_rows``.
        z_loss: >= 0: each token not ignored adds ``z_loss · lse²`` (its logits' log-sum-exp)
            to its loss, reduced like the loss (as ``fusedopt.functional.cross_entropy``).
        softcap: None or > 0: every logit ``z`` becomes ``softcap · tanh(z / softcap)`` before
            the softmax (Gemma 2's soft-capping; with ``z_loss``, the lse of the capped logits).

    Returns:
        The loss: a scalar, or the target's shape for ``reduction="none"``; fp32 under
        autocast, else the input's dtype.

    Under autocast the matmuls run in autocast's dtype (the operands cast as torch casts them)
    and the loss in fp32, as the composition does. Tensors the Triton kernels do not run on (CPU
    without ``TRITON_INTERPRET=1``, tensor subclasses such as DTensor but the layout below) go to
    the composition; there ``chunk_rows`` is validated and has nothing to choose.

    **Vocabulary-parallel heads.** A ``linear_weight`` that is a DTensor placed ``(Shard(0),)``
    on a 1-D mesh (tensor parallel; uneven shards allowed), with ``linear_bias`` placed alike or
    None and the other tensors DTensors ``(Replicate(),)`` on that mesh or plain tensors equal
    on every rank: each rank runs the vocabulary order on its own classes and the ranks exchange
    each row's max, sum of exponentials, target logit and ``Σ w z`` (one all-gather of 4 numbers
    a token), then sum the input's gradient (one all-reduce of ``N x H``, when it is asked):
    no logits and no weight gathered (``fusedopt.losses._vocab_parallel``). The loss is the
    same on every rank (a DTensor ``(Replicate(),)`` when ``input`` is one); the gradients of
    the weight and bias are DTensors placed as they are, the input's as the input (the sum over
    all the classes). ``chunk_classes`` sets the blocks; else the blocks hold about as many
    logits as ``chunk_rows`` token chunks would. ``create_graph=True`` is not supported there.
    """
    reduction, ignore_index, label_smoothing = arguments(weight, ignore_index, reduction, label_smoothing)
    z_loss, softcap = check_z_loss(z_loss), check_softcap(softcap)
    launch.check_chunk(chunk_rows, chunk_classes)
    # a head sharded over the vocabulary (tensor parallel): each rank computes on its classes and
    # the rows' statistics are combined across the ranks (fusedopt.losses._vocab_parallel)
    shard = vocab_parallel.vocab_shard(linear_weight, (input, target, weight), (linear_bias,))
    operands = (input, linear_weight, linear_bias, target, weight)
    if shard is not None:
        operands = tuple(vocab_parallel.to_local(t) for t in operands)
    x, w, b, y, class_weight = operands
    fusable, autocast, mm_dtype = head_mode(x, w, y, b, class_weight)
    if not fusable:
        return linear_cross_entropy_reference(
            input, linear_weight, target, linear_bias, weight, ignore_index, reduction, label_smoothing,
            z_loss=z_loss, softcap=softcap,
        )  # fmt: skip
    # the weight and bias as given: the whole vocabulary's shapes
    launch.check(x, linear_weight, linear_bias, y, class_weight, label_smoothing, autocast)
    if autocast and class_weight is not None and class_weight.dtype != torch.float32:
        class_weight = class_weight.float()  # autocast runs cross-entropy in fp32
    out_dtype = torch.float32 if autocast else x.dtype
    hidden, vocab = x.shape[-1], w.shape[0]
    rows = x.reshape(-1, hidden)
    if x.dim() == 1:
        y = y.reshape(())  # torch: the loss of a 1-D input is 0-d, also for "none"
    chunk = chunk_rows if chunk_rows is not None else launch.chunk_rows(rows.shape[0], hidden, vocab)
    block = chunk_classes or 0
    if shard is not None and not block:  # the vocabulary order only, its blocks as large as the chunks
        block = launch.vocab_block(rows.shape[0], vocab, chunk)
    options = _Options(
        ignore_index, reduction, label_smoothing, chunk, block, mm_dtype, out_dtype, z_loss, softcap, shard
    )
    grad = torch.is_grad_enabled()
    needs = tuple(grad and t is not None and t.requires_grad for t in (x, w, b))
    if any(needs):
        loss = _LinearCrossEntropy.apply(rows, w, b, y, class_weight, options, needs)
    else:
        loss = launch.forward(
            rows, w, b, y, class_weight, ignore_index, reduction, label_smoothing, z_loss, softcap, chunk, block,
            False, False, False, mm_dtype, out_dtype, shard=shard,
        )[0]  # fmt: skip
    return loss if shard is None else vocab_parallel.like_input(loss, input, shard)
