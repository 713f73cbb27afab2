"""Cross-entropy over class logits: loss and, in the same pass, the gradient of the logits.

Rows are the logits of one sample, ``z`` (``C`` classes); ``y`` its target, ``w`` the class
weights (1 without weight), ``ε`` the label smoothing, ``lse = log Σ_c exp(z_c)``. As torch
(``aten::cross_entropy_loss_label_smoothing``), a row that is not ignored has the loss

    loss = (1 - ε) w_y (lse - z_y) + ε / C Σ_c w_c (lse - z_c)

plus ``z_loss · lse²`` with a z-loss (PaLM's; ``2 z_loss lse p_j`` in the gradient), and an
ignored row (``y == ignore_index``) 0. With ``p = softmax(z)``, ``W = Σ_c w_c``:

    dloss/dz_j = p_j ((1 - ε) w_y + ε W / C) - (1 - ε) w_y [j == y] - ε w_j / C

(``p - (1 - ε) onehot(y) - ε / C`` without weight), times the reduction's factor: 1 / Σ w_y over
the non-ignored rows for ``mean``, 1 for ``sum``, the row's upstream grad for ``none``. With a
soft cap ``c`` (Gemma 2's, SOFTCAP) every logit is read as ``c tanh(z / c)`` (both passes, the
target's; ``z`` above is the capped logit, and the lse of the z-loss is theirs) and the gradient
gains the factor ``1 - tanh(z / c)²``.

A program takes a tile of ROWS rows (one row when rows are wider than a block). Pass 1 walks
its rows in column blocks with an online softmax kept per lane (no reduction until the row
ends). The blocks are those of ``fusedopt.kernels.rows``, for 128-bit loads and stores at any
row length and alignment: lane i sees columns ``shift + i, shift + i + BLOCK, ...`` of the row's
whole 16-byte vectors, and the at most ``2 VEC - 2`` columns outside them have a lane each in an
edge tile (so how a row's sums associate depends on its address modulo 16, deterministically).
Per lane: the running max ``m``, the sum
``s = Σ exp(z_c - m)`` rescaled whenever ``m`` grows and, for label smoothing,
``d = Σ_c w_c (m - z_c) >= 0`` (so ``Σ_c w_c (lse - z_c) = W log s + d``, without the
cancellation of ``W lse - Σ w_c z_c`` at large logits). Pass 2 reads the rows again and writes
the gradient. fp32 math (fp64 for fp64 logits); storage dtype only on load and store. No atomics:
every sum has a fixed order, so results are deterministic.

Non-finite logits, as torch: -inf logits (masked classes) are fine; a row with a NaN or +inf
logit, or of only -inf, has a NaN log-sum-exp, so a NaN loss (0 if ignored) and a NaN gradient
(ignored or not: torch's softmax backward multiplies its NaNs by 0). The running max starts at
the lowest finite value (``LOWEST``), not -inf; a +inf logit enters the online softmax as NaN,
and a NaN turns its lane's sum NaN (``exp(-|NaN|)``) for good while the max ignores it (fmax):
the running max stays finite, so no step computes -inf - (-inf) or 0 * inf (which would warn
under the interpreter), and the row's NaN is carried by its sum. With a soft cap, ±inf logits
are ±c (finite; their gradient 0) and only a NaN makes a row NaN, as in the composition.
"""

import triton
import triton.language as tl

from fusedopt.kernels.common import div_ieee, tanh, to_storage
from fusedopt.kernels.rows import (
    HEAD,
    INTERIOR_BLOCK,
    TAIL,
    block_mask,
    edge_columns,
    exact_sum,
    interior_end,
    load_block,
    load_rotated,
    rotated_counts,
    row_layout,
    row_start,
    store_block,
)


