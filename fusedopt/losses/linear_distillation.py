"""Fused linear distillation loss: a divergence between a student's and a teacher's
next-token distributions, ``p_s = softmax(student_input @ W_sᵀ + b_s) / T)`` and ``p_t =
softmax((teacher_input @ W_tᵀ + b_t) / T)``, token by token, without holding either's logits
for all the tokens.

Layers: the chunk loop and its custom ops in ``fusedopt.losses._linear_distillation_launch``
(the linear cross-entropy's token-order engine, ``fusedopt.kernels.distillation`` for the rows)
→ :class:`_LinearDistillation` → :func:`linear_distillation_loss` (and ``fusedopt.functional``
/ ``fusedopt.nn``). :func:`linear_distillation_reference` is the same loss in plain torch: the
fallback where the kernels do not run, the tests' oracle and what ``create_graph=True``
differentiates.

**The divergences** (per token; ``log p`` = ``log_softmax(z / T)``):

* ``"kl"``: ``KL(p_t ‖ p_s) = Σ_v p_t (log p_t - log p_s)`` (forward KL);
* ``"reverse_kl"``: ``KL(p_s ‖ p_t) = Σ_v p_s (log p_s - log p_t)``;
* ``"jsd"``: the generalized Jensen-Shannon divergence ``β KL(p_t ‖ M) + (1 - β) KL(p_s ‖ M)``,
  ``M = β p_t + (1 - β) p_s``. At ``β = 0`` and ``β = 1`` that expression is 0 for any
  distributions; there, as TRL's ``generalized_jsd_loss`` and Liger's JSD, ``β = 0`` is the
  forward KL and ``β = 1`` the reverse KL (the limits of ``JSD / β`` and ``JSD / (1 - β)``).

No ``T²`` factor is applied (multiply the loss by it if your recipe wants it).

**When the gradients are computed**, as the linear cross-entropy: for ``mean``/``sum`` in the
forward, chunk by chunk (the backward only multiplies them by ``grad_output``); for ``none`` the
forward keeps three statistics per token (both log-sum-exps and ``Σ p_s a``, 12 B in fp32) and
the backward recomputes both chunks' logits (two matmuls more). Only the student's input,
weight and bias get gradients: the teacher is a constant (its tensors are read detached; a
teacher tensor that requires grad gets none, as behind ``torch.no_grad()``).

**Memory** (N tokens, hidden sizes ``H_s``, ``H_t``, vocabulary V, chunk of c rows, ``s`` bytes
per element of the matmul dtype): two ``c x V`` buffers (the student's logits, then their
gradient in place; the teacher's), ``c`` chosen so that together they are about the size of the
student's input (``2 c V ≈ N H_s``), the three gradients, and for bf16/fp16 weights the ``V
H_s`` fp32 accumulator of the weight's gradient; the eager composition holds ``N V`` logits of
each, their log-softmaxes and more, ``N V s`` at least five times over.

**Vocabulary-parallel heads** (both weights DTensors ``Shard(0)``, see
:func:`linear_distillation_loss`) run the vocabulary order on each rank's ``V_r`` classes: two
``N x K`` block buffers sized like the chunks (``N K ≈ c V_r``), both heads' logits computed once
per pass (twice for the forward KL, three times for the reverse KL and the JSD: four and six
matmuls against the token order's two, plus the gradient's), an ``N x H_s`` fp32 sum of the input's
gradient, and seven numbers a token of row statistics; never ``V x H_s`` in fp32 (each block's
weight gradient is written once).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn import _reduction
from torch.overrides import has_torch_function_variadic

from fusedopt._multi_tensor import TL_DTYPE, compute_dtype, runs_triton
from fusedopt.losses import _linear_cross_entropy_launch as lce_launch
from fusedopt.losses import _linear_distillation_launch as launch
from fusedopt.losses import _vocab_parallel as vocab_parallel
from fusedopt.losses._common import differentiable_grads
from fusedopt.losses.cross_entropy import REDUCTIONS
from fusedopt.losses.linear_cross_entropy import AUTOCAST_INPUTS, keep_grads, kept_grads


def arguments(divergence, beta, temperature, ignore_index, reduction) -> tuple[str, float, float, int, str]:
    """The options checked and normalized: ``(divergence, beta, temperature, ignore_index,
    reduction)``; ``reduction`` as torch's losses check it."""
    if divergence not in launch.DIVERGENCES:
        raise ValueError(f"divergence must be one of {launch.DIVERGENCES}, got {divergence!r}")
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not 0.0 < temperature < math.inf
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    reduction = REDUCTIONS[_reduction.get_enum(reduction)]  # torch's check and message
    return divergence, float(beta), float(temperature), int(ignore_index), reduction


