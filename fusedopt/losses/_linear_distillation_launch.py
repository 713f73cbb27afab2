"""Launchers of the fused linear distillation loss (checks, chunk rule, the chunk loop), the layer
under the autograd Function of ``fusedopt.losses.linear_distillation``, and its custom ops for
torch.compile (``fusedopt::linear_distillation``, ``fusedopt::linear_distillation_backward``).

The token order of the linear cross-entropy (:func:`token_chunks` of
``fusedopt.losses._linear_cross_entropy_launch``) runs the student's head: per chunk of ``c``
tokens its logits ``Z_s`` in the engine's buffer. The row step computes the teacher's logits of
the same tokens into a second buffer of the same layout (``Z_t = X_t,k W_tᵀ (+ b_t)``, no
gradient), then ``distillation_kernel`` (``fusedopt.kernels.distillation``) writes the rows'
divergences and overwrites ``Z_s`` with its gradient; the engine then does the gradient
matmuls. Two ``c x V`` buffers at a time, never ``N x V``.

The vocabulary order (:func:`_blocks`, for heads sharded over the vocabulary: tensor parallel)
takes all the tokens per block of classes instead, both heads' block logits in two ``N x K``
buffers, and runs the kernel's passes one after the other over all the blocks (the logits
computed again for each): pass 1 the rows' max and sum of exponentials, pass 2 their divergence
and ``Σ p_s a``, then the gradient pass on the linear cross-entropy's engine
(:func:`vocab_blocks`). Each pass's per-row state is combined across the ranks once
(``fusedopt.losses._vocab_parallel``), never the logits.

Before the chunks the rows kept are counted (the ``mean`` divisor; a torch reduction on the
device, no host sync); after them ``cross_entropy_sum_kernel`` reduces the row divergences in a
fixed order. No float atomics.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton

from fusedopt._multi_tensor import TL_DTYPE, compute_dtype
from fusedopt.kernels import distillation as kernels
from fusedopt.losses import _vocab_parallel as vocab_parallel
from fusedopt.losses._common import checked_grid, compilable
from fusedopt.losses._cross_entropy_launch import _guard, _row_tile, _scalar_name, _total, same_device
from fusedopt.losses._linear_cross_entropy_launch import (
    Head,
    _backward_fake,
    _empty,
    _padded,
    block_buffer,
    block_logits,
    check_head,
    head,
    token_chunks,
    vocab_blocks,
)
from fusedopt.losses._linear_cross_entropy_launch import chunk_rows as _chunk_rows

DIVERGENCES = ("kl", "reverse_kl", "jsd")
FORWARD_KL, REVERSE_KL, JSD = kernels.FORWARD_KL.value, kernels.REVERSE_KL.value, kernels.JSD.value
OP = "linear_distillation_loss"
# distillation_kernel's pass 1 state as vocab_parallel.combine_rows combines it: the student's max
# and sum of exp(s - max), the teacher's
LSE_STATE = (vocab_parallel.MAX, 0, vocab_parallel.MAX, 2)


def kernel_divergence(divergence: str, beta: float) -> int:
    """The kernel's divergence: the JSD at ``β = 0`` is the forward KL ``KL(p_t ‖ p_s)`` and at
    ``β = 1`` the reverse KL ``KL(p_s ‖ p_t)`` (the limits of ``JSD / β`` and ``JSD / (1 - β)``;
    the JSD itself is 0 there), as TRL's ``generalized_jsd_loss``."""
    if divergence == "kl" or (divergence == "jsd" and beta == 0.0):
        return FORWARD_KL
    if divergence == "reverse_kl" or beta == 1.0:
        return REVERSE_KL
    return JSD


def chunk_rows(num_rows: int, hidden: int, vocab: int) -> int:
    """Default rows per chunk: the two chunk buffers (the student's and the teacher's logits)
    together about the size of the input (the linear cross-entropy's rule for ``2 V``)."""
    return _chunk_rows(num_rows, hidden, 2 * vocab)


