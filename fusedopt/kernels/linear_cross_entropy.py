"""The kernels of the fused linear + cross-entropy that are not cross-entropy's: the fp32
accumulation of a matmul over chunks (the weight's gradient over token chunks, the input's over
vocabulary blocks), and the log-sum-exp of rows seen one window of classes at a time.

Chunk ``k`` of the tokens contributes ``dZ_kᵀ X_k`` to ``grad_W`` (``dZ_k`` [c, V] the logits'
gradient, ``X_k`` [c, H] the chunk's input). cuBLAS, through torch, only adds a product into a
matrix of its operands' dtype, so for bf16/fp16 operands the sum over chunks would round to
16 bits at every chunk. This kernel adds the product of bf16/fp16 (or fp32) tiles into an fp32
matrix with fp32 accumulation (``tl.dot``): ``acc += a @ b``, one read and one write of
``acc`` per chunk, no atomics (each program owns one output tile), so the result does not depend
on scheduling.
"""

import triton
import triton.language as tl

from fusedopt.kernels.common import to_storage
from fusedopt.kernels.cross_entropy import capped, lowest, online_lse, soft_cap
from fusedopt.kernels.rows import HEAD, INTERIOR_BLOCK, TAIL, exact_sum, load_rotated, row_start


@triton.jit
def _window_step(
    z,  # COMPUTE [ROWS, BLOCK]: a block of logits, -inf outside the rows
    mask,  # their columns in the rows
    w_rows,  # [ROWS] pointers: the class weights of the window's column 0
    r,  # [ROWS] int32: the block's columns start at start - r
    start,
    C,
    m,
    s,
    wz,
    cap,  # the soft cap (read if SOFTCAP)
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    SMOOTHING: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """One block of ``logsumexp_block_kernel``: the lanes' online log-sum-exp and Σ w z (of the
    capped logits with SOFTCAP)."""
    z = capped(z, mask, cap, COMPUTE, SOFTCAP)
    m_new, s, _, _ = online_lse(z, m, s)
    if SMOOTHING:
        if HAS_WEIGHT:  # scalar loads: the weights are not read from the rows' boundaries
            cols = start - r[:, None] + tl.arange(0, BLOCK)[None, :]
            w = tl.load(w_rows[:, None] + cols, mask=mask & (cols >= 0) & (cols < C), other=0).to(COMPUTE)
            wz += w * tl.where(mask, z, 0)
        else:
            wz += tl.where(mask, z, 0)
    return m_new, s, wz


@triton.jit
def matmul_accumulate_kernel(
    acc,  # fp32 [M, N], any strides: acc += a @ b
    a,  # DTYPE [M, K], any strides (dZ_kᵀ: a transposed view)
    b,  # DTYPE [K, N], any strides (X_k)
    M,
    N,
    K,
    M_READ,  # a may be read in rows < M_READ (>= M) and
    K_READ,  # columns < K_READ (>= K): its rows padded (zeroed in registers past M and K)
    stride_cm,
    stride_cn,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # programs along M that share a column of b tiles (L2 reuse)
    UPCAST: tl.constexpr,  # tiles to fp32 before the dot: the interpreter's bf16 tl.dot is wrong
):
    """One BLOCK_M x BLOCK_N tile of ``acc`` per program, in grouped order. ``a`` is read with
    masks ``< M_READ`` and ``< K_READ``: a launcher that knows ``a``'s rows to be padded (the
    linear cross-entropy's logits buffer) passes its contiguous extent rounded up to 16
    elements, so that the mask is the same for every 16 elements and the loads are 128-bit at
    any vocabulary size; the elements past ``M`` and ``K`` are replaced by zeros."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_m = rm < M
    in_n = rn < N
    c_ptrs = acc + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    c_mask = in_m[:, None] & in_n[None, :]
    total = tl.load(c_ptrs, mask=c_mask, other=0)
    for start in range(0, K, BLOCK_K):
        rk = start + tl.arange(0, BLOCK_K).to(tl.int64)
        in_k = rk < K
        a_tile = tl.load(
            a + rm[:, None] * stride_am + rk[None, :] * stride_ak,
            mask=(rm < M_READ)[:, None] & (rk < K_READ)[None, :],
            other=0,
        )
        a_tile = tl.where(in_m[:, None] & in_k[None, :], a_tile, 0)
        b_tile = tl.load(
            b + rk[:, None] * stride_bk + rn[None, :] * stride_bn, mask=in_k[:, None] & in_n[None, :], other=0
        )
        if UPCAST:  # exact: a product of two bf16 values is an fp32 value
            a_tile = a_tile.to(tl.float32)
            b_tile = b_tile.to(tl.float32)
        total = tl.dot(a_tile, b_tile, total)
    tl.store(c_ptrs, total, mask=c_mask)


@triton.jit
def logsumexp_block_kernel(
    logits,  # DTYPE [R, C] (row stride stride_x): classes col0 .. col0 + C - 1 of every row
    target,  # int64 or uint8 [R]: class index of each row
    weight,  # [K]: class weights (read if HAS_WEIGHT)
    stats,  # COMPUTE [3]: Σ w[target] over the rows not ignored, Σ w (read if LAST and SMOOTHING), ...
    state,  # COMPUTE [4, R]: per row, over the classes seen: max m, Σ exp(z - m), z_y, Σ w z (read unless FIRST; written unless LAST)
    lse,  # COMPUTE [R]: each row's log-sum-exp (written if LAST)
    loss,  # LOSS_DTYPE [R]: each row's loss, 0 if ignored (written if LAST)
    R,
    C,
    col0: tl.int64,
    K,
    stride_x,
    stride_t,
    ignore_index: tl.int64,
    label_smoothing: tl.float64,
    z_loss: tl.float64,  # the z-loss weight (read if LAST and Z_LOSS)
    softcap: tl.float64,  # the logits' soft cap c (read if SOFTCAP)
    DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,  # float32, or float64 for fp64 logits
    LOSS_DTYPE: tl.constexpr,
    ROWS: tl.constexpr,  # rows per program
    BLOCK: tl.constexpr,  # columns per step
    HAS_WEIGHT: tl.constexpr,
    SMOOTHING: tl.constexpr,  # label_smoothing > 0: keep Σ_c w_c z_c
    FIRST: tl.constexpr,  # the first window of the classes: no state to read
    LAST: tl.constexpr,  # the last: write lse and the loss instead of the state
    Z_LOSS: tl.constexpr,  # z_loss > 0: each row not ignored adds z_loss lse² to its loss
    SOFTCAP: tl.constexpr,  # softcap > 0: every logit z read as c tanh(z / c)
):
    """One window of the classes of every row (the vocabulary order of the linear
    cross-entropy): the window's max and sum of exponentials (an online softmax per lane, as
    ``cross_entropy_kernel``) merged into the rows' running ones, ``z_y`` when the target is in
    the window, and ``Σ w_c z_c`` for label smoothing (its loss term is
    ``ε / K (W lse - Σ_c w_c z_c)``: a cancellation of ``|z| / 2^24`` relative, times ``ε / K``).
    After the last window, ``lse = m + log Σ exp(z - m)`` and the row's loss.

    Non-finite logits as ``cross_entropy_kernel`` (:func:`online_lse`): maxima start at the
    lowest finite value, a NaN or +inf logit makes the row's sum NaN (carried through the
    state), and a row whose sum is NaN or 0 (only -inf logits) gets a NaN lse, as torch. With
    SOFTCAP every logit (the target's too) is capped first, as in ``cross_entropy_kernel``: the
    state, lse and loss are the capped logits'."""
    VEC: tl.constexpr = 128 // DTYPE.primitive_bitwidth  # elements per 16 bytes
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < R
    x_base = logits + rows * stride_x
    y = tl.load(target + rows * stride_t, mask=row_mask, other=0).to(tl.int64)

    # 128-bit loads at any window width and row alignment, and a result that does not depend on
    # the rows' addresses: the rows read from their 16-byte boundaries, lane i seeing the
    # columns i - r, i - r + BLOCK, ..., the lanes summed exactly (fusedopt.kernels.rows)
    # (not for blocks of fewer than 2 vectors, nor fp64: its exact sums would need more than int64)
    ok: tl.constexpr = BLOCK >= 2 * VEC and COMPUTE != tl.float64
    r = row_start(x_base, ok, VEC)
    w_rows = weight + col0 + tl.zeros([ROWS], tl.int64)  # the window's class weights, as rows
    m = lowest(ROWS, BLOCK, COMPUTE)  # finite: no -inf - (-inf)
    s = tl.zeros([ROWS, BLOCK], COMPUTE)  # NaN after a NaN or +inf logit
    wz = tl.zeros([ROWS, BLOCK], COMPUTE)
    cap = tl.full([], softcap, COMPUTE)
    if ROWS == 1:  # the grid makes the program's row a row of the input: no row mask
        every = None
    else:
        every = row_mask
    if ok:
        if C >= BLOCK:
            z, mask = load_rotated(x_base, r, 0, C, 1, every, -float("inf"), VEC, BLOCK, HEAD, True)
            m, s, wz = _window_step(
                z.to(COMPUTE), mask, w_rows, r, 0, C, m, s, wz, cap, COMPUTE, BLOCK, HAS_WEIGHT, SMOOTHING, SOFTCAP
            )  # fmt: skip
        for start in range(BLOCK, C // BLOCK * BLOCK, BLOCK):  # every column in the row: no mask
            z, mask = load_rotated(
                x_base, r, start, C, 1, every, -float("inf"), VEC, BLOCK, INTERIOR_BLOCK, True
            )
            m, s, wz = _window_step(
                z.to(COMPUTE), mask, w_rows, r, start, C, m, s, wz, cap, COMPUTE, BLOCK, HAS_WEIGHT, SMOOTHING,
                SOFTCAP,
            )  # fmt: skip
        first_tail = C // BLOCK
        last = tl.cdiv(C + VEC - 1, BLOCK)
    else:
        first_tail = 0
        last = tl.cdiv(C, BLOCK)
    for b in range(first_tail, last):
        z, mask = load_rotated(x_base, r, b * BLOCK, C, 1, row_mask, -float("inf"), VEC, BLOCK, TAIL, ok)
        m, s, wz = _window_step(
            z.to(COMPUTE), mask, w_rows, r, b * BLOCK, C, m, s, wz, cap, COMPUTE, BLOCK, HAS_WEIGHT, SMOOTHING,
            SOFTCAP,
        )  # fmt: skip
    m_block = tl.max(m, 1)
    s_block = exact_sum(s * tl.exp(m - m_block[:, None]), float("nan"), ok)
    here = row_mask & (y >= col0) & (y < col0 + C)
    z_y = tl.load(x_base + (y - col0), mask=here, other=0).to(COMPUTE)
    if SOFTCAP:
        z_y, _ = soft_cap(z_y, cap, COMPUTE)
    if SMOOTHING:  # Σ w z of either sign: its positive and negative parts summed exactly
        wz_row = exact_sum(tl.maximum(wz, 0), float("inf"), ok) - exact_sum(
            tl.maximum(-wz, 0), float("inf"), ok
        )
    else:
        wz_row = tl.zeros([ROWS], COMPUTE)
    if not FIRST:
        m_old = tl.load(state + rows, mask=row_mask, other=0)
        s_old = tl.load(state + R + rows, mask=row_mask, other=0)
        m_new = tl.maximum(m_old, m_block)  # both finite
        s_block = s_block * tl.exp(m_block - m_new) + s_old * tl.exp(m_old - m_new)
        m_block = m_new
        z_y += tl.load(state + 2 * R + rows, mask=row_mask, other=0)
        wz_row += tl.load(state + 3 * R + rows, mask=row_mask, other=0)
    if LAST:
        bad = (s_block != s_block) | (s_block == 0)  # a NaN or +inf logit, or none above -inf
        row_lse = tl.where(bad, float("nan"), m_block + tl.log(tl.where(bad, 1, s_block)))
        valid = row_mask & (y != ignore_index) & (y >= 0) & (y < K)
        if HAS_WEIGHT:
            w_y = tl.load(weight + y, mask=valid, other=0).to(COMPUTE)
        else:
            w_y = valid.to(COMPUTE)
        row_loss = w_y * (row_lse - z_y)
        if SMOOTHING:
            eps = tl.full([], label_smoothing, COMPUTE)
            row_loss = (1 - eps) * row_loss + eps / K * (tl.load(stats + 1) * row_lse - wz_row)
        if Z_LOSS:
            kept_lse = tl.where(valid, row_lse, 0)
            row_loss += z_loss * kept_lse * kept_lse
        row_loss = tl.where(valid, row_loss, 0)
        if LOSS_DTYPE == tl.bfloat16:
            tl.store(loss + rows, to_storage(row_loss, LOSS_DTYPE), mask=row_mask)
        else:
            tl.store(loss + rows, row_loss.to(LOSS_DTYPE), mask=row_mask)
        tl.store(lse + rows, row_lse, mask=row_mask)
    else:
        tl.store(state + rows, m_block, mask=row_mask)
        tl.store(state + R + rows, s_block, mask=row_mask)
        tl.store(state + 2 * R + rows, z_y, mask=row_mask)
        tl.store(state + 3 * R + rows, wz_row, mask=row_mask)
