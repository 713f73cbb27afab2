"""Fused linear log-probs and entropy: per token, the log-probability of its target and the
entropy of its distribution under the logits ``(input Wᵀ + b) / temperature``, without ever
holding the logits of all the tokens (what RL trainers, PPO/GRPO-style, need of a language
model's head at a sampling temperature).

Layers: ``fusedopt.kernels.log_probs`` (the row kernels, on ``cross_entropy``'s passes) → the
launchers and custom ops in ``fusedopt.losses._linear_log_probs_launch`` (on the linear
cross-entropy's token-order engine, ``token_chunks``) → :class:`_LinearLogProbs` →
:func:`linear_log_probs` (and ``fusedopt.functional``).

**Numerics.** fp32 (fp64 for fp64 inputs) from the logits in the matmul dtype; one online pass
per row gives its max, ``Σ exp(z - m)`` and ``Σ exp(z - m) (m - z)``, so the log-probs are
never positive and the entropies never negative by construction (``fusedopt.kernels.log_probs``),
at any vocabulary size.

**Memory** (N tokens, hidden H, vocabulary V, chunks of c rows, ``s`` bytes per element of the
matmul dtype): one ``c V s`` logits buffer (the default ``c`` about ``N H / V``, as the linear
cross-entropy's), the outputs and 4 bytes per token of log-sum-exp kept for the backward (the
entropy output is the other 4 it reads); the backward recomputes the chunks' logits (one matmul
more) and sums the weight's gradient in fp32 (``4 V H`` for bf16/fp16 weights). The composition
holds ``N V`` logits, their fp32 copy, log-softmax and softmax, and as many for the gradient.

**create_graph.** A backward that autograd records (``create_graph=True``) differentiates the
composition (:func:`log_probs_of_logits` of the head's logits in the matmul dtype) from the
saved inputs, so second derivatives are torch's; every other backward is the fused one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusedopt._multi_tensor import compute_dtype
from fusedopt.losses import _linear_log_probs_launch as launch
from fusedopt.losses import _vocab_parallel as vocab_parallel
from fusedopt.losses._common import differentiable_grads
from fusedopt.losses._linear_cross_entropy_launch import check as check_linear_head
from fusedopt.losses._linear_cross_entropy_launch import vocab_block
from fusedopt.losses.linear_cross_entropy import head_mode

OP = "linear_log_probs"


def log_probs_of_logits(
    logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0, return_entropy: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The composition from the logits ``(..., V)``, in plain torch: ``z = logits / temperature``
    in fp32 (fp64 for fp64 logits), ``log_softmax(z)[target]`` (0 where ``target`` is -100) and
    the entropy ``-(softmax(z) · log_softmax(z)).sum(-1)``."""
    z = logits.to(compute_dtype(logits.dtype)) / temperature
    log_p = z.log_softmax(-1)
    keep = target != launch.IGNORE_INDEX
    index = torch.where(keep, target, 0).long().unsqueeze(-1)
    log_prob = torch.where(keep, log_p.gather(-1, index).squeeze(-1), 0)
    if not return_entropy:
        return log_prob
    return log_prob, -(z.softmax(-1) * log_p).sum(-1)