def check(xs, ws, bs, xt, wt, bt, target: torch.Tensor | None, autocast: bool) -> None:
    """Raise what the composition raises for the heads (``F.linear``'s errors), and clear errors
    where the student and the teacher do not fit: another vocabulary, other tokens, another dtype
    (without autocast), a target that is not integer or not of the tokens' shape."""
    check_head(xs, ws, bs, autocast, (OP, "student_weight", "student_bias"))
    check_head(xt, wt, bt, autocast, (OP, "teacher_weight", "teacher_bias"))
    if ws.shape[0] != wt.shape[0]:
        raise ValueError(
            f"{OP}: the student's vocabulary ({ws.shape[0]}: student_weight {list(ws.shape)}) and the "
            f"teacher's ({wt.shape[0]}: teacher_weight {list(wt.shape)}) must be the same"
        )
    if xs.shape[:-1] != xt.shape[:-1]:
        raise ValueError(
            f"{OP}: student_input {list(xs.shape)} and teacher_input {list(xt.shape)} must have the same "
            "tokens (all dims but the last)"
        )
    if not autocast and xt.dtype != xs.dtype:
        raise RuntimeError(
            f"{OP}: the teacher's dtype ({_scalar_name(xt.dtype)}) must be the student's "
            f"({_scalar_name(xs.dtype)}); cast one, or run under autocast"
        )
    same_device(xs, teacher_input=xt, teacher_weight=wt, target=target)
    if target is not None:
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise RuntimeError(f"{OP}: target must be an integer tensor, got {_scalar_name(target.dtype)}")
        if target.shape != xs.shape[:-1]:
            raise ValueError(
                f"{OP}: target {list(target.shape)} must have the tokens' shape {list(xs.shape[:-1])}"
            )


class _Problem(NamedTuple):
    """What the chunks read: both heads, the flat targets (or None), the kept-rows totals and the
    options as the kernel takes them."""

    student: Head
    teacher: Head
    target: torch.Tensor | None
    totals: torch.Tensor
    divergence: int
    beta: float
    temperature: float
    ignore_index: int


def _problem(
    xs, ws, bs, xt, wt, bt, target, divergence, beta, temperature, ignore_index, mm_dtype
) -> _Problem:
    n, compute = xs.shape[0], compute_dtype(mm_dtype)
    flat = target.reshape(-1) if target is not None else None
    if flat is None:
        kept = torch.full((), n, dtype=compute, device=xs.device)
    else:
        kept = (flat.long() != ignore_index).sum(dtype=compute)  # as the kernel compares
    totals = torch.stack((kept, kept, kept.reciprocal()))  # the cross-entropy stats' layout
    return _Problem(
        head(xs, ws, bs, mm_dtype), head(xt, wt, bt, mm_dtype), flat, totals,
        kernel_divergence(divergence, beta), beta, temperature, ignore_index,
    )  # fmt: skip