def divergence_composition(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor | None,
    divergence: str,
    beta: float,
    temperature: float,
    ignore_index: int,
    reduction: str,
) -> torch.Tensor:
    """The loss from the logits [..., V] in plain torch, in fp32 (fp64 for fp64 logits), as the
    kernels compute it; the teacher's detached. The result in the logits' dtype, fp32 under
    autocast (as the fused op)."""
    math_dtype = compute_dtype(student_logits.dtype)
    device = student_logits.device.type
    out_dtype = math_dtype if torch.is_autocast_enabled(device) else student_logits.dtype
    kind = launch.kernel_divergence(divergence, beta)
    with torch.autocast(device, enabled=False):
        log_ps = torch.log_softmax(student_logits.to(math_dtype) / temperature, -1)
        log_pt = torch.log_softmax(teacher_logits.detach().to(math_dtype) / temperature, -1)
        if kind == launch.FORWARD_KL:
            per_token = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
        elif kind == launch.REVERSE_KL:
            per_token = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
        else:
            log_m = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log1p(-beta))
            per_token = beta * (log_pt.exp() * (log_pt - log_m)).sum(-1) + (1 - beta) * (
                log_ps.exp() * (log_ps - log_m)
            ).sum(-1)
        if target is not None:
            kept = target.long() != ignore_index  # as integers (a uint8 256 - 100 is not -100)
            per_token = torch.where(kept, per_token, 0.0)
            count = kept.sum()
        else:
            count = per_token.numel()
        if reduction == "sum":
            per_token = per_token.sum()
        elif reduction == "mean":  # 0 / 0 = NaN when every token is ignored, as F.cross_entropy
            per_token = per_token.sum() / count
    return per_token.to(out_dtype)


def _autocast(student_input, student_weight) -> bool:
    """Whether autocast casts the matmuls' operands (as the linear cross-entropy decides it)."""
    return (
        torch.is_autocast_enabled(student_input.device.type)
        and student_input.dtype in AUTOCAST_INPUTS
        and student_weight.dtype in AUTOCAST_INPUTS
    )


def linear_distillation_reference(
    student_input, student_weight, teacher_input, teacher_weight, target=None, *, student_bias=None,
    teacher_bias=None, divergence="kl", beta=0.5, temperature=1.0, ignore_index=-100, reduction="mean",
) -> torch.Tensor:  # fmt: skip
    """The composition :func:`linear_distillation_loss` equals, in plain torch: both heads'
    logits (``F.linear``; the teacher's under ``no_grad``), then
    :func:`divergence_composition`. Its fallback and its test oracle."""
    divergence, beta, temperature, ignore_index, reduction = arguments(
        divergence, beta, temperature, ignore_index, reduction
    )
    autocast = _autocast(student_input, student_weight)
    launch.check(
        student_input,
        student_weight,
        student_bias,
        teacher_input,
        teacher_weight,
        teacher_bias,
        target,
        autocast,
    )
    student = F.linear(student_input, student_weight, student_bias)
    with torch.no_grad():
        teacher = F.linear(teacher_input, teacher_weight, teacher_bias)
    return divergence_composition(
        student, teacher, target, divergence, beta, temperature, ignore_index, reduction
    )


