"""Distillation divergences between a student's and a teacher's logits, row by row: each row's
divergence and, in place of the student's logits, their gradient.

A row is one token: student logits ``z_s`` and teacher logits ``z_t`` over the ``C`` classes,
scaled by the temperature ``T``: ``s = z_s / T``, ``t = z_t / T``; ``log p_s = s - lse(s)``,
``log p_t = t - lse(t)``. The divergences (``DIVERGENCE``) and their gradients in ``z_s``:

* ``FORWARD_KL``: ``KL(p_t ‖ p_s) = Σ_v p_t (log p_t - log p_s)``; gradient ``(p_s - p_t) / T``;
* ``REVERSE_KL``: ``KL(p_s ‖ p_t) = Σ_v p_s a``, ``a = log p_s - log p_t``; gradient
  ``p_s (a - Σ_v p_s a) / T``;
* ``JSD`` (``0 < β < 1``): with ``log M = logaddexp(log β + log p_t, log(1 - β) + log p_s)``,
  ``β KL(p_t ‖ M) + (1 - β) KL(p_s ‖ M)``; gradient ``p_s (a - Σ_v p_s a) / T`` with
  ``a = (1 - β)(log p_s - log M)`` (``∂loss/∂p_s``; the terms of ``p_t`` and ``M`` cancel).

**Terms that are never negative.** Each row's divergence is summed from terms that are each
``>= 0`` mathematically: the KLs as ``p (log p - log q) - p + q`` (``x log(x / y) - x + y >= 0``;
the added ``- p + q`` sums to ``1 - 1 = 0``, and makes the sum insensitive to an error in
either log-sum-exp to first order), the JSD's ``β p_t (log p_t - log M) + (1 - β) p_s (log p_s -
log M)`` as they are (``>= 0`` by the log-sum inequality, since ``M = β p_t + (1 - β) p_s``). A
term below 0 can only be rounding, and is clamped to 0 (where ``p_t = p_s`` to the last bit
every term is exactly 0), so a row's divergence is never negative.

**Passes.** Pass 1 walks both rows once with an online log-sum-exp per lane (:func:`online_lse`
of ``fusedopt.kernels.cross_entropy``, as its row kernel). Pass 2 reads them again: the row's
divergence and, for the reverse KL and the JSD, ``Σ_v p_s a``; for the forward KL, whose
gradient needs no such sum, it writes the gradient in the same pass. The reverse KL and the JSD
write the gradient in a pass 3 that reads both rows a third time and recomputes ``a``: keeping
``p_s a`` from pass 2 instead would store it in the logits' dtype (bf16 for a bf16 head), whose
rounding before ``a - Σ p_s a`` cancels is far larger than the gradient of a student close to
its teacher; the third read is of rows the program has just read. The backward of
``reduction="none"`` runs the gradient pass alone from the row statistics the forward kept
(``lse(s)``, ``lse(t)``, ``Σ p_s a``).

**Layout.** The rows are those of the linear distillation loss's chunk buffers: every row
starts on a 16-byte boundary and is padded to whole 16-byte vectors
(``fusedopt.losses._linear_cross_entropy_launch._padded``). So blocks inside the row are read
and written whole, without a mask, and the last block with a mask that is the same for every
16-byte vector (``fusedopt.kernels.rows.load_block`` / ``store_block`` with no shift): 128-bit
accesses at any vocabulary size; the padding is read and replaced in registers, and the
gradient's padding is written with zeros. As every row starts at a boundary, lane ``i`` sees the
same columns in every chunk: the result does not depend on where the chunk is.

fp32 arithmetic (fp64 for fp64 logits); the storage dtype only on load and store. A row with a
NaN or infinite logit has a NaN divergence and gradient. Ignored rows (``target ==
ignore_index``) get 0 and a zero gradient.
"""

import triton
import triton.language as tl

from fusedopt.kernels.common import to_storage
from fusedopt.kernels.cross_entropy import lowest, online_lse
from fusedopt.kernels.rows import load_block, store_block

