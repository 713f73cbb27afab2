"""Launchers of the fused linear + cross-entropy (checks, chunk rule, the chunk loop), the layer
under the autograd Function of ``fusedopt.losses.linear_cross_entropy``, and its custom ops for
torch.compile (``fusedopt::linear_cross_entropy``, ``fusedopt::linear_cross_entropy_backward``).

The tokens ``X`` [N, H] are taken in chunks of ``c`` rows; one buffer of ``c x V`` logits is
reused by every chunk. Per chunk ``k``:

1. ``Z_k = X_k Wᵀ (+ b)`` into the buffer (cuBLAS through torch, the matmul dtype);
2. ``cross_entropy_kernel`` (``fusedopt.kernels.cross_entropy``) reads the buffer, writes the
   rows' losses and, when gradients are wanted, overwrites the buffer with ``dZ_k`` (the
   gradient of the reduced loss for a ``grad_output`` of 1, or of each row's ``grad_output``
   for the backward of ``none``);
3. ``grad_X_k = dZ_k W`` into its rows of ``grad_input``; ``grad_W += dZ_kᵀ X_k`` in fp32
   (``addmm_`` when the matmul dtype is fp32/fp64, else ``matmul_accumulate_kernel``);
   ``grad_b += Σ_rows dZ_k`` in fp32.

The vocabulary order (``block`` > 0, the public ``chunk_classes``) takes all the tokens per
block of classes instead (:func:`_blocks`): the blocks' logits into each row's running
log-sum-exp (``logsumexp_block_kernel``), then the logits again, their gradient (the row kernel
on a window of classes), ``grad_W[block] = dZᵀ X`` written once and ``grad_X += dZ W[block]``
in fp32: no ``V x H`` fp32 sum, one matmul more.

Before the chunks, ``cross_entropy_targets_kernel`` computes the ``mean`` divisor and checks
the targets (one launch over all N); after them, ``cross_entropy_sum_kernel`` reduces the row
losses (fixed order). No host sync, no float atomics: the result does not depend on
scheduling, and the chunk order is fixed.

Grids are 1-D and below CUDA's limit of 2^31 - 1 programs by their size rules (128 x 128
tiles of a matmul; at most one program per token, or per 2048 logits, for the row kernels):
``checked_grid`` refuses a launch that would exceed it rather than failing on the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import triton

from fusedopt._multi_tensor import INTERPRET, TL_DTYPE, compute_dtype
from fusedopt.kernels import linear_cross_entropy as kernels
from fusedopt.losses import _cross_entropy_launch as ce_launch
from fusedopt.losses import _vocab_parallel as vocab_parallel
from fusedopt.losses._common import compilable
from fusedopt.losses._cross_entropy_launch import _check as _check_cross_entropy
from fusedopt.losses._cross_entropy_launch import (
    _guard,
    _launch_rows,
    _scalar_name,
    _targets,
    _total,
    checked_grid,
    same_device,
)

CHUNK_MULTIPLE = 256  # chunks are whole multiples of this many rows (but the last)
HALF = (torch.float16, torch.bfloat16)
# logsumexp_block_kernel's state rows as vocab_parallel.combine_rows combines them: the max, the
# sum of exp(z - max), the target's logit, Σ_c w_c z_c
LSE_STATE = (vocab_parallel.MAX, 0, vocab_parallel.SUM, vocab_parallel.SUM)


def chunk_rows(num_rows: int, hidden: int, vocab: int) -> int:
    """Default rows per chunk: the chunk's logits about the size of the input (``c V ≈ N H``),
    rounded up to a multiple of ``CHUNK_MULTIPLE`` (matmuls of fewer rows run far below peak),
    at most ``N``."""
    wanted = -(-num_rows * hidden // max(vocab, 1))
    return max(1, min(num_rows, -(-wanted // CHUNK_MULTIPLE) * CHUNK_MULTIPLE))


def vocab_block(num_rows: int, vocab: int, chunk: int) -> int:
    """Classes per block of the vocabulary order standing in for token chunks of ``chunk``
    rows (the vocabulary-parallel path runs only that order): a block's logits (``N x K``)
    about the size of a chunk's (``c x V``): :func:`chunk_rows` with the roles swapped."""
    return chunk_rows(vocab, chunk, num_rows)


