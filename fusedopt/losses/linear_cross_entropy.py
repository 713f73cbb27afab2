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

import torch
import torch.nn.functional as F
from torch.overrides import has_torch_function_variadic

from fusedopt._multi_tensor import TL_DTYPE, runs_triton
from fusedopt.losses import _linear_cross_entropy_launch as launch
from fusedopt.losses._common import differentiable_grads, scaled_copy
from fusedopt.losses._cross_entropy_launch import _scale_grad
from fusedopt.losses.cross_entropy import arguments, check_z_loss, torch_cross_entropy, z_loss_composition

AUTOCAST_INPUTS = (torch.float32, torch.float16, torch.bfloat16)  # the dtypes autocast casts


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward and backward of :func:`linear_cross_entropy`, with the arguments as it leaves
    them: ``x`` the input as [N, H], ``needs`` the gradients to compute (input, weight, bias)."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, class_weight, options, needs):
        ignore_index, reduction, label_smoothing, chunk, block, mm_dtype, out_dtype, z_loss = options
        loss, gi, gw, gb, stats, lse = launch.forward(
            x, weight, bias, target, class_weight, ignore_index, reduction, label_smoothing, z_loss, chunk, block,
            *needs, mm_dtype, out_dtype,
        )  # fmt: skip
        ctx.needs, ctx.reduction, ctx.options = needs, reduction, options
        if reduction == "none":
            ctx.save_for_backward(x, weight, bias, target, class_weight, stats, lse)
        else:  # the operands only for a backward with create_graph (references, no copy)
            ctx.save_for_backward(x, weight, bias, target, class_weight)
            ctx.grads = tuple(g if need else None for g, need in zip((gi, gw, gb), needs, strict=True))
            ctx.applied = torch.empty((), dtype=stats.dtype, device=x.device)
            ctx.first = True
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():  # create_graph=True: a backward autograd records
            x, weight, bias, target, class_weight = ctx.saved_tensors[:5]
            ignore_index, reduction, label_smoothing, _, _, mm_dtype, _, z_loss = ctx.options

            def composition(x, weight, bias):
                with torch.autocast(x.device.type, enabled=False):
                    logits = F.linear(
                        x.to(mm_dtype), weight.to(mm_dtype), bias.to(mm_dtype) if bias is not None else None
                    )
                # fp32 softmax math from the logits (fp64 for fp64), as the kernels
                return torch_cross_entropy(
                    logits, target.reshape(-1), class_weight, ignore_index, reduction, label_smoothing, z_loss
                )

            go = grad_output.reshape(-1) if reduction == "none" else grad_output
            grads = differentiable_grads(composition, (x, weight, bias), ctx.needs, go)
            return *grads, None, None, None, None
        if ctx.reduction == "none":
            x, weight, bias, target, class_weight, stats, lse = ctx.saved_tensors
            ignore_index, _, label_smoothing, chunk, block, mm_dtype, _, z_loss = ctx.options
            grads = launch.backward_none(
                x, weight, bias, target, class_weight, stats, lse, grad_output, ignore_index,
                label_smoothing, z_loss, chunk, block, *ctx.needs, mm_dtype,
            )  # fmt: skip
            grads = tuple(g if need else None for g, need in zip(grads, ctx.needs, strict=True))
        elif torch.compiler.is_compiling():
            grads = tuple(g if g is None else scaled_copy(g, grad_output) for g in ctx.grads)
        else:
            grads = tuple(
                g if g is None else _scale_grad(g, grad_output, ctx.applied, ctx.first) for g in ctx.grads
            )
            ctx.first = False
        return *grads, None, None, None, None


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
    label_smoothing=0.0, *, z_loss=0.0,
) -> torch.Tensor:  # fmt: skip
    """The composition this op equals, in plain torch: its fallback and its test oracle. The
    logits' class dim (last, as ``F.linear`` makes them) is moved to dim 1 for inputs of three or
    more dims, where ``F.cross_entropy`` expects it; with a ``z_loss``,
    :func:`fusedopt.losses.cross_entropy.z_loss_composition` of the logits."""
    logits = F.linear(input, linear_weight, linear_bias)
    if logits.dim() > 2:
        logits = logits.movedim(-1, 1)
    if z_loss > 0.0:
        return z_loss_composition(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss)
    return F.cross_entropy(
        logits, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing,
    )  # fmt: skip


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

    Returns:
        The loss: a scalar, or the target's shape for ``reduction="none"``; fp32 under
        autocast, else the input's dtype.

    Under autocast the matmuls run in autocast's dtype (the operands cast as torch casts them)
    and the loss in fp32, as the composition does. Tensors the Triton kernels do not run on (CPU
    without ``TRITON_INTERPRET=1``, tensor subclasses such as DTensor) go to the composition;
    there ``chunk_rows`` is validated and has nothing to choose.
    """
    fusable, autocast, mm_dtype = head_mode(input, linear_weight, target, linear_bias, weight)
    reduction, ignore_index, label_smoothing = arguments(weight, ignore_index, reduction, label_smoothing)
    z_loss = check_z_loss(z_loss)
    launch.check_chunk(chunk_rows, chunk_classes)
    if not fusable:
        return linear_cross_entropy_reference(
            input, linear_weight, target, linear_bias, weight, ignore_index, reduction, label_smoothing,
            z_loss=z_loss,
        )  # fmt: skip
    launch.check(input, linear_weight, linear_bias, target, weight, label_smoothing, autocast)
    if autocast and weight is not None and weight.dtype != torch.float32:
        weight = weight.float()  # autocast runs cross-entropy in fp32
    out_dtype = torch.float32 if autocast else input.dtype
    hidden, vocab = input.shape[-1], linear_weight.shape[0]
    x = input.reshape(-1, hidden)
    if input.dim() == 1:
        target = target.reshape(())  # torch: the loss of a 1-D input is 0-d, also for "none"
    chunk = chunk_rows if chunk_rows is not None else launch.chunk_rows(x.shape[0], hidden, vocab)
    options = (
        ignore_index,
        reduction,
        label_smoothing,
        chunk,
        chunk_classes or 0,
        mm_dtype,
        out_dtype,
        z_loss,
    )
    grad = torch.is_grad_enabled()
    needs = tuple(grad and t is not None and t.requires_grad for t in (input, linear_weight, linear_bias))
    if any(needs):
        return _LinearCrossEntropy.apply(x, linear_weight, linear_bias, target, weight, options, needs)
    return launch.forward(
        x, linear_weight, linear_bias, target, weight, ignore_index, reduction, label_smoothing, z_loss, chunk,
        chunk_classes or 0, False, False, False, mm_dtype, out_dtype,
    )[0]  # fmt: skip