FORWARD_KL, REVERSE_KL, JSD = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def distillation_kernel(
    student,  # DTYPE [R, stride]: student logits, rows 16-byte aligned and padded; their gradient if GRAD
    teacher,  # DTYPE [R, stride]: teacher logits, the same layout
    target,  # int [R]: rows equal to ignore_index are left out (read if HAS_TARGET)
    stats,  # COMPUTE [3, R] (rows stride_st apart): lse(s), lse(t), Σ p_s a; written if LOSS, else read
    loss,  # LOSS_DTYPE [R]: each row's divergence, 0 if ignored (written if LOSS)
    totals,  # COMPUTE [3]: totals[2] = 1 / the rows kept (read if DIVIDE_BY_TOTAL)
    grad_output,  # [R]: upstream grad of each row's divergence (read if ROW_GRAD_OUTPUT)
    R,
    C,
    stride,  # elements between rows (a multiple of 16)
    stride_st,
    stride_t,
    stride_go,
    ignore_index: tl.int64,
    inv_temperature: tl.float64,
    beta: tl.float64,  # the JSD's β (read if JSD)
    log_beta: tl.float64,  # log β
    log_rest: tl.float64,  # log(1 - β)
    DTYPE: tl.constexpr,  # storage dtype of both rows
    COMPUTE: tl.constexpr,  # float32, or float64 for fp64 logits
    LOSS_DTYPE: tl.constexpr,
    ROWS: tl.constexpr,  # rows per program (> 1 only when a row fits in one block)
    BLOCK: tl.constexpr,  # columns per step
    DIVERGENCE: tl.constexpr,  # FORWARD_KL, REVERSE_KL or JSD
    HAS_TARGET: tl.constexpr,
    LOSS: tl.constexpr,  # passes 1 and 2: the row statistics and divergence
    GRAD: tl.constexpr,  # write the gradient of the student's logits over them
    DIVIDE_BY_TOTAL: tl.constexpr,  # reduction mean: gradient times 1 / the rows kept
    ROW_GRAD_OUTPUT: tl.constexpr,  # reduction none (backward): gradient times grad_output[r]
):
    """A tile of ROWS rows × BLOCK columns per step; each row's scalars are [ROWS] vectors."""
    VEC: tl.constexpr = 128 // DTYPE.primitive_bitwidth  # elements per 16 bytes
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < R
    s_rows = student + rows * stride
    t_rows = teacher + rows * stride
    end = tl.zeros([ROWS], tl.int32) + tl.cdiv(C, VEC) * VEC  # the row's whole vectors (in its padding)
    if ROWS == 1:  # the grid makes the program's row a row of the input: no row mask
        every = None
    else:
        every = row_mask
    if HAS_TARGET:
        y = tl.load(target + rows * stride_t, mask=row_mask, other=0).to(tl.int64)
        kept = row_mask & (y != ignore_index)
    else:
        kept = row_mask
    inv_t = tl.full([], inv_temperature, COMPUTE)
    b = tl.full([], beta, COMPUTE)
    logs = (tl.full([], log_beta, COMPUTE), tl.full([], log_rest, COMPUTE))
    if DIVIDE_BY_TOTAL:  # 1 / the rows kept (inf when none is: no row is kept then)
        scale = tl.where(kept, tl.load(totals + 2), 0)
    elif ROW_GRAD_OUTPUT:
        scale = tl.where(kept, tl.load(grad_output + rows * stride_go, mask=row_mask, other=0).to(COMPUTE), 0)
    else:
        scale = kept.to(COMPUTE)
    factor = (scale * inv_t)[:, None]  # the gradient's factor per row, 0 for ignored rows
    keep = kept[:, None]

    # the forward KL's gradient needs no row sum: written in pass 2
    FUSED: tl.constexpr = LOSS and GRAD and DIVERGENCE == FORWARD_KL
    if LOSS:
        lse_s, lse_t = _lse_pass(s_rows, t_rows, C, end, row_mask, every, inv_t, COMPUTE, ROWS, VEC, BLOCK)
        row_loss, total = _row_pass(
            s_rows, t_rows, C, end, row_mask, every, inv_t, lse_s[:, None], lse_t[:, None],
            tl.zeros([ROWS, 1], COMPUTE), b, logs, factor, keep, DTYPE, COMPUTE, ROWS, VEC, BLOCK, DIVERGENCE, True,
            FUSED,
        )  # fmt: skip
        tl.store(loss + rows, to_storage(tl.where(kept, row_loss, 0), LOSS_DTYPE), mask=row_mask)
        tl.store(stats + rows, lse_s, mask=row_mask)
        tl.store(stats + stride_st + rows, lse_t, mask=row_mask)
        tl.store(stats + 2 * stride_st + rows, total, mask=row_mask)
    else:
        lse_s = tl.load(stats + rows, mask=row_mask, other=0)
        lse_t = tl.load(stats + stride_st + rows, mask=row_mask, other=0)
        total = tl.load(stats + 2 * stride_st + rows, mask=row_mask, other=0)
    if GRAD and not FUSED:  # pass 3 (the backward of none: the only one)
        _row_pass(
            s_rows, t_rows, C, end, row_mask, every, inv_t, lse_s[:, None], lse_t[:, None], total[:, None], b,
            logs, factor, keep, DTYPE, COMPUTE, ROWS, VEC, BLOCK, DIVERGENCE, False, True,
        )  # fmt: skip