def check(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    class_weight: torch.Tensor | None,
    label_smoothing: float,
    autocast: bool,
    op: str = "linear_cross_entropy",
) -> None:
    """Raise what ``F.cross_entropy(F.linear(input, weight, bias), target, ...)`` raises (the
    logits' class dim moved to dim 1 for inputs of 3 or more dims). Under ``autocast`` the
    operands may differ in dtype (autocast casts them) and cross-entropy runs in fp32, as in
    torch. ``op`` names the op in the errors of its own."""
    check_head(input, weight, bias, autocast, (op, "linear_weight", "linear_bias"))
    vocab = weight.shape[0]
    # cross-entropy's checks on logits of the composed shape (a zero-stride view: no memory)
    logits_dtype = torch.float32 if autocast else input.dtype
    lead = input.shape[:-1]
    shape = (*lead, vocab) if input.dim() <= 2 else (lead[0], vocab, *lead[1:])
    logits = torch.empty((), dtype=logits_dtype, device=input.device).expand(shape)
    if autocast and class_weight is not None and class_weight.dtype in HALF:
        class_weight = class_weight.float()  # autocast runs cross-entropy in fp32
    _check_cross_entropy(logits, target, class_weight, label_smoothing)


def check_head(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    autocast: bool,
    names: tuple[str, str, str] = ("linear_cross_entropy", "linear_weight", "linear_bias"),
) -> None:
    """Raise what ``F.linear(input, weight, bias)`` raises, for a head (the op's name, and the
    weight's and bias's argument names, in ``names``). Under ``autocast`` the operands may
    differ in dtype (autocast casts them)."""
    op, weight_name, bias_name = names
    if input.dim() == 0 or weight.dim() == 0:
        raise RuntimeError(
            f"both arguments to linear need to be at least 1D, but they are {input.dim()}D and {weight.dim()}D"
        )
    if weight.dim() != 2:
        raise RuntimeError(f"{op}: {weight_name} must be 2-D (V, H), got {weight.dim()}-D")
    vocab, hidden = weight.shape
    if input.shape[-1] != hidden:
        rows = math.prod(input.shape[:-1])
        raise RuntimeError(
            f"mat1 and mat2 shapes cannot be multiplied ({rows}x{input.shape[-1]} and {hidden}x{vocab})"
        )
    if not autocast and input.dtype != weight.dtype:
        raise RuntimeError(
            f"expected m1 and m2 to have the same dtype, but got: {_scalar_name(input.dtype)} != "
            f"{_scalar_name(weight.dtype)}"
        )
    if bias is not None:
        if bias.shape != (vocab,):
            raise RuntimeError(f"{op}: {bias_name} must have shape ({vocab},), got {list(bias.shape)}")
        if not autocast and bias.dtype != weight.dtype:
            raise RuntimeError(
                f"self and mat2 must have the same dtype, but got {_scalar_name(bias.dtype)} and "
                f"{_scalar_name(weight.dtype)}"
            )
    same_device(input, **{weight_name: weight, bias_name: bias})