class _LinearDistillation(torch.autograd.Function):
    """Forward and backward of :func:`linear_distillation_loss` over the student's ``xs`` [N, Hs]
    and the teacher's ``xt`` [N, Ht] (detached); ``order``: ``(block, shard)`` of the vocabulary
    order for heads sharded over the vocabulary, ``(None, None)`` for token chunks; ``needs``:
    the gradients to compute (the student's input, weight, bias)."""

    @staticmethod
    def forward(ctx, xs, ws, bs, xt, wt, bt, target, options, order, needs):
        divergence, beta, temperature, ignore_index, reduction, chunk, mm_dtype, out_dtype = options
        block, shard = order
        loss, gi, gw, gb, stats = launch.forward(
            xs, ws, bs, xt, wt, bt, target, divergence, beta, temperature, ignore_index, reduction, chunk, *needs,
            mm_dtype, out_dtype, block=block, shard=shard,
        )  # fmt: skip
        ctx.needs, ctx.options, ctx.order = needs, options, order
        if reduction == "none":
            ctx.save_for_backward(xs, ws, bs, xt, wt, bt, target, stats)
        else:  # the operands only for a backward with create_graph (references, no copy)
            ctx.save_for_backward(xs, ws, bs, xt, wt, bt, target)
            keep_grads(ctx, (gi, gw, gb), needs, compute_dtype(mm_dtype), xs.device)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        divergence, beta, temperature, ignore_index, reduction, chunk, mm_dtype, _ = ctx.options
        block, shard = ctx.order
        if torch.is_grad_enabled():  # create_graph=True: a backward autograd records
            if shard is not None:
                raise NotImplementedError(
                    "linear_distillation_loss: create_graph=True with vocabulary-sharded weights (the composition "
                    "of a rank's slice is not the loss): use linear_distillation_reference there"
                )
            xs, ws, bs, xt, wt, bt, target = ctx.saved_tensors[:7]

            def composition(xs, ws, bs):
                with torch.autocast(xs.device.type, enabled=False):  # the operands as the forward cast them
                    student = F.linear(*launch.head(xs, ws, bs, mm_dtype)[:3])
                    teacher = F.linear(*launch.head(xt, wt, bt, mm_dtype)[:3])
                flat = target.reshape(-1) if target is not None else None
                return divergence_composition(
                    student, teacher, flat, divergence, beta, temperature, ignore_index, reduction
                )

            go = grad_output.reshape(-1) if reduction == "none" else grad_output
            grads = differentiable_grads(composition, (xs, ws, bs), ctx.needs, go)
        elif reduction == "none":
            xs, ws, bs, xt, wt, bt, target, stats = ctx.saved_tensors
            grads = launch.backward_none(
                xs, ws, bs, xt, wt, bt, target, stats, grad_output, divergence, beta, temperature, ignore_index,
                chunk, *ctx.needs, mm_dtype, block=block, shard=shard,
            )  # fmt: skip
            grads = tuple(g if need else None for g, need in zip(grads, ctx.needs, strict=True))
        else:
            grads = kept_grads(ctx, grad_output)
        return *grads, None, None, None, None, None, None, None