def linear_log_probs_reference(
    input, linear_weight, target, linear_bias=None, *, temperature=1.0, return_entropy=False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """What :func:`linear_log_probs` equals: :func:`log_probs_of_logits` of
    ``F.linear(input, linear_weight, linear_bias)`` (its fallback and its tests' oracle)."""
    logits = F.linear(input, linear_weight, linear_bias)
    return log_probs_of_logits(logits, target, temperature, return_entropy)


class _LinearLogProbs(torch.autograd.Function):
    """Forward and backward of :func:`linear_log_probs`, ``x`` the input as [N, H], ``needs``
    the gradients to compute (input, weight, bias). The forward keeps each token's log-sum-exp
    (and the entropy output); the backward propagates only the outputs' grads that are not
    None."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, options, needs):
        temperature, chunk, entropy, mm_dtype, block, shard = options
        log_prob, ent, lse = launch.forward(
            x, weight, bias, target, temperature, chunk, entropy, True, mm_dtype, block=block, shard=shard
        )
        ctx.save_for_backward(x, weight, bias, target, lse, ent)
        ctx.options, ctx.needs = options, needs
        ctx.set_materialize_grads(False)
        return (log_prob, ent) if entropy else log_prob

    @staticmethod
    def backward(ctx, grad_log_prob, grad_entropy=None):
        x, weight, bias, target, lse, ent = ctx.saved_tensors
        temperature, chunk, _, mm_dtype, block, shard = ctx.options
        if grad_log_prob is None and grad_entropy is None:
            grads = (None, None, None)
        elif torch.is_grad_enabled():  # create_graph=True: a backward autograd records
            if shard is not None:
                raise NotImplementedError(
                    f"{OP}: create_graph=True with a vocabulary-sharded weight (the composition of a rank's "
                    "slice is not the op): use linear_log_probs_reference there"
                )
            grads = _composition_grads(
                x, weight, bias, target, ctx.options, ctx.needs, grad_log_prob, grad_entropy
            )
        else:
            grads = launch.backward(
                x, weight, bias, target, lse, ent, grad_log_prob, grad_entropy, temperature, chunk, *ctx.needs,
                mm_dtype, block=block, shard=shard,
            )  # fmt: skip
            grads = tuple(g if need else None for g, need in zip(grads, ctx.needs, strict=True))
        return *grads, None, None, None


def _composition_grads(x, weight, bias, target, options, needs, grad_log_prob, grad_entropy):
    """The gradients of the composition (the head's matmul in the matmul dtype, then
    :func:`log_probs_of_logits`) with ``create_graph``: second derivatives are torch's."""
    temperature, _, entropy, mm_dtype, _, _ = options

    def outputs(x, weight, bias):
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(
                x.to(mm_dtype), weight.to(mm_dtype), bias.to(mm_dtype) if bias is not None else None
            )
        out = log_probs_of_logits(logits, target.reshape(-1), temperature, entropy)
        return torch.stack(out) if entropy else out

    zeros = x.new_zeros(x.shape[0], dtype=compute_dtype(mm_dtype))  # for an output whose grad is None
    grads = [g.reshape(-1) if g is not None else zeros for g in (grad_log_prob, grad_entropy)]
    return differentiable_grads(
        outputs, (x, weight, bias), needs, torch.stack(grads) if entropy else grads[0]
    )


def check_temperature(temperature) -> float:
    """``temperature`` as a float: a finite number > 0, else a ValueError."""
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not 0.0 < temperature < float("inf")
    ):
        raise ValueError(f"{OP}: temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def linear_log_probs(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    linear_bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per token, ``log_softmax(z)[target]`` (and the entropy of ``softmax(z)``) for the logits
    ``z = F.linear(input, linear_weight, linear_bias) / temperature``, without materializing
    them: the values, dtypes, shapes and gradients of :func:`linear_log_probs_reference`.

    Args:
        input: hidden states (H,), (N, H) or (B, T, ..., H); fp32, fp64, fp16, bf16.
        linear_weight: (V, H), the input's dtype (under autocast: any of fp32/fp16/bf16).
        linear_bias: (V,) or None.
        target: the tokens whose log-probs are wanted, int64 (or uint8), of the input's
            leading shape ((), (N,), (B, T, ...)); -100 selects none: that token's log-prob is
            0 and gets no gradient (its entropy is still its distribution's).
        temperature: a finite number > 0 dividing the logits (the sampling temperature).
        return_entropy: also return each token's entropy ``-Σ_v p_v log p_v``, for every token
            (targets of -100 included).

    Returns:
        The log-probs, of ``target``'s shape (with ``return_entropy``: ``(log_probs,
        entropy)``, both of that shape), fp32 (fp64 for fp64 inputs), also under autocast
        (whose dtype the matmul then runs in). Log-probs are never positive and entropies
        never negative. Both are differentiable in input, weight and bias, through either or
        both (an output whose grad is None costs nothing in the backward).

    Tensors the Triton kernels do not run on (CPU without ``TRITON_INTERPRET=1``, tensor
    subclasses such as DTensor but the layout below) go to the composition, which holds all the
    logits.

    **Vocabulary-parallel heads.** A ``linear_weight`` that is a DTensor placed ``(Shard(0),)``
    on a 1-D mesh (tensor parallel; uneven shards allowed), with ``linear_bias`` placed alike or
    None and ``input`` and ``target`` DTensors ``(Replicate(),)`` on that mesh or plain tensors
    equal on every rank: each rank runs the vocabulary order on its own classes and the ranks
    exchange each row's max, sum of exponentials, target logit and entropy sum (one
    all-gather of 4 numbers a token), then, in the backward, sum the input's gradient (one
    all-reduce of ``N x H``): no logits and no weight gathered
    (``fusedopt.losses._vocab_parallel``). The outputs are the same on every rank (DTensors
    ``(Replicate(),)`` when ``input`` is one); the gradients of the weight and bias are DTensors
    placed as they are, the input's as the input. ``create_graph=True`` is not supported there.
    """
    temperature = check_temperature(temperature)
    if not isinstance(return_entropy, bool):
        raise TypeError(f"{OP}: return_entropy must be a bool, got {return_entropy!r}")
    # a head sharded over the vocabulary (tensor parallel): each rank computes on its classes and
    # the rows' statistics are combined across the ranks (fusedopt.losses._vocab_parallel)
    shard = vocab_parallel.vocab_shard(linear_weight, (input, target), (linear_bias,))
    operands = (input, linear_weight, linear_bias, target)
    if shard is not None:
        operands = tuple(vocab_parallel.to_local(t) for t in operands)
    x, w, b, y = operands
    fusable, autocast, mm_dtype = head_mode(x, w, y, b)
    if not fusable:
        return linear_log_probs_reference(
            input, linear_weight, target, linear_bias, temperature=temperature, return_entropy=return_entropy
        )
    # the weight and bias as given: the whole vocabulary's shapes
    check_linear_head(x, linear_weight, linear_bias, y, None, 0.0, autocast, OP)
    if y.shape != x.shape[:-1]:
        raise RuntimeError(
            f"{OP}: target must have the input's leading shape {list(x.shape[:-1])}, got {list(y.shape)}"
        )
    hidden, vocab = x.shape[-1], w.shape[0]
    rows = x.reshape(-1, hidden)
    chunk = launch.chunk_rows(rows.shape[0], hidden, vocab)
    # the vocabulary order only, its blocks as large as the chunks
    block = vocab_block(rows.shape[0], vocab, chunk) if shard is not None else None
    grad = torch.is_grad_enabled()
    needs = tuple(grad and t is not None and t.requires_grad for t in (x, w, b))
    if any(needs):
        options = (temperature, chunk, return_entropy, mm_dtype, block, shard)
        out = _LinearLogProbs.apply(rows, w, b, y, options, needs)
    else:
        log_prob, entropy, _ = launch.forward(
            rows, w, b, y, temperature, chunk, return_entropy, False, mm_dtype, block=block, shard=shard
        )
        out = (log_prob, entropy) if return_entropy else log_prob
    if shard is None:
        return out
    if return_entropy:
        return tuple(vocab_parallel.like_input(t, input, shard) for t in out)
    return vocab_parallel.like_input(out, input, shard)
