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
term below 0 can only be rounding, and is clamped to 0, so a row's divergence is never
negative (and the KLs' terms are exactly 0 where ``p_t = p_s`` to the last bit).

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

**The vocabulary order** (a head sharded over the vocabulary) gives the kernel a window of the
classes of every row per launch, and runs each pass over all the windows before the next
(``LSE``, ``SUMS``, ``GRAD``): the rows' running ``state`` carries pass 1's max and sum of
exponentials of both rows (merged as the online log-sum-exp merges lanes) or pass 2's partial
divergence and ``Σ p_s a`` (plain sums) from window to window, and from rank to rank between
launches (``fusedopt.losses._vocab_parallel``); a launch over no columns with ``LAST`` finishes
the rows from a combined state. The per-element math is the token order's (the same helpers).

**Layout.** The rows are those of the linear distillation loss's chunk (or block) buffers: every row
starts on a 16-byte boundary and is padded to whole 16-byte vectors
(``fusedopt.losses._linear_cross_entropy_launch._padded``; the launcher checks it). So blocks
inside the row are read and written whole, without a mask, and the last block with a mask that
is the same for every 16-byte vector (the row's whole vectors, its padding included): 128-bit
accesses at any vocabulary size, without the shifted layouts of ``fusedopt.kernels.rows`` (no
row here starts off a boundary). The padding is read and replaced in registers, and the
gradient's padding is written with zeros. As every row starts at a boundary, lane ``i`` sees the
same columns in every chunk: the result does not depend on where the chunk is. (The helpers
take both rows at once and are few per block: each call of a ``@triton.jit`` function costs
about a millisecond in the interpreter, which the tests run.)

fp32 arithmetic (fp64 for fp64 logits); the storage dtype only on load and store. A row with a
NaN or infinite logit has a NaN divergence and gradient. Ignored rows (``target ==
ignore_index``) get 0 and a zero gradient.
"""

import triton
import triton.language as tl

from fusedopt.kernels.common import to_storage
from fusedopt.kernels.cross_entropy import lowest, online_lse

FORWARD_KL, REVERSE_KL, JSD = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def distillation_kernel(
    student,  # DTYPE [R, stride]: student logits, rows 16-byte aligned and padded; their gradient if GRAD
    teacher,  # DTYPE [R, stride]: teacher logits, the same layout
    target,  # int [R]: rows equal to ignore_index are left out (read if HAS_TARGET)
    stats,  # COMPUTE [3, R] (rows stride_st apart): lse(s), lse(t) (written if LSE and LAST, else read), Σ p_s a (written if SUMS and LAST, else read)
    state,  # COMPUTE [4, R] (rows stride_st apart): the rows' running sums over the columns seen (read unless FIRST, written unless LAST)
    loss,  # LOSS_DTYPE [R]: each row's divergence, 0 if ignored (written if SUMS and LAST)
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
    LSE: tl.constexpr,  # pass 1: the rows' max and Σ exp of s and t (LAST: their lse)
    SUMS: tl.constexpr,  # pass 2: the rows' divergence and Σ p_s a (LAST: the loss)
    GRAD: tl.constexpr,  # write the gradient of the student's logits over them
    FIRST: tl.constexpr,  # the first columns of the rows: no state to read
    LAST: tl.constexpr,  # the last: finish the rows (lse, loss) instead of writing the state
    DIVIDE_BY_TOTAL: tl.constexpr,  # reduction mean: gradient times 1 / the rows kept
    ROW_GRAD_OUTPUT: tl.constexpr,  # reduction none (backward): gradient times grad_output[r]
):
    """A tile of ROWS rows × BLOCK columns per step; each row's scalars are [ROWS] vectors.

    The token order gives whole rows (FIRST and LAST): passes 1 and 2 (LSE and SUMS) and the
    gradient in one launch, or the gradient pass alone (the backward of none). The vocabulary
    order gives a window of the classes per launch and runs the passes in turn over all its
    windows: pass 1's state is (max, Σ exp(· - max)) of s and of t, merged window by window
    (across ranks by ``fusedopt.losses._vocab_parallel``), pass 2's the partial divergence and
    Σ p_s a (sums), then the gradient pass from the finished ``stats``."""
    VEC: tl.constexpr = 128 // DTYPE.primitive_bitwidth  # elements per 16 bytes
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < R
    base = rows * stride  # the rows' first elements (16-byte aligned)
    end = tl.multiple_of((C + VEC - 1) // VEC * VEC, VEC)  # the rows' whole vectors (in their padding)
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
    jsd = (tl.full([], beta, COMPUTE), tl.full([], log_beta, COMPUTE), tl.full([], log_rest, COMPUTE))
    if DIVIDE_BY_TOTAL:  # 1 / the rows kept (inf when none is: no row is kept then)
        scale = tl.where(kept, tl.load(totals + 2), 0)
    elif ROW_GRAD_OUTPUT:
        scale = tl.where(kept, tl.load(grad_output + rows * stride_go, mask=row_mask, other=0).to(COMPUTE), 0)
    else:
        scale = kept.to(COMPUTE)
    factor = (scale * inv_t)[:, None]  # the gradient's factor per row, 0 for ignored rows
    keep = kept[:, None]

    # the forward KL's gradient needs no row sum: written in pass 2
    FUSED: tl.constexpr = SUMS and GRAD and DIVERGENCE == FORWARD_KL
    if LSE:
        m_s, sum_s, m_t, sum_t = _max_sum_pass(
            student, teacher, base, C, end, row_mask, every, inv_t, COMPUTE, ROWS, BLOCK
        )
        if not FIRST:  # the columns seen before (both maxima finite)
            m_s, sum_s = _merged(m_s, sum_s, state, rows, stride_st, row_mask)
            m_t, sum_t = _merged(m_t, sum_t, state + 2 * stride_st, rows, stride_st, row_mask)
        if LAST:  # the log-sum-exps; NaN where no logit is finite (and in rows past R)
            lse_s = m_s + tl.log(tl.where(sum_s > 0, sum_s, float("nan")))
            lse_t = m_t + tl.log(tl.where(sum_t > 0, sum_t, float("nan")))
            if not SUMS:  # (else stored with pass 2's: fewer live registers across it)
                tl.store(stats + rows, lse_s, mask=row_mask)
                tl.store(stats + stride_st + rows, lse_t, mask=row_mask)
        else:
            tl.store(state + rows, m_s, mask=row_mask)
            tl.store(state + stride_st + rows, sum_s, mask=row_mask)
            tl.store(state + 2 * stride_st + rows, m_t, mask=row_mask)
            tl.store(state + 3 * stride_st + rows, sum_t, mask=row_mask)
    else:
        lse_s = tl.load(stats + rows, mask=row_mask, other=0)
        lse_t = tl.load(stats + stride_st + rows, mask=row_mask, other=0)
    if SUMS:
        row_loss, total = _row_pass(
            student, teacher, base, C, end, row_mask, every, inv_t, lse_s[:, None], lse_t[:, None],
            tl.full([ROWS, 1], 0, COMPUTE), jsd, factor, keep, DTYPE, COMPUTE, ROWS, BLOCK, DIVERGENCE, True, FUSED,
        )  # fmt: skip
        if not FIRST:  # the columns seen before
            row_loss += tl.load(state + rows, mask=row_mask, other=0)
            total += tl.load(state + stride_st + rows, mask=row_mask, other=0)
        if LAST:
            row_loss = tl.where(kept, row_loss, 0)
            # (tl.zeros, tl.cdiv and to_storage are calls: slow in the interpreter)
            if LOSS_DTYPE == tl.bfloat16:
                tl.store(loss + rows, to_storage(row_loss, LOSS_DTYPE), mask=row_mask)
            else:
                tl.store(loss + rows, row_loss.to(LOSS_DTYPE), mask=row_mask)
            if LSE:
                tl.store(stats + rows, lse_s, mask=row_mask)
                tl.store(stats + stride_st + rows, lse_t, mask=row_mask)
            tl.store(stats + 2 * stride_st + rows, total, mask=row_mask)
        else:
            tl.store(state + rows, row_loss, mask=row_mask)
            tl.store(state + stride_st + rows, total, mask=row_mask)
    elif GRAD:
        total = tl.load(stats + 2 * stride_st + rows, mask=row_mask, other=0)
    if GRAD and not FUSED:  # pass 3 (the backward of none, and the vocabulary order: the only one)
        _row_pass(
            student, teacher, base, C, end, row_mask, every, inv_t, lse_s[:, None], lse_t[:, None],
            total[:, None], jsd, factor, keep, DTYPE, COMPUTE, ROWS, BLOCK, DIVERGENCE, False, True,
        )  # fmt: skip


@triton.jit
def _merged(m, s, state, rows, stride_st, row_mask):
    """A running max ``m`` and sum ``s`` of ``exp(x - m)`` (each [ROWS]) merged with those of
    the columns seen before, rows ``state`` and ``state + stride_st`` (maxima finite)."""
    m_old = tl.load(state + rows, mask=row_mask, other=0)
    s_old = tl.load(state + stride_st + rows, mask=row_mask, other=0)
    m_new = tl.maximum(m_old, m)
    return m_new, s * tl.exp(m - m_new) + s_old * tl.exp(m_old - m_new)


@triton.jit
def _pair(
    student,
    teacher,
    base,  # [ROWS] int64: the rows' first elements
    start,  # the block's first column (a multiple of BLOCK)
    C,
    end,  # the rows' whole vectors (a multiple of 16 bytes)
    row_mask,  # [ROWS]; None: every row is in range (INTERIOR only)
    inv_t,
    other,  # the value of the columns past the row
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
    INTERIOR: tl.constexpr,  # every column of the block is in the row: no column mask
):
    """``(s, t, inside, offsets)``: the block at ``start`` of both rows over the temperature, in
    COMPUTE, ``other`` past the row (the padding of its last vector, read whole: the mask is the
    same for every 16 bytes, :func:`_store`'s), the block's columns in the row and its offsets."""
    cols = start + tl.arange(0, BLOCK)[None, :]
    offsets = base[:, None] + cols
    if INTERIOR:
        inside = tl.full([1, BLOCK], 1, tl.int1)
        if row_mask is None:
            mask = None
        else:
            mask = row_mask[:, None]
    else:
        inside = cols < C
        mask = row_mask[:, None] & (cols < end)
    if mask is None:
        s = tl.load(student + offsets)
        t = tl.load(teacher + offsets)
    else:
        s = tl.load(student + offsets, mask=mask, other=other)
        t = tl.load(teacher + offsets, mask=mask, other=other)
    s = s.to(COMPUTE) * inv_t
    t = t.to(COMPUTE) * inv_t
    if not INTERIOR:
        s = tl.where(inside, s, other)
        t = tl.where(inside, t, other)
    return s, t, inside, offsets


@triton.jit
def _max_sum_pass(student, teacher, base, C, end, row_mask, every, inv_t, COMPUTE: tl.constexpr, ROWS: tl.constexpr,
              BLOCK: tl.constexpr):  # fmt: skip
    """Pass 1: ``(m_s, Σ exp(s - m_s), m_t, Σ exp(t - m_t))`` of each row's columns, ``m`` their
    max: an online log-sum-exp per lane (no reduction until the columns end; the lanes start at
    the lowest finite value: no -inf - (-inf); a row of no columns gets that value and 0)."""
    m_s = lowest(ROWS, BLOCK, COMPUTE)
    m_t = m_s
    sum_s = tl.full([ROWS, BLOCK], 0, COMPUTE)
    sum_t = tl.full([ROWS, BLOCK], 0, COMPUTE)
    inner = C // BLOCK * BLOCK
    for start in range(0, inner, BLOCK):
        s, t, _, _ = _pair(student, teacher, base, start, C, end, every, inv_t, -float("inf"), COMPUTE, BLOCK,
                              True)  # fmt: skip
        m_s, sum_s, _, _ = online_lse(s, m_s, sum_s)
        m_t, sum_t, _, _ = online_lse(t, m_t, sum_t)
    for start in range(inner, C, BLOCK):  # the last, partial block
        s, t, _, _ = _pair(student, teacher, base, start, C, end, row_mask, inv_t, -float("inf"), COMPUTE, BLOCK,
                              False)  # fmt: skip
        m_s, sum_s, _, _ = online_lse(s, m_s, sum_s)
        m_t, sum_t, _, _ = online_lse(t, m_t, sum_t)
    # the lanes merged
    m_s_row = tl.max(m_s, 1)
    m_t_row = tl.max(m_t, 1)
    sum_s = tl.sum(sum_s * tl.exp(m_s - m_s_row[:, None]), 1)
    sum_t = tl.sum(sum_t * tl.exp(m_t - m_t_row[:, None]), 1)
    return m_s_row, sum_s, m_t_row, sum_t


@triton.jit
def _row_pass(student, teacher, base, C, end, row_mask, every, inv_t, lse_s, lse_t, total, jsd, factor, keep,
              DTYPE: tl.constexpr, COMPUTE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
              DIVERGENCE: tl.constexpr, SUMS: tl.constexpr, GRAD: tl.constexpr):  # fmt: skip
    """Pass 2 (SUMS: returns each row's divergence and ``Σ_v p_s a``) or 3 (GRAD: the gradient
    written over the student's logits, from ``total`` = ``Σ_v p_s a``), or both (the forward KL,
    whose gradient needs no sum)."""
    div = tl.full([ROWS, BLOCK], 0, COMPUTE)
    acc = tl.full([ROWS, BLOCK], 0, COMPUTE)
    inner = C // BLOCK * BLOCK
    for start in range(0, inner, BLOCK):
        div, acc = _block(
            student, teacher, base, start, C, end, every, inv_t, lse_s, lse_t, total, jsd, factor, keep, div, acc,
            DTYPE, COMPUTE, BLOCK, DIVERGENCE, SUMS, GRAD, True,
        )  # fmt: skip
    for start in range(inner, C, BLOCK):  # the last, partial block (0 past the row: no inf - inf)
        div, acc = _block(
            student, teacher, base, start, C, end, row_mask, inv_t, lse_s, lse_t, total, jsd, factor, keep, div,
            acc, DTYPE, COMPUTE, BLOCK, DIVERGENCE, SUMS, GRAD, False,
        )  # fmt: skip
    if SUMS:
        div = tl.sum(div, 1)
        if DIVERGENCE != FORWARD_KL:
            acc = tl.sum(acc, 1)
        else:
            acc = tl.full([ROWS], 0, COMPUTE)
    return div, acc


@triton.jit
def _block(student, teacher, base, start, C, end, row_mask, inv_t, lse_s, lse_t, total, jsd, factor, keep, div, acc,
           DTYPE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr, DIVERGENCE: tl.constexpr,
           SUMS: tl.constexpr, GRAD: tl.constexpr, INTERIOR: tl.constexpr):  # fmt: skip
    """One block of :func:`_row_pass`: the lanes' sums ``div`` and ``acc`` updated (SUMS), the
    gradient stored (GRAD; zeros past the row, in its padding)."""
    s, t, inside, offsets = _pair(
        student, teacher, base, start, C, end, row_mask, inv_t, 0.0, COMPUTE, BLOCK, INTERIOR
    )
    # the block's terms (each >= 0), p_s, a = ∂loss/∂p_s (up to a constant) and p_t
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
        x = jsd[1] + log_pt  # log β + log p_t
        y = jsd[2] + log_ps  # log(1 - β) + log p_s
        hi = tl.maximum(x, y)
        log_m = hi + tl.log(1 + tl.exp(tl.minimum(x, y) - hi))  # logaddexp(x, y)
        a = (1 - jsd[0]) * (log_ps - log_m)
        term = jsd[0] * p_t * (log_pt - log_m) + p_s * a
    if SUMS:
        div += tl.where(inside, tl.maximum(term, 0), 0)  # below 0 only by rounding
        if DIVERGENCE != FORWARD_KL:
            acc += tl.where(inside, p_s * a, 0)
    if GRAD:
        if DIVERGENCE == FORWARD_KL:
            g = p_s - p_t
        else:
            g = p_s * (a - total)
        g = tl.where(keep & inside, g * factor, 0)
        # to_storage only where it rounds differently from .to (a call per block is slow in the
        # interpreter)
        if DTYPE == tl.bfloat16:
            g = to_storage(g, DTYPE)
        else:
            g = g.to(DTYPE)
        if INTERIOR:
            if row_mask is None:
                tl.store(student + offsets, g)
            else:
                tl.store(student + offsets, g, mask=row_mask[:, None])
        else:  # the row's whole vectors (zeros past the row)
            tl.store(
                student + offsets, g, mask=row_mask[:, None] & (start + tl.arange(0, BLOCK)[None, :] < end)
            )
    return div, acc