def linear_distillation_loss(
    student_input: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_input: torch.Tensor,
    teacher_weight: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    divergence: str = "kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Distillation loss between the student's head ``F.linear(student_input, student_weight,
    student_bias)`` and the teacher's, token by token, without materializing either's logits:
    the value, dtype, shape and student gradients of :func:`linear_distillation_reference`.

    Args:
        student_input: the student's hidden states (H_s,), (N, H_s) or (B, T, ..., H_s); fp32,
            fp64, fp16, bf16.
        student_weight: (V, H_s), the input's dtype (under autocast: any of fp32/fp16/bf16).
        teacher_input: the teacher's hidden states, the student's tokens: (..., H_t), ``H_t``
            may differ from ``H_s``; the student's dtype (without autocast).
        teacher_weight: (V, H_t): the same vocabulary as the student's.
        target: integer token ids of the tokens' shape, or None; tokens equal to
            ``ignore_index`` are left out (None: every token counts).
        student_bias, teacher_bias: (V,) or None.
        divergence: ``"kl"`` (``KL(p_t ‖ p_s)``), ``"reverse_kl"`` (``KL(p_s ‖ p_t)``) or
            ``"jsd"`` (``β KL(p_t ‖ M) + (1 - β) KL(p_s ‖ M)``, ``M = β p_t + (1 - β) p_s``; at
            ``β = 0`` the forward KL, at ``β = 1`` the reverse KL).
        beta: the JSD's ``β`` in [0, 1] (checked, and read only by the JSD).
        temperature: ``T > 0``: both heads' logits are divided by it.
        ignore_index: the target value of the tokens left out.
        reduction: ``"mean"`` over the tokens kept (NaN when every token is ignored, as
            ``F.cross_entropy``), ``"sum"``, or ``"none"`` (the tokens' shape, 0 for ignored
            tokens).

    Returns:
        The loss: a scalar, or the tokens' shape for ``reduction="none"``; fp32 under autocast,
        else the student's dtype. Never negative.

    Gradients reach the student's input, weight and bias only; the teacher is a constant. Under
    autocast the matmuls run in autocast's dtype and the divergence in fp32, as the composition.
    Tensors the Triton kernels do not run on (CPU without ``TRITON_INTERPRET=1``, tensor
    subclasses such as DTensor but the layout below) go to the composition.

    **Vocabulary-parallel heads.** When ``student_weight`` and ``teacher_weight`` are DTensors
    placed ``(Shard(0),)`` on the same 1-D mesh (tensor parallel; uneven shards allowed), the
    biases placed alike or None, and the inputs and ``target`` DTensors ``(Replicate(),)`` on
    that mesh or plain tensors equal on every rank: each rank runs the vocabulary order on its
    own classes and the ranks exchange per-token statistics, never logits or weights
    (``fusedopt.losses._vocab_parallel``): one all-gather of both heads' max and sum of
    exponentials (4 numbers a token), one of the partial divergences (and, but for the forward
    KL, ``Σ p_s a``: 1 or 2 numbers a token), and one all-reduce of the student input's
    gradient (``N x H_s``) when it is asked. The loss is the same on every rank (a DTensor
    ``(Replicate(),)`` when ``student_input`` is one); the gradients of the student's weight and
    bias are DTensors placed as they are, the input's as the input. ``create_graph=True`` is not
    supported there.
    """
    divergence, beta, temperature, ignore_index, reduction = arguments(
        divergence, beta, temperature, ignore_index, reduction
    )
    teacher_input, teacher_weight = teacher_input.detach(), teacher_weight.detach()
    teacher_bias = teacher_bias.detach() if teacher_bias is not None else None
    heads = [student_input, student_weight, student_bias, teacher_input, teacher_weight, teacher_bias]
    # heads sharded over the vocabulary (tensor parallel): each rank computes on its classes and the
    # rows' statistics are combined across the ranks (fusedopt.losses._vocab_parallel)
    shard = vocab_parallel.vocab_shard(
        student_weight, (student_input, teacher_input, target), (student_bias, teacher_weight, teacher_bias)
    )
    operands = (
        [vocab_parallel.to_local(t) for t in (*heads, target)] if shard is not None else [*heads, target]
    )
    present = [t for t in operands[:6] if t is not None]
    fusable = not has_torch_function_variadic(*present, *[t for t in operands[6:] if t is not None]) and all(
        runs_triton(t.device) and t.dtype in TL_DTYPE for t in present
    )
    if not fusable:
        return linear_distillation_reference(
            student_input, student_weight, teacher_input, teacher_weight, target, student_bias=student_bias,
            teacher_bias=teacher_bias, divergence=divergence, beta=beta, temperature=temperature,
            ignore_index=ignore_index, reduction=reduction,
        )  # fmt: skip
    x_s, w_s, b_s, x_t, w_t, b_t, y = operands
    autocast = _autocast(x_s, w_s)
    launch.check(
        x_s, student_weight, student_bias, x_t, teacher_weight, teacher_bias, y, autocast
    )  # whole shapes
    if shard is not None and w_t.shape[0] != w_s.shape[0]:
        raise ValueError(f"{launch.OP}: the teacher's shard of the vocabulary must be the student's")
    mm_dtype = torch.get_autocast_dtype(x_s.device.type) if autocast else x_s.dtype
    out_dtype = torch.float32 if autocast else x_s.dtype
    lead = x_s.shape[:-1]
    xs = x_s.reshape(-1, x_s.shape[-1])
    xt = x_t.reshape(-1, x_t.shape[-1])
    chunk = launch.chunk_rows(xs.shape[0], xs.shape[1], w_s.shape[0])
    # the vocabulary order only for sharded heads, its blocks of logits as large as the chunks'
    block = lce_launch.vocab_block(xs.shape[0], w_s.shape[0], chunk) if shard is not None else None
    options = (divergence, beta, temperature, ignore_index, reduction, chunk, mm_dtype, out_dtype)
    order = (block, shard)  # (None, None): token chunks
    grad = torch.is_grad_enabled()
    needs = tuple(grad and t is not None and t.requires_grad for t in (x_s, w_s, b_s))
    if any(needs):
        loss = _LinearDistillation.apply(xs, w_s, b_s, xt, w_t, b_t, y, options, order, needs)
    else:
        loss = launch.forward(
            xs, w_s, b_s, xt, w_t, b_t, y, *options[:6], False, False, False, mm_dtype, out_dtype, block=block,
            shard=shard,
        )[0]  # fmt: skip
    loss = loss.view(lead) if reduction == "none" else loss
    return loss if shard is None else vocab_parallel.like_input(loss, student_input, shard)