@triton.jit
def _pair(
    s_rows,  # [ROWS] pointers to each row's student logits
    t_rows,  # [ROWS] pointers to each row's teacher logits
    start,  # the block's first column (a multiple of BLOCK)
    C,
    end,  # [ROWS]: the rows' whole vectors
    row_mask,  # [ROWS]; None: every row is in range (INTERIOR only)
    inv_t,
    other,  # the value of the columns past the row
    COMPUTE: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK: tl.constexpr,
    INTERIOR: tl.constexpr,  # every column of the block is in the row: no mask
):
    """``(s, t, inside)``: the block at ``start`` of both rows over the temperature, in COMPUTE,
    ``other`` past the row (the padding of its last vector, read whole), and the columns in it."""
    shift = tl.zeros_like(end)
    s = load_block(s_rows, shift, end, start, 1, row_mask, other, VEC, BLOCK, INTERIOR, True)
    t = load_block(t_rows, shift, end, start, 1, row_mask, other, VEC, BLOCK, INTERIOR, True)
    s = s.to(COMPUTE) * inv_t
    t = t.to(COMPUTE) * inv_t
    if INTERIOR:
        inside = tl.full([1, BLOCK], 1, tl.int1)
    else:
        inside = (start + tl.arange(0, BLOCK) < C)[None, :]
        s = tl.where(inside, s, other)
        t = tl.where(inside, t, other)
    return s, t, inside