def check_chunk(chunk_rows: int | None, chunk_classes: int | None) -> None:
    """``chunk_rows`` and ``chunk_classes``: each a positive int or None, not both given."""
    for name, value in (("chunk_rows", chunk_rows), ("chunk_classes", chunk_classes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"linear_cross_entropy: {name} must be a positive int or None, got {value!r}")
    if chunk_rows is not None and chunk_classes is not None:
        raise ValueError(
            "linear_cross_entropy: give chunk_rows (token chunks) or chunk_classes (vocabulary blocks), not both"
        )


def _empty(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty(0)


def _padded(columns: int) -> int:
    """``columns`` rounded up to a multiple of 16: a logits buffer with rows this long starts
    every row on a 16-byte boundary, so the row kernels read and write it with 128-bit accesses
    at any vocabulary size (cuBLAS writes a row stride above the width), and the matmuls that
    take it as their first operand may read its rows to the padding (``_accumulate``)."""
    return -(-columns // 16) * 16


class Head(NamedTuple):
    """A linear head: ``x`` [N, H], ``weight`` [V, H], ``bias`` [V] in the matmul dtype, and
    the dtypes of the gradients (input, weight, bias): the tensors' own; its logits times
    ``scale`` (``1 / temperature``; the gradient a row step leaves is the unscaled logits').
    What every chunked op (this one, ``linear_log_probs``, the distillation loss) reads."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    grad_dtypes: tuple[torch.dtype, torch.dtype, torch.dtype]
    scale: float = 1.0

    def logits(
        self, out: torch.Tensor, rows: slice = slice(None), classes: slice = slice(None)
    ) -> torch.Tensor:
        """``(x[rows] weight[classes]ᵀ (+ bias[classes])) · scale`` into ``out`` (cuBLAS through
        torch; the scale is the matmul's alpha and beta: no pass of its own)."""
        x, w, scale = self.x[rows], self.weight[classes].t(), self.scale
        if self.bias is not None:
            return torch.addmm(self.bias[classes], x, w, beta=scale, alpha=scale, out=out)
        if scale != 1.0:  # beta 0: out's contents are not read (NaN included)
            return torch.addmm(out, x, w, beta=0.0, alpha=scale, out=out)
        return torch.mm(x, w, out=out)


def head(x, weight, bias, mm_dtype: torch.dtype, scale: float = 1.0) -> Head:
    """The matmul operands in ``mm_dtype`` (autocast's casts; no copy when already in it), the
    logits times ``scale``."""
    grad_dtypes = (x.dtype, weight.dtype, bias.dtype if bias is not None else weight.dtype)
    operands = (x.to(mm_dtype), weight.to(mm_dtype), bias.to(mm_dtype) if bias is not None else None)
    return Head(*operands, grad_dtypes, scale)


class _Problem(NamedTuple):
    """What both loop orders read: the head, the flat targets, the class weights, the targets
    kernel's ``stats`` and the options."""

    head: Head
    target: torch.Tensor
    class_weight: torch.Tensor | None
    stats: torch.Tensor
    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float  # 0: none


def token_chunks(
    h: Head,
    chunk: int,
    grads: tuple[bool, bool, bool],
    rows_step: Callable[[torch.Tensor, int, int], None],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The engine of the token order, shared by the chunked ops: chunks of ``chunk`` rows, one
    ``c x V`` logits buffer (rows :func:`_padded`) for all. Per chunk, ``rows_step(z, start,
    stop)`` gets the chunk's logits ``z`` [stop - start, V] and, when any gradient is asked,
    must leave in ``z`` the gradient of the loss in the logits; then ``grad_X = dZ W`` into the
    chunk's rows, ``grad_W += dZᵀ X`` and ``grad_b += Σ dZ`` in fp32 (fp64 for fp64). Returns
    the gradients asked by ``grads`` (input, weight, bias) in ``h.grad_dtypes``, empty
    otherwise."""
    x, weight, grad_dtypes = h.x, h.weight, h.grad_dtypes
    n, vocab = x.shape[0], weight.shape[0]
    want_input, want_weight, want_bias = grads
    acc_dtype = compute_dtype(x.dtype)
    grad_input = x.new_empty(x.shape, dtype=grad_dtypes[0]) if want_input else _empty(x)
    grad_weight = _zeros_for(weight, weight.shape, grad_dtypes[1], acc_dtype) if want_weight else _empty(x)
    grad_bias = x.new_zeros(vocab, dtype=acc_dtype) if want_bias else _empty(x)
    buffer = x.new_empty((min(chunk, n), _padded(vocab)))
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        z = h.logits(buffer[: stop - start, :vocab], rows=slice(start, stop))
        rows_step(z, start, stop)
        if want_input:
            if grad_input.dtype == z.dtype:
                torch.mm(z, weight, out=grad_input[start:stop])
            else:
                grad_input[start:stop] = z @ weight
        if want_weight:
            _accumulate(grad_weight, z.t(), x[start:stop], padded=True)
        if want_bias:
            grad_bias += z.sum(0, dtype=acc_dtype)
    return (
        grad_input,
        _finish(grad_weight, grad_dtypes[1], want_weight),
        _finish(grad_bias, grad_dtypes[2], want_bias),
    )


def _chunks(
    p: _Problem,
    chunk: int,
    grads: tuple[bool, bool, bool],
    *,
    row_loss: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    divide_by_total: bool = False,
    grad_output: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The token order (:func:`token_chunks`) with the cross-entropy row kernel. Writes
    ``row_loss`` if given (and ``lse`` with it, if given), else reads ``lse``; returns the
    gradients asked by ``grads``."""
    any_grad = any(grads)

    def rows_step(z: torch.Tensor, start: int, stop: int) -> None:
        rows = z.unsqueeze(1)
        _launch_rows(
            rows,
            p.target[start:stop],
            p.class_weight,
            p.stats,
            p.ignore_index,
            p.label_smoothing,
            lse=lse[start:stop] if lse is not None else None,
            loss=row_loss[start:stop] if row_loss is not None else None,
            grad_rows=rows if any_grad else None,
            grad_output=grad_output[start:stop] if grad_output is not None else None,
            save_lse=row_loss is not None and lse is not None,
            divide_by_total=divide_by_total,
            z_loss=p.z_loss,
            softcap=p.softcap,
        )

    return token_chunks(p.head, chunk, grads, rows_step)


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, padded: bool = False) -> None:
    """``acc += a @ b`` with ``acc`` in fp32 (fp64 for fp64 operands), summed in it. ``padded``:
    ``a`` is (a transpose of) logits in a buffer whose rows are :func:`_padded`, which the
    kernel may read past the last column (128-bit loads whatever the width)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    m, k = a.shape
    n = b.shape[1]
    if m == 0 or n == 0 or k == 0:
        return
    block_m, block_n, block_k = 128, 128, 64
    kernels.matmul_accumulate_kernel[checked_grid(triton.cdiv(m, block_m) * triton.cdiv(n, block_n))](
        acc,
        a,
        b,
        m,
        n,
        k,
        _padded(m) if padded and a.stride(0) == 1 else m,
        _padded(k) if padded and a.stride(0) != 1 and a.stride(1) == 1 else k,
        *acc.stride(),
        *a.stride(),
        *b.stride(),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=8,
        UPCAST=INTERPRET and a.dtype == torch.bfloat16,
        num_warps=8,
        num_stages=3,
    )


def block_buffer(x: torch.Tensor, block: int, vocab: int) -> torch.Tensor:
    """The vocabulary order's buffer: the logits of one block of ``block`` (of ``vocab``)
    classes for all the tokens of ``x`` [N, H], rows :func:`_padded` (for :func:`block_logits`)."""
    return x.new_empty(x.shape[0] * _padded(min(block, vocab)))


def block_logits(h: Head, buffer: torch.Tensor, v0: int, v1: int) -> torch.Tensor:
    """The logits of the classes ``v0 .. v1 - 1`` (``v1 > v0``) of all the tokens into
    ``buffer`` (:func:`block_buffer`): [N, v1 - v0], rows 16-byte aligned and :func:`_padded`."""
    n, width = h.x.shape[0], _padded(v1 - v0)
    return h.logits(buffer[: n * width].view(n, width)[:, : v1 - v0], classes=slice(v0, v1))


def vocab_blocks(
    h: Head,
    buffer: torch.Tensor,
    block: int,
    grads: tuple[bool, bool, bool],
    rows_step: Callable[[torch.Tensor, int, int], None],
    shard: vocab_parallel.VocabShard | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The engine of the vocabulary order's gradient pass, shared by the chunked ops (as
    :func:`token_chunks` is the token order's): per block of ``block`` classes ``v0 .. v1 - 1``,
    their logits ``z`` [N, v1 - v0] in ``buffer`` (:func:`block_logits`); ``rows_step(z, v0, v1)``
    must leave in ``z`` the gradient of the loss in them; then ``grad_W[block] = dZᵀ X``,
    written once with the matmul's own fp32 accumulation over all N tokens, ``grad_X += dZ
    W[block]`` in fp32 and ``grad_b[block] = Σ dZ``. With a ``shard`` (the head holds that
    slice of the vocabulary) ``grad_X``, a partial sum over the classes, is summed across the
    ranks (one ``all_reduce_``, in fp32 before its rounding). Returns the gradients asked by
    ``grads`` (input, weight, bias) in ``h.grad_dtypes``, empty otherwise (no pass when none
    is asked)."""
    x, weight, grad_dtypes = h.x, h.weight, h.grad_dtypes
    vocab = weight.shape[0]
    want_input, want_weight, want_bias = grads
    acc_dtype = compute_dtype(x.dtype)
    grad_input = _zeros_for(x, x.shape, grad_dtypes[0], acc_dtype) if want_input else _empty(x)
    grad_weight = weight.new_empty(weight.shape, dtype=grad_dtypes[1]) if want_weight else _empty(x)
    grad_bias = x.new_empty(vocab, dtype=acc_dtype) if want_bias else _empty(x)
    for v0 in range(0, vocab if any(grads) else 0, block):
        v1 = min(v0 + block, vocab)
        z = block_logits(h, buffer, v0, v1)
        rows_step(z, v0, v1)
        if want_weight:
            if grad_weight.dtype == z.dtype:
                torch.mm(z.t(), x, out=grad_weight[v0:v1])
            else:
                grad_weight[v0:v1] = 0
                _accumulate(grad_weight[v0:v1], z.t(), x, padded=True)
        if want_input:
            _accumulate(grad_input, z, weight[v0:v1], padded=True)
        if want_bias:
            torch.sum(z, 0, dtype=acc_dtype, out=grad_bias[v0:v1])
    if shard is not None and want_input:
        vocab_parallel.all_reduce_(grad_input, shard)
    return (
        _finish(grad_input, grad_dtypes[0], want_input),
        grad_weight,
        _finish(grad_bias, grad_dtypes[2], want_bias),
    )


def _blocks(
    p: _Problem,
    block: int,
    grads: tuple[bool, bool, bool],
    *,
    row_loss: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    divide_by_total: bool = False,
    grad_output: torch.Tensor | None = None,
    shard: vocab_parallel.VocabShard | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The vocabulary order, as :func:`_chunks` but over blocks of ``block`` classes with all
    the tokens: if ``row_loss`` is given, pass 1 (the blocks' logits into the rows' running
    log-sum-exp, then ``lse`` and the row losses); if gradients are asked, pass 2 (the logits
    again, their gradient from ``lse``, then the engine's matmuls: :func:`vocab_blocks`).
    ``lse`` is required: pass 1 writes it, pass 2 reads it.

    With a ``shard`` (``fusedopt.losses._vocab_parallel``) the head holds the classes
    ``shard.offset ...`` of ``shard.classes``: pass 1 leaves every row unfinished, one
    ``combine_rows`` makes the rows' state global and a launch over no classes finishes them;
    pass 2 as :func:`vocab_blocks` with the shard (one all-reduce of ``grad_X``)."""
    h = p.head
    target, class_weight, stats = p.target, p.class_weight, p.stats
    ignore_index, label_smoothing = p.ignore_index, p.label_smoothing
    n, vocab = h.x.shape[0], h.weight.shape[0]
    buffer = block_buffer(h.x, block, vocab)
    step = min(triton.next_power_of_2(block), ce_launch.MAX_BLOCK)  # the row kernel's size rule
    rows = max(1, ce_launch.MAX_TILE // step)

    col0, classes = (shard.offset, shard.classes) if shard is not None else (0, vocab)

    def merge(state: torch.Tensor, v0: int, v1: int, first: bool, last: bool) -> None:
        """The classes v0 .. v1 - 1 (local) into the rows' ``state``; ``last``: finish them."""
        z = block_logits(h, buffer, v0, v1) if v1 > v0 else state.as_strided((n, 0), (0, 1))  # none: aligned
        if n == 0:
            return
        kernels.logsumexp_block_kernel[checked_grid(triton.cdiv(n, rows))](
            z, target, class_weight if class_weight is not None else stats, stats, state, lse, row_loss,
            n, v1 - v0, col0 + v0, classes, z.stride(0), target.stride(0), ignore_index, label_smoothing,
            p.z_loss, p.softcap, DTYPE=TL_DTYPE[z.dtype], COMPUTE=TL_DTYPE[stats.dtype],
            LOSS_DTYPE=TL_DTYPE[row_loss.dtype], ROWS=rows, BLOCK=step, HAS_WEIGHT=class_weight is not None,
            SMOOTHING=label_smoothing > 0.0, FIRST=first, LAST=last, Z_LOSS=p.z_loss > 0.0,
            SOFTCAP=p.softcap > 0.0, num_warps=8,
        )  # fmt: skip

    if row_loss is not None:
        state = h.x.new_empty((4, n), dtype=stats.dtype)
        for v0 in range(0, max(vocab, 1), block):  # an empty shard: one window of no classes
            v1 = min(v0 + block, vocab)
            merge(state, v0, v1, v0 == 0, shard is None and v1 == vocab)
        if shard is not None:  # the other ranks' classes, then the rows finished (no classes more)
            state = vocab_parallel.combine_rows(state, shard, LSE_STATE)
            merge(state, vocab, vocab, False, True)

    def rows_step(z: torch.Tensor, v0: int, v1: int) -> None:
        rows_view = z.unsqueeze(1)
        _launch_rows(
            rows_view, target, class_weight, stats, ignore_index, label_smoothing, lse=lse, grad_rows=rows_view,
            grad_output=grad_output, divide_by_total=divide_by_total, col0=col0 + v0, classes=classes,
            z_loss=p.z_loss,
            softcap=p.softcap,
        )  # fmt: skip

    return vocab_blocks(h, buffer, block, grads, rows_step, shard)


def _loop(p: _Problem, chunk: int, block: int, grads: tuple[bool, bool, bool], shard=None, **kwargs):
    """The vocabulary order when ``block`` > 0 (the only one that takes a ``shard``), else
    token chunks of ``chunk`` rows."""
    if block:
        return _blocks(p, block, grads, shard=shard, **kwargs)
    if shard is not None:
        raise ValueError("a vocabulary-parallel head runs the vocabulary order only (block > 0)")
    return _chunks(p, chunk, grads, **kwargs)


def _zeros_for(like: torch.Tensor, shape, dtype: torch.dtype, acc_dtype: torch.dtype) -> torch.Tensor:
    """Zeros to sum a gradient of ``dtype`` into: itself when it is the accumulation dtype."""
    return like.new_zeros(shape, dtype=dtype if dtype == acc_dtype else acc_dtype)


def _finish(grad: torch.Tensor, dtype: torch.dtype, wanted: bool) -> torch.Tensor:
    """An accumulated gradient in its own dtype (rounded once; also when empty: a rank's
    slice of no classes); one not ``wanted`` (an empty placeholder) as it is."""
    return grad.to(dtype) if wanted and grad.dtype != dtype else grad


def _problem(
    x, weight, bias, target, class_weight, stats, ignore_index, label_smoothing, z_loss, softcap, mm_dtype
) -> _Problem:
    """The loops' inputs: the head in ``mm_dtype`` (:func:`head`) and the flat targets."""
    return _Problem(
        head(x, weight, bias, mm_dtype), target.reshape(-1), class_weight, stats, ignore_index, label_smoothing,
        z_loss, softcap,
    )  # fmt: skip


def _forward_fake(x, weight, bias, target, class_weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                  chunk, block, need_input, need_weight, need_bias, mm_dtype, out_dtype):  # fmt: skip
    compute, none = compute_dtype(mm_dtype), reduction == "none"
    loss = x.new_empty(target.shape if none else (), dtype=out_dtype)
    grad_input = x.new_empty(x.shape) if need_input and not none else _empty(x)
    grad_weight = weight.new_empty(weight.shape) if need_weight and not none else _empty(x)
    grad_bias = bias.new_empty(bias.shape) if need_bias and not none else _empty(x)
    keep = none and (need_input or need_weight or need_bias)
    lse = x.new_empty(x.shape[0] if keep else 0, dtype=compute)
    return loss, grad_input, grad_weight, grad_bias, x.new_empty(3, dtype=compute), lse


@compilable("linear_cross_entropy", _forward_fake)
def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    class_weight: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    chunk: int,
    block: int,
    need_input: bool,
    need_weight: bool,
    need_bias: bool,
    mm_dtype: torch.dtype,
    out_dtype: torch.dtype,
    *,
    shard: vocab_parallel.VocabShard | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward over ``x`` [N, H] and flat ``target`` [N] (arguments checked by
    :func:`check`): ``(loss, grad_input, grad_weight, grad_bias, stats, lse)``. For ``mean`` /
    ``sum`` the asked gradients are those of the loss for a ``grad_output`` of 1; for ``none``
    none is computed here, and ``lse`` (each row's log-sum-exp) is kept for the backward when
    any is asked. Tensors not computed are empty (an op returns no None). ``target`` keeps the
    caller's shape for the loss of ``none``. ``block`` > 0 selects the vocabulary order (blocks
    of that many classes, :func:`_blocks`), else tokens go in chunks of ``chunk`` rows. With a
    ``shard`` (eager only) the weight and bias are this rank's slice of the vocabulary and
    ``block`` must be > 0 (:func:`_blocks`)."""
    none = reduction == "none"
    grads = (need_input, need_weight, need_bias)
    n = x.shape[0]
    compute = compute_dtype(mm_dtype)
    with _guard(x.device), torch.autocast(x.device.type, enabled=False):
        classes = shard.classes if shard is not None else weight.shape[0]
        stats = _targets(target.reshape(-1), class_weight, classes, ignore_index, compute)
        row_loss = x.new_empty(n, dtype=out_dtype if none else compute)
        keep_lse = none and any(grads)  # for the backward; the vocabulary order needs it anyway
        lse = x.new_empty(n, dtype=compute) if keep_lse or block else None
        problem = _problem(
            x, weight, bias, target, class_weight, stats, ignore_index, label_smoothing, z_loss, softcap, mm_dtype
        )  # fmt: skip
        gi, gw, gb = _loop(
            problem, chunk, block, (False, False, False) if none else grads, row_loss=row_loss, lse=lse,
            divide_by_total=reduction == "mean", shard=shard,
        )  # fmt: skip
        loss = _total(row_loss, stats, reduction, out_dtype, target.shape)
    return loss, gi, gw, gb, stats, lse if keep_lse else _empty(stats)


def _backward_fake(x, weight, bias, *args):
    need_input, need_weight, need_bias = args[-4:-1]
    return (
        x.new_empty(x.shape) if need_input else _empty(x),
        weight.new_empty(weight.shape) if need_weight else _empty(x),
        bias.new_empty(bias.shape) if need_bias else _empty(x),
    )


@compilable("linear_cross_entropy_backward", _backward_fake)
def backward_none(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    class_weight: torch.Tensor | None,
    stats: torch.Tensor,
    lse: torch.Tensor,
    grad_output: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    chunk: int,
    block: int,
    need_input: bool,
    need_weight: bool,
    need_bias: bool,
    mm_dtype: torch.dtype,
    *,
    shard: vocab_parallel.VocabShard | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of ``reduction="none"``: the chunks' logits recomputed, turned into their
    gradient times each row's ``grad_output`` from the forward's log-sum-exp, then the same
    matmuls as the forward of ``mean``/``sum`` (``shard``: as :func:`forward`)."""
    problem = _problem(
        x, weight, bias, target, class_weight, stats, ignore_index, label_smoothing, z_loss, softcap, mm_dtype
    )
    grads = (need_input, need_weight, need_bias)
    with _guard(x.device), torch.autocast(x.device.type, enabled=False):
        return _loop(problem, chunk, block, grads, lse=lse, grad_output=grad_output.reshape(-1), shard=shard)