def _chunks(
    p: _Problem,
    chunk: int,
    grads: tuple[bool, bool, bool],
    stats: torch.Tensor,
    *,
    row_loss: torch.Tensor | None = None,
    divide_by_total: bool = False,
    grad_output: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The token order with the distillation row kernel: writes ``row_loss`` and ``stats`` [3, N]
    if ``row_loss`` is given, else reads ``stats``; the gradients asked by ``grads``."""
    n, vocab = p.student.x.shape[0], p.student.weight.shape[0]
    t_buffer = p.teacher.x.new_empty((min(chunk, n), _padded(vocab)))
    want = any(grads)

    def rows_step(z: torch.Tensor, start: int, stop: int) -> None:
        t = p.teacher.logits(t_buffer[: stop - start, :vocab], rows=slice(start, stop))
        _launch_rows(
            z, t, p, slice(start, stop), stats, row_loss=row_loss, grad=want, divide_by_total=divide_by_total,
            grad_output=grad_output,
        )  # fmt: skip

    return token_chunks(p.student, chunk, grads, rows_step)


def _blocks(
    p: _Problem,
    block: int,
    grads: tuple[bool, bool, bool],
    stats: torch.Tensor,
    shard: vocab_parallel.VocabShard | None,
    *,
    row_loss: torch.Tensor | None = None,
    divide_by_total: bool = False,
    grad_output: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The vocabulary order, as :func:`_chunks` but over blocks of ``block`` classes with all
    the tokens, both heads' logits of a block in two ``N x block`` buffers; the kernel's passes
    in turn over all the blocks, each a launch per block: if ``row_loss`` is given, pass 1 (the
    rows' max and sum of exponentials of both heads, then ``stats``' log-sum-exps) and pass 2
    (the rows' divergences and ``Σ p_s a``, and for the forward KL the gradient); if gradients
    are asked (and not already in pass 2) the gradient pass, from ``stats``. The gradient passes
    run on :func:`vocab_blocks` of the linear cross-entropy.

    With a ``shard`` (``fusedopt.losses._vocab_parallel``) the heads hold that slice of the
    vocabulary: the passes leave every row unfinished and ``combine_rows`` makes each pass's
    state global (after pass 1 its 4 statistics, after pass 2 the divergence and, but for the
    forward KL, ``Σ p_s a``), a launch over no classes finishing the rows; ``vocab_blocks``
    sums ``grad_X`` across the ranks: three collectives a call (two without ``grad_X``), whatever
    N, V or the blocks."""
    s_head, t_head = p.student, p.teacher
    n, vocab = s_head.x.shape[0], s_head.weight.shape[0]
    s_buffer, t_buffer = block_buffer(s_head.x, block, vocab), block_buffer(t_head.x, block, vocab)
    state = s_head.x.new_empty((4, n), dtype=stats.dtype)
    kl = p.divergence == FORWARD_KL
    fused = row_loss is not None and kl and any(grads)  # the gradient in pass 2
    options = dict(row_loss=row_loss, divide_by_total=divide_by_total, grad_output=grad_output, state=state)

    def launch(z: torch.Tensor | None, v0: int, v1: int, **kwargs) -> None:
        """The classes v0 .. v1 - 1 (local; none: the rows finished) of both heads, the student's
        logits ``z`` if computed already."""
        if v1 == v0:  # an aligned address of no columns
            z = t = state.as_strided((n, 0), (0, 1))
        else:
            z = z if z is not None else block_logits(s_head, s_buffer, v0, v1)
            t = block_logits(t_head, t_buffer, v0, v1)
        _launch_rows(z, t, p, slice(None), stats, **options, **kwargs)

    def last(v1: int) -> bool:
        return shard is None and v1 == vocab

    if row_loss is not None:
        for v0 in range(0, max(vocab, 1), block):  # pass 1 (an empty shard: one window of no classes)
            v1 = min(v0 + block, vocab)
            launch(None, v0, v1, passes=(True, False), grad=False, first=v0 == 0, last=last(v1))
        if shard is not None:  # the other ranks' classes, then the rows finished
            state.copy_(vocab_parallel.combine_rows(state, shard, LSE_STATE))
            launch(None, vocab, vocab, passes=(True, False), grad=False, first=False, last=True)
        state[:2] = 0  # pass 2 sums from 0
        pass_2 = dict(passes=(False, True), first=False)
        if fused:
            gradients = vocab_blocks(
                s_head, s_buffer, block, grads,
                lambda z, v0, v1: launch(z, v0, v1, grad=True, last=last(v1), **pass_2), shard,
            )  # fmt: skip
        else:
            for v0 in range(0, vocab, block):
                v1 = min(v0 + block, vocab)
                launch(None, v0, v1, grad=False, last=last(v1), **pass_2)
        if shard is not None:  # the divergences (and Σ p_s a) summed over the ranks, then finished
            sums = 1 if kl else 2
            state[:sums] = vocab_parallel.combine_rows(state[:sums], shard, (vocab_parallel.SUM,) * sums)
            launch(None, vocab, vocab, grad=False, last=True, **pass_2)
        if fused:
            return gradients
    return vocab_blocks(
        s_head, s_buffer, block, grads,
        lambda z, v0, v1: launch(z, v0, v1, passes=(False, False), grad=True), shard,
    )  # fmt: skip


def _launch_rows(
    z: torch.Tensor,
    t: torch.Tensor,
    p: _Problem,
    rows: slice,
    stats: torch.Tensor,
    *,
    row_loss: torch.Tensor | None,
    grad: bool,
    divide_by_total: bool,
    grad_output: torch.Tensor | None,
    passes: tuple[bool, bool] | None = None,
    state: torch.Tensor | None = None,
    first: bool = True,
    last: bool = True,
) -> None:
    """One ``distillation_kernel`` launch over the rows ``rows`` (student logits ``z``, teacher
    logits ``t``: buffers whose rows are padded to 16 elements). The token order gives whole
    rows: passes 1 and 2 when ``row_loss`` is given. The vocabulary order gives a window of the
    classes and names the ``passes`` (pass 1, pass 2), its running ``state`` [4, N] and whether
    the window is the rows' ``first`` and ``last``."""
    num_rows, vocab = z.shape
    if num_rows == 0:
        return
    if (
        z.stride() != t.stride()
        or z.stride(1) != 1
        or z.stride(0) % 16
        or z.data_ptr() % 16
        or t.data_ptr() % 16
    ):
        raise RuntimeError("fusedopt: distillation rows must be 16-byte aligned chunk buffers of one layout")
    if state is not None and (state.shape != (4, num_rows) or state.stride(0) != stats.stride(0)):
        raise RuntimeError("fusedopt: the distillation state must be [4, N] with the stats' row stride")
    lse, sums = passes if passes is not None else (row_loss is not None,) * 2
    # half the cross-entropy kernel's blocks: two rows and more live values per element (8 fp32
    # elements a thread at 8 warps, no spills on sm_90)
    tile_rows, block, num_warps = _row_tile(
        num_rows, max(vocab, 1), z.dtype, narrow=2
    )  # (no columns: finish)
    stats = stats[:, rows]
    unused = stats
    jsd = p.divergence == JSD
    kernels.distillation_kernel[checked_grid(triton.cdiv(num_rows, tile_rows))](
        z,
        t,
        p.target[rows] if p.target is not None else unused,
        stats,
        state if state is not None else unused,
        row_loss[rows] if row_loss is not None else unused,
        p.totals,
        grad_output[rows] if grad_output is not None else unused,
        num_rows,
        vocab,
        z.stride(0),
        stats.stride(0),
        p.target.stride(0) if p.target is not None else 0,
        grad_output.stride(0) if grad_output is not None else 0,
        p.ignore_index,
        1.0 / p.temperature,
        p.beta,
        math.log(p.beta) if jsd else 0.0,
        math.log1p(-p.beta) if jsd else 0.0,
        DTYPE=TL_DTYPE[z.dtype],
        COMPUTE=TL_DTYPE[stats.dtype],
        LOSS_DTYPE=TL_DTYPE[row_loss.dtype if row_loss is not None else stats.dtype],
        ROWS=tile_rows,
        BLOCK=block,
        DIVERGENCE=p.divergence,
        HAS_TARGET=p.target is not None,
        LSE=lse,
        SUMS=sums,
        GRAD=grad,
        FIRST=first,
        LAST=last,
        DIVIDE_BY_TOTAL=divide_by_total,
        ROW_GRAD_OUTPUT=grad_output is not None,
        num_warps=num_warps,
    )


def _forward_fake(xs, ws, bs, xt, wt, bt, target, divergence, beta, temperature, ignore_index, reduction, chunk,
                  need_input, need_weight, need_bias, mm_dtype, out_dtype):  # fmt: skip
    compute, none, n = compute_dtype(mm_dtype), reduction == "none", xs.shape[0]
    loss = xs.new_empty((n,) if none else (), dtype=out_dtype)
    grad_input = xs.new_empty(xs.shape) if need_input and not none else _empty(xs)
    grad_weight = ws.new_empty(ws.shape) if need_weight and not none else _empty(xs)
    grad_bias = bs.new_empty(bs.shape) if need_bias and not none else _empty(xs)
    keep = none and (need_input or need_weight or need_bias)
    return loss, grad_input, grad_weight, grad_bias, xs.new_empty((3, n) if keep else (0,), dtype=compute)


@compilable("linear_distillation", _forward_fake)
def forward(
    xs: torch.Tensor, ws: torch.Tensor, bs: torch.Tensor | None,  # the student's head
    xt: torch.Tensor, wt: torch.Tensor, bt: torch.Tensor | None,  # the teacher's
    target: torch.Tensor | None,
    divergence: str, beta: float, temperature: float, ignore_index: int, reduction: str, chunk: int,
    need_input: bool, need_weight: bool, need_bias: bool,
    mm_dtype: torch.dtype, out_dtype: torch.dtype,
    *, block: int | None = None, shard: vocab_parallel.VocabShard | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The forward over the student's ``xs`` [N, Hs] and the teacher's ``xt`` [N, Ht] (arguments
    checked by :func:`check`): ``(loss, grad_input, grad_weight, grad_bias, stats)``. ``loss`` is
    [N] for ``none``, else 0-d. For ``mean``/``sum`` the asked gradients (of the student's
    input, weight, bias) are those of the loss for a ``grad_output`` of 1; for ``none`` none is
    computed, and ``stats`` [3, N] (each row's ``lse(s)``, ``lse(t)``, ``Σ p_s a``) is kept
    for the backward when any is asked. Tensors not computed are empty. ``block`` selects the
    vocabulary order (blocks of that many classes, :func:`_blocks`), required with a ``shard``
    (the heads' weights and biases this rank's slice of the vocabulary); both eager only."""
    none = reduction == "none"
    grads = (need_input, need_weight, need_bias)
    n = xs.shape[0]
    compute = compute_dtype(mm_dtype)
    with _guard(xs.device), torch.autocast(xs.device.type, enabled=False):
        p = _problem(xs, ws, bs, xt, wt, bt, target, divergence, beta, temperature, ignore_index, mm_dtype)
        row_loss = xs.new_empty(n, dtype=out_dtype if none else compute)
        stats = xs.new_empty((3, n), dtype=compute)
        gi, gw, gb = _loop(
            p, chunk, block, (False, False, False) if none else grads, stats, shard, row_loss=row_loss,
            divide_by_total=reduction == "mean",
        )  # fmt: skip
        loss = _total(row_loss, p.totals, reduction, out_dtype, (n,))
    return loss, gi, gw, gb, stats if none and any(grads) else stats.new_empty(0)


@compilable("linear_distillation_backward", _backward_fake)
def backward_none(
    xs: torch.Tensor, ws: torch.Tensor, bs: torch.Tensor | None,  # the student's head
    xt: torch.Tensor, wt: torch.Tensor, bt: torch.Tensor | None,  # the teacher's
    target: torch.Tensor | None, stats: torch.Tensor, grad_output: torch.Tensor,
    divergence: str, beta: float, temperature: float, ignore_index: int, chunk: int,
    need_input: bool, need_weight: bool, need_bias: bool,
    mm_dtype: torch.dtype,
    *, block: int | None = None, shard: vocab_parallel.VocabShard | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The gradients of ``reduction="none"``: both chunks' logits recomputed, the student's
    turned into their gradient times each row's ``grad_output`` from the forward's row
    statistics (the gradient pass alone), then the engine's matmuls (``block``, ``shard``: as
    :func:`forward`)."""
    with _guard(xs.device), torch.autocast(xs.device.type, enabled=False):
        p = _problem(xs, ws, bs, xt, wt, bt, target, divergence, beta, temperature, ignore_index, mm_dtype)
        grads = (need_input, need_weight, need_bias)
        return _loop(p, chunk, block, grads, stats, shard, grad_output=grad_output.reshape(-1))


def _loop(p: _Problem, chunk: int, block: int | None, grads, stats, shard, **kwargs):
    """The vocabulary order when ``block`` is given (the only one that takes a ``shard``), else
    token chunks of ``chunk`` rows."""
    if block:
        return _blocks(p, block, grads, stats, shard, **kwargs)
    if shard is not None:
        raise ValueError("a vocabulary-parallel head runs the vocabulary order only (a block size)")
    return _chunks(p, chunk, grads, stats, **kwargs)