@triton.jit
def _lse_pass(s_rows, t_rows, C, end, row_mask, every, inv_t, COMPUTE: tl.constexpr, ROWS: tl.constexpr,
              VEC: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Pass 1: ``(lse(s), lse(t))`` of each row, an online log-sum-exp per lane (no reduction
    until the row ends; the lanes start at the lowest finite value: no -inf - (-inf))."""
    m_s = lowest(ROWS, BLOCK, COMPUTE)
    m_t = m_s
    sum_s = tl.zeros([ROWS, BLOCK], COMPUTE)
    sum_t = tl.zeros([ROWS, BLOCK], COMPUTE)
    inner = C // BLOCK * BLOCK
    for start in range(0, inner, BLOCK):
        s, t, _ = _pair(s_rows, t_rows, start, C, end, every, inv_t, -float("inf"), COMPUTE, VEC, BLOCK, True)
        m_s, sum_s, _, _ = online_lse(s, m_s, sum_s)
        m_t, sum_t, _, _ = online_lse(t, m_t, sum_t)
    for start in range(inner, C, BLOCK):  # the last, partial block
        s, t, _ = _pair(
            s_rows, t_rows, start, C, end, row_mask, inv_t, -float("inf"), COMPUTE, VEC, BLOCK, False
        )
        m_s, sum_s, _, _ = online_lse(s, m_s, sum_s)
        m_t, sum_t, _, _ = online_lse(t, m_t, sum_t)
    return _lanes_lse(m_s, sum_s), _lanes_lse(m_t, sum_t)


@triton.jit
def _lanes_lse(m_lane, s_lane):
    """[ROWS]: the log-sum-exp of the lanes' running maxima and sums."""
    m = tl.max(m_lane, 1)
    total = tl.sum(s_lane * tl.exp(m_lane - m[:, None]), 1)
    return m + tl.log(tl.where(total > 0, total, float("nan")))  # NaN: no finite logit (or rows past R)


@triton.jit
def _row_pass(s_rows, t_rows, C, end, row_mask, every, inv_t, lse_s, lse_t, total, b, logs, factor, keep,
              DTYPE: tl.constexpr, COMPUTE: tl.constexpr, ROWS: tl.constexpr, VEC: tl.constexpr,
              BLOCK: tl.constexpr, DIVERGENCE: tl.constexpr, SUMS: tl.constexpr, GRAD: tl.constexpr):  # fmt: skip
    """Pass 2 (SUMS: returns each row's divergence and ``Σ_v p_s a``) or 3 (GRAD: the gradient
    written over the student's logits, from ``total`` = ``Σ_v p_s a``), or both (the forward KL,
    whose gradient needs no sum)."""
    div = tl.zeros([ROWS, BLOCK], COMPUTE)
    acc = tl.zeros([ROWS, BLOCK], COMPUTE)
    inner = C // BLOCK * BLOCK
    for start in range(0, inner, BLOCK):
        div, acc = _block(
            s_rows, t_rows, start, C, end, every, inv_t, lse_s, lse_t, total, b, logs, factor, keep, div, acc,
            DTYPE, COMPUTE, VEC, BLOCK, DIVERGENCE, SUMS, GRAD, True,
        )  # fmt: skip
    for start in range(inner, C, BLOCK):  # the last, partial block (0 past the row: no inf - inf)
        div, acc = _block(
            s_rows, t_rows, start, C, end, row_mask, inv_t, lse_s, lse_t, total, b, logs, factor, keep, div, acc,
            DTYPE, COMPUTE, VEC, BLOCK, DIVERGENCE, SUMS, GRAD, False,
        )  # fmt: skip
    return tl.sum(div, 1), tl.sum(acc, 1)


@triton.jit
def _block(s_rows, t_rows, start, C, end, row_mask, inv_t, lse_s, lse_t, total, b, logs, factor, keep, div, acc,
           DTYPE: tl.constexpr, COMPUTE: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr,
           DIVERGENCE: tl.constexpr, SUMS: tl.constexpr, GRAD: tl.constexpr, INTERIOR: tl.constexpr):  # fmt: skip
    """One block of :func:`_row_pass`: the lanes' sums ``div`` and ``acc`` updated (SUMS), the
    gradient stored (GRAD; zeros past the row, in its padding)."""
    s, t, inside = _pair(s_rows, t_rows, start, C, end, row_mask, inv_t, 0.0, COMPUTE, VEC, BLOCK, INTERIOR)
    term, p_s, a, p_t = _terms(s, t, lse_s, lse_t, b, logs, DIVERGENCE)
    if SUMS:
        div += tl.where(inside, term, 0)
        if DIVERGENCE != FORWARD_KL:
            acc += tl.where(inside, p_s * a, 0)
    if GRAD:
        if DIVERGENCE == FORWARD_KL:
            g = p_s - p_t
        else:
            g = p_s * (a - total)
        g = tl.where(keep & inside, g * factor, 0)
        store_block(s_rows, tl.zeros_like(end), end, start, 1, row_mask, to_storage(g, DTYPE), VEC, BLOCK, INTERIOR,
                    True)  # fmt: skip
    return div, acc


@triton.jit
def _terms(s, t, lse_s, lse_t, b, logs, DIVERGENCE: tl.constexpr):
    """``(term, p_s, a, p_t)`` of a block: the divergence's terms (each ``>= 0`` but for
    rounding, see the module), ``p_s``, ``a = ∂loss/∂p_s`` (up to a constant; not for the
    forward KL) and ``p_t``."""
    log_ps = s - lse_s
    log_pt = t - lse_t
    p_s = tl.exp(log_ps)
    p_t = tl.exp(log_pt)
    if DIVERGENCE == FORWARD_KL:
        a = p_s  # unused
        term = p_t * (log_pt - log_ps) - p_t + p_s
    elif DIVERGENCE == REVERSE_KL:
        a = log_ps - log_pt
        term = p_s * a - p_s + p_t
    else:
        x = logs[0] + log_pt
        y = logs[1] + log_ps
        hi = tl.maximum(x, y)
        log_m = hi + tl.log(1 + tl.exp(tl.minimum(x, y) - hi))  # logaddexp(x, y)
        a = (1 - b) * (log_ps - log_m)
        term = b * p_t * (log_pt - log_m) + p_s * a
    return tl.maximum(term, 0), p_s, a, p_t