@triton.jit
def lowest(ROWS: tl.constexpr, BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    """[ROWS, BLOCK] of the lowest finite value of the compute dtype: the start of a running max."""
    if COMPUTE == tl.float64:
        return tl.full([ROWS, BLOCK], -1.7976931348623157e308, COMPUTE)
    else:
        return tl.full([ROWS, BLOCK], -3.4028234663852886e38, COMPUTE)


@triton.jit
def cross_entropy_targets_kernel(
    target,  # int64 or uint8 [R]: class index of each row (stride `stride_t`)
    weight,  # [C]: class weights (read if HAS_WEIGHT)
    stats,  # COMPUTE [3]: written: Σ w[target] over the rows not ignored (their count without weight), Σ w, 1 / Σ w[target]
    ok,  # int32 [1]: written: 1 if every target is in [0, C) or ignore_index, else 0
    R,
    C,
    stride_t,
    ignore_index: tl.int64,
    COMPUTE: tl.constexpr,  # float32, or float64 for fp64 logits
    HAS_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Run before the row kernel (one program, fixed summation order): the mean's divisor must
    be in device memory before any gradient is written."""
    kept_w = tl.zeros([BLOCK], COMPUTE)
    bad = tl.zeros([BLOCK], tl.int32)
    for start in range(0, R, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < R
        y = tl.load(target + offs * stride_t, mask=mask, other=0).to(tl.int64)
        kept = mask & (y != ignore_index)
        inside = (y >= 0) & (y < C)
        bad = bad | (kept & ~inside).to(tl.int32)
        used = kept & inside
        if HAS_WEIGHT:
            kept_w += tl.load(weight + y, mask=used, other=0).to(COMPUTE)
        else:
            kept_w += used.to(COMPUTE)
    total = tl.sum(kept_w, 0)
    tl.store(stats, total)
    tl.store(stats + 2, div_ieee(tl.full([], 1, COMPUTE), total, COMPUTE))  # inf if all are ignored
    if HAS_WEIGHT:
        w_sum = tl.zeros([BLOCK], COMPUTE)
        for start in range(0, C, BLOCK):
            offs = start + tl.arange(0, BLOCK).to(tl.int64)
            w_sum += tl.load(weight + offs, mask=offs < C, other=0).to(COMPUTE)
        tl.store(stats + 1, tl.sum(w_sum, 0))
    else:
        tl.store(stats + 1, tl.full([], 1, COMPUTE) * C)  # unit weights: every output is defined
    tl.store(ok, 1 - tl.max(bad, 0))


@triton.jit
def cross_entropy_kernel(
    logits,  # DTYPE [N, S, C], any strides: row r is logits[r // S, r % S, :]
    target,  # int64 or uint8 [R = N * S]: class index of each row
    weight,  # [C]: class weights (read if HAS_WEIGHT)
    stats,  # COMPUTE [3]: Σ w[target] over the rows not ignored, Σ w, 1 / Σ w[target] (targets kernel)
    lse,  # COMPUTE [R]: log-sum-exp of each row (written if SAVE_LSE; read instead of pass 1 if not LOSS)
    loss,  # LOSS_DTYPE [R]: loss of each row, 0 if ignored (written if LOSS)
    grad,  # DTYPE [N, S, C], any strides: gradient of the logits (written if GRAD)
    grad_output,  # [R]: upstream grad of each row's loss (read if ROW_GRAD_OUTPUT)
    R,
    S,
    C,  # columns of a row of `logits`: classes col0 .. col0 + C - 1 of the K classes
    col0: tl.int64,  # first class of the rows (> 0 only for a window of the classes, without LOSS)
    K,  # classes
    stride_xn,
    stride_xs,
    stride_xc,
    stride_gn,
    stride_gs,
    stride_gc,
    stride_t,
    stride_go,
    ignore_index: tl.int64,
    label_smoothing: tl.float64,
    z_loss: tl.float64,  # the z-loss weight (read if Z_LOSS)
    softcap: tl.float64,  # the logits' soft cap c (read if SOFTCAP)
    DTYPE: tl.constexpr,  # storage dtype of logits and grad
    COMPUTE: tl.constexpr,  # float32, or float64 for fp64 logits
    LOSS_DTYPE: tl.constexpr,  # dtype of `loss`
    ROWS: tl.constexpr,  # rows per program (> 1 only when a row fits in one block)
    BLOCK: tl.constexpr,  # columns per block; a row spans ceil(C / BLOCK) blocks
    HAS_WEIGHT: tl.constexpr,
    SMOOTHING: tl.constexpr,  # label_smoothing > 0
    Z_LOSS: tl.constexpr,  # z_loss > 0: each row not ignored adds z_loss lse² to its loss
    SOFTCAP: tl.constexpr,  # softcap > 0: every logit z read as c tanh(z / c)
    LOSS: tl.constexpr,  # pass 1: online softmax and the row's loss
    SAVE_LSE: tl.constexpr,  # store the row's log-sum-exp (for a backward that recomputes)
    GRAD: tl.constexpr,  # pass 2: write the gradient
    DIVIDE_BY_TOTAL: tl.constexpr,  # reduction mean: gradient times 1 / Σ w[target] (stats[2])
    ROW_GRAD_OUTPUT: tl.constexpr,  # reduction none (backward): gradient times grad_output[r]
    SAME_SPLIT: tl.constexpr,  # GRAD: logits and gradient at equal addresses mod 16, equal strides
):
    """A tile of ROWS rows × BLOCK columns per step; each row's scalars are [ROWS] vectors.
    128-bit accesses at any row length and alignment (``fusedopt.kernels.rows``) for rows of
    unit column stride (Triton specializes a stride of 1, so this is decided when compiling):
    pass 1 reads the logits from their rows' 16-byte boundaries (:func:`_softmax_pass`), pass 2
    splits the gradient's rows there and reads the logits alike when they split alike."""
    VEC: tl.constexpr = 128 // DTYPE.primitive_bitwidth  # elements per 16 bytes
    # blocks of at least 2 vectors (tiny rows: unshifted); fp64's exact sums would need more
    # than 64-bit integers (pass 1 unshifted)
    SPLIT: tl.constexpr = BLOCK >= 2 * VEC
    ROTATE: tl.constexpr = SPLIT and COMPUTE != tl.float64
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < R
    n = rows // S
    x_rows = logits + n * stride_xn + (rows - n * S) * stride_xs  # [ROWS] pointers to each row

    y = tl.load(target + rows * stride_t, mask=row_mask, other=0).to(tl.int64)
    # Out-of-range targets are reported by the caller's device assert; here they read nothing.
    valid = row_mask & (y != ignore_index) & (y >= 0) & (y < K)
    eps = tl.full([], label_smoothing, COMPUTE)
    if HAS_WEIGHT:
        w_y = tl.load(weight + y, mask=valid, other=0).to(COMPUTE)
    else:
        w_y = valid.to(COMPUTE)
    w_rows = weight + col0 + tl.zeros([ROWS], tl.int64)  # the rows' class weights, as rows
    y_col = tl.where((y >= col0) & (y < col0 + C), y - col0, -1).to(tl.int32)  # the target's column, -1: none
    cap = tl.full([], softcap, COMPUTE)

    if LOSS:
        # the row's max m, Σ exp(z - m), and for label smoothing Σ w (m - z) and Σ w
        if ROTATE:
            if stride_xc == 1:
                m, s, d, w_sum = _softmax_pass(
                    x_rows,
                    w_rows,
                    cap,
                    C,
                    stride_xc,
                    row_mask,
                    COMPUTE,
                    ROWS,
                    VEC,
                    BLOCK,
                    HAS_WEIGHT,
                    SMOOTHING,
                    SOFTCAP,
                    True,
                )
            else:
                m, s, d, w_sum = _softmax_pass(
                    x_rows,
                    w_rows,
                    cap,
                    C,
                    stride_xc,
                    row_mask,
                    COMPUTE,
                    ROWS,
                    VEC,
                    BLOCK,
                    HAS_WEIGHT,
                    SMOOTHING,
                    SOFTCAP,
                    False,
                )
        else:
            m, s, d, w_sum = _softmax_pass(
                x_rows,
                w_rows,
                cap,
                C,
                stride_xc,
                row_mask,
                COMPUTE,
                ROWS,
                VEC,
                BLOCK,
                HAS_WEIGHT,
                SMOOTHING,
                SOFTCAP,
                False,
            )
        z_y = tl.load(x_rows + y * stride_xc, mask=valid, other=0).to(COMPUTE)
        if SOFTCAP:
            z_y, _ = soft_cap(z_y, cap, COMPUTE)
        bad = (s != s) | (s == 0)  # a NaN or +inf logit, or none above -inf (or a masked row)
        s = tl.where(bad, 1, s)
        log_s = tl.log(s)
        row_loss = w_y * (m - z_y + log_s)  # w_y (lse - z_y)
        if SMOOTHING:  # Σ_c w_c (lse - z_c) = W log s + Σ_c w_c (m - z_c)
            row_loss = (1 - eps) * row_loss + eps / K * (w_sum * log_s + d)
        row_lse = tl.where(valid, m + log_s, 0)  # the z-loss's (0 outside the rows: no overflow)
        if Z_LOSS:
            row_loss += z_loss * row_lse * row_lse
        row_loss = tl.where(valid, tl.where(bad, float("nan"), row_loss), 0)
        if LOSS_DTYPE == tl.bfloat16:
            tl.store(loss + rows, to_storage(row_loss, LOSS_DTYPE), mask=row_mask)
        else:
            tl.store(loss + rows, row_loss.to(LOSS_DTYPE), mask=row_mask)
        if SAVE_LSE:
            tl.store(lse + rows, tl.where(bad, float("nan"), m + log_s), mask=row_mask)
        inv_s = 1 / s
    else:
        m = tl.load(lse + rows, mask=row_mask, other=0)
        bad = m != m
        inv_s = tl.full([ROWS], 1, COMPUTE)
        row_lse = tl.where(valid, m, 0)

    if GRAD:
        g_rows = grad + n * stride_gn + (rows - n * S) * stride_gs
        if DIVIDE_BY_TOTAL:  # 1 / Σ w[target] (inf when every row is ignored: no valid row)
            scale = tl.where(valid, tl.load(stats + 2), 0)
        elif ROW_GRAD_OUTPUT:
            scale = tl.load(grad_output + rows * stride_go, mask=row_mask, other=0).to(COMPUTE)
        else:
            scale = tl.full([ROWS], 1, COMPUTE)
        if SMOOTHING:
            if HAS_WEIGHT:
                w_total = tl.load(stats + 1)
            else:
                w_total = K
            p_factor = (1 - eps) * w_y + eps / K * w_total
            hit = (1 - eps) * w_y
        else:
            p_factor = w_y
            hit = w_y
        if Z_LOSS:  # d(z_loss lse²)/dz_j = 2 z_loss lse p_j, rows not ignored
            p_factor += 2 * z_loss * row_lse
        # g = (p_j p_factor - hit [j == y] - ε / C w_j) * scale, the factors premultiplied per row;
        # NaN for a row whose lse is NaN
        p_factor = tl.where(bad, float("nan"), p_factor * inv_s * scale)[:, None]
        hit = (hit * scale)[:, None]
        eps_w = (eps / K * scale)[:, None]
        keep = (valid | bad)[:, None]
        if SOFTCAP:  # rows past R: m is the lowest value and their capped logits -c (exp(-c - m) = inf)
            m = tl.where(row_mask, m, 0)
        m = m[:, None]
        # the gradient's rows split at 16-byte boundaries where its column stride is 1 (Triton
        # specializes a 1: decided when compiling); the logits' rows read alike where the launcher
        # found them at the gradient's addresses modulo 16 with its strides (SAME_SPLIT)
        if SPLIT and stride_gc == 1:
            _gradient_pass(
                x_rows, g_rows, w_rows, y_col, C, stride_xc, stride_gc, row_mask, m, p_factor, hit, eps_w, keep,
                cap, DTYPE, COMPUTE, ROWS, VEC, BLOCK, HAS_WEIGHT, SMOOTHING, SOFTCAP, True, SAME_SPLIT,
            )  # fmt: skip
        else:
            _gradient_pass(
                x_rows, g_rows, w_rows, y_col, C, stride_xc, stride_gc, row_mask, m, p_factor, hit, eps_w, keep,
                cap, DTYPE, COMPUTE, ROWS, VEC, BLOCK, HAS_WEIGHT, SMOOTHING, SOFTCAP, False, False,
            )  # fmt: skip


@triton.jit
def _softmax_pass(
    x_rows,  # [ROWS] pointers to each row's logits
    w_rows,  # [ROWS] pointers to the rows' class weights
    cap,  # the soft cap (read if SOFTCAP)
    C,
    stride,
    row_mask,
    COMPUTE: tl.constexpr,
    ROWS: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    SMOOTHING: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ALIGNED: tl.constexpr,  # read from the rows' 16-byte boundaries (unit stride)
    ENTROPY: tl.constexpr = False,  # the third is Σ exp(z - m) (m - z) instead (not with SMOOTHING)
):
    """Pass 1 of ``cross_entropy_kernel``: ``(m, Σ exp(z - m), Σ w (m - z), Σ w)`` of each row
    (the last two for label smoothing; ENTROPY: the third is ``Σ exp(z - m) (m - z) >= 0``, the
    entropy's, for ``fusedopt.kernels.log_probs``). An online softmax per lane, no reduction until
    the row ends. ALIGNED: lane i sees the columns ``i - r, i - r + BLOCK, ...`` (``r`` the elements
    between the row and the 16-byte boundary before it), those lane ``(i - r) mod BLOCK`` of an
    unshifted walk sees, in order; the lanes' sums are exact, so the result does not depend on
    the row's address. Else lane i sees the columns ``i, i + BLOCK, ...``."""
    floor = lowest(ROWS, BLOCK, COMPUTE)
    m = floor  # running max of the lane (finite)
    s = tl.zeros([ROWS, BLOCK], COMPUTE)  # Σ exp(z - m) of the lane; NaN after a NaN or +inf
    d = tl.zeros([ROWS, BLOCK], COMPUTE)  # Σ w (m - z) of the lane (smoothing; ENTROPY: Σ e^(z-m) (m - z))
    w_seen = tl.zeros([ROWS, BLOCK], COMPUTE)  # Σ w of the lane (label smoothing with class weights)
    r = row_start(x_rows, ALIGNED, VEC)
    m, s, d, w_seen = _softmax_blocks(
        x_rows, w_rows, r, cap, C, stride, row_mask, m, s, d, w_seen, floor,
        COMPUTE, ROWS, VEC, BLOCK, HAS_WEIGHT, SMOOTHING, SOFTCAP, ALIGNED, ENTROPY,
    )  # fmt: skip
    m_lane = m
    m = tl.max(m_lane, 1)
    to_row = tl.exp(m_lane - m[:, None])  # a lane's sums relative to the row's max
    if ENTROPY:  # Σ e^(z-m) (m - z) = Σ_lanes to_row (d + (m - m_lane) s): every term >= 0
        d = exact_sum(
            to_row * (d + s * tl.where(m_lane > floor, m[:, None] - m_lane, 0)), float("nan"), ALIGNED
        )
    s = exact_sum(s * to_row, float("nan"), ALIGNED)
    if SMOOTHING:
        if not HAS_WEIGHT:  # the lanes' counts of columns
            w_seen = rotated_counts(r, C, row_mask, BLOCK).to(COMPUTE)
        d = exact_sum(d + w_seen * tl.where(m_lane > floor, m[:, None] - m_lane, 0), float("inf"), ALIGNED)
        w_sum = exact_sum(w_seen, 0.0, ALIGNED)
    else:
        w_sum = s
    return m, s, d, w_sum


@triton.jit
def _gradient_pass(
    x_rows,  # [ROWS] pointers to each row's logits
    g_rows,  # [ROWS] pointers to each row's gradient
    w_rows,  # [ROWS] pointers to the rows' class weights
    y_col,  # [ROWS] int32: the target's column, -1 if none
    C,
    stride_x,
    stride_g,
    row_mask,
    m,
    p_factor,
    hit,
    eps_w,
    keep,
    cap,  # the soft cap (read if SOFTCAP)
    DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    ROWS: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    SMOOTHING: tl.constexpr,
    SOFTCAP: tl.constexpr,
    SPLIT: tl.constexpr,  # the gradient's rows split at 16-byte boundaries (unit stride)
    SAME: tl.constexpr,  # the logits' rows split as the gradient's (SPLIT)
    ent=None,  # _gradient's
):
    """Pass 2 of ``cross_entropy_kernel``: the gradient of the rows. SPLIT: its rows' whole
    vectors stored 128-bit (the logits read 128-bit too if SAME), the at most ``2 VEC -
    2`` other columns as an edge tile; else every column, scalar."""
    shift, end = row_layout(g_rows, SPLIT, C, VEC)
    y_pos = y_col - shift  # the target's position among the whole vectors, -1 if none
    y_pos = tl.where((y_pos >= 0) & (y_pos < end), y_pos, -1)
    if SPLIT:
        if SAME:
            _gradient_blocks(
                x_rows, g_rows, w_rows, shift, end, y_pos, C, stride_x, stride_g, row_mask, m, p_factor, hit,
                eps_w, keep, cap, DTYPE, COMPUTE, ROWS, VEC, BLOCK, HAS_WEIGHT, SMOOTHING, SOFTCAP, True, True, ent,
            )  # fmt: skip
        else:  # scalar loads of the logits, in half blocks (as many registers as whole ones need)
            _gradient_blocks(
                x_rows, g_rows, w_rows, shift, end, y_pos, C, stride_x, stride_g, row_mask, m, p_factor, hit,
                eps_w, keep, cap, DTYPE, COMPUTE, ROWS, VEC, BLOCK // 2, HAS_WEIGHT, SMOOTHING, SOFTCAP, False,
                True, ent,
            )  # fmt: skip
        e_cols, e_mask = edge_columns(shift, end, C, row_mask, VEC)
        e_z = tl.load(x_rows[:, None] + e_cols * stride_x, mask=e_mask, other=-float("inf"))
        if SMOOTHING and HAS_WEIGHT:
            e_w = tl.load(w_rows[:, None] + e_cols, mask=e_mask, other=0).to(COMPUTE)
        else:
            e_w = e_mask.to(COMPUTE)
        e_target = e_cols == y_col[:, None]
        e_g = _gradient(
            e_z, e_w, e_target, m, p_factor, hit, eps_w, keep, cap, DTYPE, COMPUTE, HAS_WEIGHT, SMOOTHING,
            SOFTCAP, ent,
        )  # fmt: skip
        tl.store(g_rows[:, None] + e_cols * stride_g, e_g, mask=e_mask)
    else:
        _gradient_blocks(
            x_rows, g_rows, w_rows, shift, end, y_pos, C, stride_x, stride_g, row_mask, m, p_factor, hit,
            eps_w, keep, cap, DTYPE, COMPUTE, ROWS, VEC, BLOCK, HAS_WEIGHT, SMOOTHING, SOFTCAP, False, False,
            ent,
        )  # fmt: skip


@triton.jit
def _softmax_blocks(
    x_rows,  # [ROWS] pointers to each row's logits
    w_rows,  # [ROWS] pointers to the rows' class weights
    r,  # [ROWS] int32: rows.row_start (0 unless ALIGNED)
    cap,  # the soft cap (read if SOFTCAP)
    C,
    stride,
    row_mask,
    m,
    s,
    d,
    w_seen,
    floor,
    COMPUTE: tl.constexpr,
    ROWS: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    SMOOTHING: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ALIGNED: tl.constexpr,  # read from the rows' 16-byte boundaries (fusedopt.kernels.rows)
    ENTROPY: tl.constexpr = False,  # d: Σ exp(z - m) (m - z) (_softmax_step)
):
    """Pass 1 of ``cross_entropy_kernel``: the lanes' online softmax over the rows. Without
    class weights the lanes' Σ w (label smoothing) is not carried: before block ``b`` a lane in
    the row has seen ``b`` columns (``b - 1`` for the lanes before the row in block 0), and
    :func:`rotated_counts` gives the totals."""
    COUNT: tl.constexpr = SMOOTHING and not HAS_WEIGHT
    lanes = tl.arange(0, BLOCK)[None, :]
    if ALIGNED:
        if ROWS == 1:  # the grid makes the program's row a row of the input: no row mask
            every = None
        else:
            every = row_mask
        if C >= BLOCK:  # block 0: no column past the end; the lanes before the row masked
            z, mask = load_rotated(x_rows, r, 0, C, stride, every, -float("inf"), VEC, BLOCK, HEAD, True)
            w = _weights(w_rows, r, 0, C, mask, COMPUTE, BLOCK, HAS_WEIGHT, SMOOTHING)
            z = capped(z.to(COMPUTE), mask, cap, COMPUTE, SOFTCAP)
            m, s, d, w_seen = _softmax_step(
                z, w, mask, m, s, d, w_seen, 0.0, floor, SMOOTHING, COUNT, ENTROPY
            )
        for start in range(BLOCK, C // BLOCK * BLOCK, BLOCK):  # every column in the row: no mask
            z, mask = load_rotated(
                x_rows, r, start, C, stride, every, -float("inf"), VEC, BLOCK, INTERIOR_BLOCK, True
            )
            w = _weights(w_rows, r, start, C, mask, COMPUTE, BLOCK, HAS_WEIGHT, SMOOTHING)
            seen = start // BLOCK + ((lanes - r[:, None]) >> 31)  # one less before the row's first column
            z = capped(z.to(COMPUTE), mask, cap, COMPUTE, SOFTCAP)
            m, s, d, w_seen = _softmax_step(
                z, w, mask, m, s, d, w_seen, seen.to(COMPUTE), floor, SMOOTHING, COUNT, ENTROPY
            )
        first_tail = C // BLOCK
        last = tl.cdiv(C + VEC - 1, BLOCK)
    else:
        first_tail = 0
        last = tl.cdiv(C, BLOCK)
    for b in range(first_tail, last):
        z, mask = load_rotated(
            x_rows, r, b * BLOCK, C, stride, row_mask, -float("inf"), VEC, BLOCK, TAIL, ALIGNED
        )
        w = _weights(w_rows, r, b * BLOCK, C, mask, COMPUTE, BLOCK, HAS_WEIGHT, SMOOTHING)
        seen = b + ((lanes - r[:, None]) >> 31)
        z = capped(z.to(COMPUTE), mask, cap, COMPUTE, SOFTCAP)
        m, s, d, w_seen = _softmax_step(
            z, w, mask, m, s, d, w_seen, seen.to(COMPUTE), floor, SMOOTHING, COUNT, ENTROPY
        )
    return m, s, d, w_seen


@triton.jit
def _gradient_blocks(
    x_rows,  # [ROWS] pointers to each row's logits
    g_rows,  # [ROWS] pointers to each row's gradient
    w_rows,  # [ROWS] pointers to the rows' class weights
    shift,  # [ROWS], end [ROWS]: the gradient rows' layout (fusedopt.kernels.rows)
    end,
    y_pos,  # [ROWS]: the target's position among the whole vectors, -1 if none
    C,
    stride_x,
    stride_g,
    row_mask,
    m,
    p_factor,
    hit,
    eps_w,
    keep,
    cap,  # the soft cap (read if SOFTCAP)
    DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    ROWS: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    SMOOTHING: tl.constexpr,
    SOFTCAP: tl.constexpr,
    X_ALIGNED: tl.constexpr,  # the logits' rows are split as the gradient's
    G_ALIGNED: tl.constexpr,  # the gradient's rows are split at 16-byte boundaries (else shift 0, end C)
    ent=None,  # _gradient's
):
    """Pass 2 of ``cross_entropy_kernel`` over the gradient rows' whole vectors (all the
    columns unless G_ALIGNED)."""
    lanes = tl.arange(0, BLOCK)[None, :]
    if G_ALIGNED:
        inner = interior_end(C, True, VEC, BLOCK)
        if ROWS == 1:  # the grid makes the program's row a row of the input: no row mask
            every = None
        else:
            every = row_mask
        in_rows = row_mask[:, None]
        for start in range(0, inner, BLOCK):  # no column mask
            z = load_block(
                x_rows, shift, end, start, stride_x, every, -float("inf"), VEC, BLOCK, True, X_ALIGNED
            )
            w = _split_weights(
                w_rows, shift, end, start, every, in_rows, COMPUTE, VEC, BLOCK, True, HAS_WEIGHT, SMOOTHING
            )
            target_lane = lanes == _lane(y_pos, start, BLOCK)[:, None]
            g = _gradient(
                z, w, target_lane, m, p_factor, hit, eps_w, keep, cap, DTYPE, COMPUTE, HAS_WEIGHT, SMOOTHING,
                SOFTCAP, ent,
            )  # fmt: skip
            store_block(g_rows, shift, end, start, stride_g, every, g, VEC, BLOCK, True, True)
    else:
        inner = 0
    for b in range(inner // BLOCK, tl.cdiv(C, BLOCK)):
        start = b * BLOCK
        z = load_block(
            x_rows, shift, end, start, stride_x, row_mask, -float("inf"), VEC, BLOCK, False, X_ALIGNED
        )
        mask = block_mask(end, start, row_mask, VEC, BLOCK, False, X_ALIGNED)
        w = _split_weights(
            w_rows, shift, end, start, row_mask, mask, COMPUTE, VEC, BLOCK, False, HAS_WEIGHT, SMOOTHING
        )
        target_lane = lanes == _lane(y_pos, start, BLOCK)[:, None]
        g = _gradient(
            z, w, target_lane, m, p_factor, hit, eps_w, keep, cap, DTYPE, COMPUTE, HAS_WEIGHT, SMOOTHING, SOFTCAP,
            ent,
        )  # fmt: skip
        store_block(g_rows, shift, end, start, stride_g, row_mask, g, VEC, BLOCK, False, G_ALIGNED)


@triton.jit
def _lane(pos, start, BLOCK: tl.constexpr):
    """Per row (int32): the lane of position ``pos`` in the block at ``start``; -1 if elsewhere."""
    lane = pos - start
    return tl.where((lane >= 0) & (lane < BLOCK), lane, -1).to(tl.int32)


@triton.jit
def _weights(
    w_rows,  # [ROWS] pointers: the class weights of the rows' column 0
    r,  # [ROWS] int32: the block's columns start at start - r
    start,
    C,
    mask,  # the block's columns in the rows
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    SMOOTHING: tl.constexpr,
):
    """The class weights of a block of pass 1 for label smoothing (its mask without class
    weights; unused without smoothing). Scalar loads: the weights are not read from the rows'
    boundaries."""
    if SMOOTHING and HAS_WEIGHT:
        cols = start - r[:, None] + tl.arange(0, BLOCK)[None, :]
        return tl.load(w_rows[:, None] + cols, mask=mask & (cols >= 0) & (cols < C), other=0).to(COMPUTE)
    else:
        return mask.to(COMPUTE)


@triton.jit
def _split_weights(
    w_rows,  # [ROWS] pointers: the class weights of the rows' column 0
    shift,
    end,
    start,
    row_mask,
    mask,  # the block's mask
    COMPUTE: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK: tl.constexpr,
    INTERIOR: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    SMOOTHING: tl.constexpr,
):
    """The class weights of a block of pass 2 for label smoothing (unused otherwise). Scalar
    loads: the weights are not split as the rows are."""
    if SMOOTHING and HAS_WEIGHT:
        w = load_block(w_rows, shift, end, start, 1, row_mask, 0, VEC, BLOCK, INTERIOR, False)
        return w.to(COMPUTE)
    else:
        return mask.to(COMPUTE)


@triton.jit
def _gradient(
    z,  # DTYPE [ROWS, BLOCK]: a block of logits
    w,  # COMPUTE [ROWS, BLOCK] (or [ROWS, 1]): their class weights (used if SMOOTHING and HAS_WEIGHT)
    target_lane,  # [ROWS, BLOCK]: the target's logit
    m,
    p_factor,
    hit,
    eps_w,
    keep,
    cap,  # the soft cap (read if SOFTCAP)
    DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    SMOOTHING: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ent=None,  # [ROWS, 1]: adds p_j ent (z_j - m) (m the log-sum-exp: ent log p_j; -inf logits add 0)
):
    """One block of pass 2 of ``cross_entropy_kernel``: the gradient of the logits ``z``, in DTYPE
    (with SOFTCAP: the gradient in the capped logits times their derivative in ``z``; with
    ``ent``: the entropy's term of ``fusedopt.kernels.log_probs``)."""
    z = z.to(COMPUTE)
    if SOFTCAP:
        z, slope = soft_cap(z, cap, COMPUTE)
    if ent is None:
        g = tl.exp(z - m) * p_factor - tl.where(target_lane, hit, 0)
    else:
        log_p = z - m
        p = tl.exp(log_p)
        g = p * (p_factor + ent * tl.where(p > 0, log_p, 0)) - tl.where(target_lane, hit, 0)
    if SMOOTHING:
        if HAS_WEIGHT:
            g -= eps_w * w
        else:
            g -= eps_w
    if SOFTCAP:
        g *= slope
    g = tl.where(keep, g, 0)  # exact zeros for ignored rows (NaN where torch's are NaN)
    # to_storage only where it rounds differently from .to (a call per block is slow in the
    # interpreter).
    if DTYPE == tl.bfloat16:
        return to_storage(g, DTYPE)
    else:
        return g.to(DTYPE)


@triton.jit
def soft_cap(z, cap, COMPUTE: tl.constexpr):
    """Gemma 2's logit soft-capping: ``(c tanh(z / c), 1 - tanh(z / c)²)``, the capped logits and
    their derivative in ``z`` (``c = cap``); ``(±c, 0)`` for ``z = ±inf``."""
    t = tanh(z * div_ieee(tl.full([], 1, COMPUTE), cap, COMPUTE), COMPUTE)
    return cap * t, 1 - t * t


@triton.jit
def capped(z, mask, cap, COMPUTE: tl.constexpr, SOFTCAP: tl.constexpr):
    """A block of logits of pass 1 (-inf outside the rows), soft-capped with SOFTCAP: ``c tanh(z /
    c)`` in the rows (a row's own -inf logit is -c), still -inf outside (``mask`` false)."""
    if SOFTCAP:
        z_capped, _ = soft_cap(z, cap, COMPUTE)
        return tl.where(mask, z_capped, -float("inf"))
    else:
        return z


@triton.jit
def online_lse(z, m, s):
    """One element per lane into the lanes' online log-sum-exp: ``(m, s, gap, up)``, the new
    running max and sum ``Σ exp(z - m)``, ``z - m_old`` and whether the max grew to ``z``. One exp
    per element: ``exp(-|z - m|)`` rescales either the old sum or the new term. A +inf ``z``
    enters as NaN; a NaN turns the lane's sum NaN for good and leaves its max (fmax) finite."""
    z = tl.where(z == float("inf"), float("nan"), z)
    gap = z - m  # m is finite: -inf at worst (z = -inf), NaN only for z NaN
    up = gap > 0  # never for NaN
    e = tl.exp(-tl.abs(gap))
    return tl.maximum(m, z), tl.where(up, s * e + 1, s + e), gap, up


@triton.jit
def _softmax_step(
    z,  # COMPUTE [ROWS, BLOCK]: a block of logits (-inf outside the rows)
    w,  # COMPUTE [ROWS, BLOCK] or [ROWS, 1]: their class weights (read if SMOOTHING)
    mask,  # [ROWS, BLOCK] or [ROWS, 1]: in the rows
    m,
    s,
    d,
    w_seen,
    seen,  # Σ w of the lanes so far when COUNT (w_seen is then not carried)
    floor,
    SMOOTHING: tl.constexpr,
    COUNT: tl.constexpr,
    ENTROPY: tl.constexpr = False,  # d: Σ exp(z - m) (m - z) instead (not with SMOOTHING)
):
    """One block of pass 1 of ``cross_entropy_kernel``: the lanes' ``m, s, d, w_seen`` updated."""
    m_new, s_new, gap, up = online_lse(z, m, s)
    if ENTROPY:
        # the entropy's Σ exp(z - m) (m - z) >= 0: when m grows to z, every earlier term gains
        # (z - m) exp(.) before all are rescaled by e = exp(m - z) (the new term is 0); else
        # the new term e (m - z). -inf logits add 0 (their limit); NaN stays NaN.
        e = tl.exp(-tl.abs(gap))  # online_lse's: computed once when compiled
        d = tl.where(up, e * (d + s * tl.where(up & (m > floor), gap, 0)), d + e * tl.minimum(-gap, -floor))
    s = s_new
    if SMOOTHING:
        if not COUNT:
            seen = w_seen
            w_seen += w
        # when m grows, every earlier term gains m_new - m (none to gain while the lane's
        # terms are all -inf: d is inf already); else the new term w (m - z)
        grow = seen * tl.where(up & (m > floor), gap, 0)
        if COUNT:  # w is the mask
            d = tl.where(up, d + grow, d + tl.where(mask & ~up, -gap, 0))
        else:
            d = tl.where(up, d + grow, d + w * tl.where(mask & ~up, -gap, 0))
    return m_new, s, d, w_seen


@triton.jit
def cross_entropy_sum_kernel(
    loss,  # COMPUTE [R]: loss of each row
    stats,  # COMPUTE [3]: Σ w[target] over the rows not ignored (read if MEAN)
    out,  # DTYPE [1]: the reduced loss
    R,
    DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    MEAN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Sum (or weighted mean) of the row losses in a fixed order: one program, deterministic."""
    acc = tl.zeros([BLOCK], COMPUTE)
    for start in range(0, R, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        acc += tl.load(loss + offs, mask=offs < R, other=0)
    total = tl.sum(acc, 0)
    if MEAN:
        total = div_ieee(total, tl.load(stats), COMPUTE)  # 0 / 0 = NaN when every row is ignored
    tl.store(out, to_storage(total, DTYPE))


@triton.jit
def cross_entropy_scale_kernel(
    src,  # DTYPE [numel]: stored gradient, dense
    dst,  # DTYPE [numel]: scaled gradient (src itself when FIRST)
    grad_output,  # [1]: upstream grad of the reduced loss
    applied,  # COMPUTE [1]: factor already in src; written (= grad_output) if FIRST, else read
    numel,
    DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    FIRST: tl.constexpr,  # first backward: src holds the gradient for grad_output 1; scale in place
    BLOCK: tl.constexpr,
    TAIL_BLOCK: tl.constexpr,  # the last block runs in sub-blocks of this many elements
):
    """``dst = src * grad_output / applied``. The first backward with grad_output 1 moves no
    bytes: every program loads the scalar and returns."""
    pid = tl.program_id(0)
    go = tl.load(grad_output).to(COMPUTE)
    if FIRST:
        if pid == 0:
            tl.store(applied, go)
        factor = go
    else:
        factor = div_ieee(go, tl.load(applied), COMPUTE)
    if (not FIRST) or (factor != 1):
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        if (pid.to(tl.int64) + 1) * BLOCK <= numel:  # a full block: no mask (128-bit accesses)
            g = tl.load(src + offs).to(COMPUTE)
            tl.store(dst + offs, to_storage(g * factor, DTYPE))
        else:  # the last block: masked, in sub-blocks (its code does not grow with BLOCK)
            for sub in range(pid.to(tl.int64) * BLOCK, numel, TAIL_BLOCK):
                tail = sub + tl.arange(0, TAIL_BLOCK)
                g = tl.load(src + tail, mask=tail < numel).to(COMPUTE)
                tl.store(dst + tail, to_storage(g * factor, DTYPE), mask=tail < numel)
