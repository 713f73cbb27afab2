"""Cross-entropy over class logits: loss and, in the same pass, the gradient of the logits.

Rows are the logits of one sample, ``z`` (``C`` classes); ``y`` its target, ``w`` the class
weights (1 without weight), ``ε`` the label smoothing, ``lse = log Σ_c exp(z_c)``. As torch
(``aten::cross_entropy_loss_label_smoothing``), a row that is not ignored has the loss

    loss = (1 - ε) w_y (lse - z_y) + ε / C Σ_c w_c (lse - z_c)

and an ignored row (``y == ignore_index``) 0. With ``p = softmax(z)``, ``W = Σ_c w_c``:

    dloss/dz_j = p_j ((1 - ε) w_y + ε W / C) - (1 - ε) w_y [j == y] - ε w_j / C

(``p - (1 - ε) onehot(y) - ε / C`` without weight), times the reduction's factor: 1 / Σ w_y over
the non-ignored rows for ``mean``, 1 for ``sum``, the row's upstream grad for ``none``.

A program takes a tile of ROWS rows (one row when rows are wider than a block). Pass 1 walks
its rows in column blocks with an online softmax kept per lane (lane i sees columns i,
i + BLOCK, ...; no reduction until the row ends): the running max ``m``, the sum
``s = Σ exp(z_c - m)`` rescaled whenever ``m`` grows and, for label smoothing,
``d = Σ_c w_c (m - z_c) >= 0`` (so ``Σ_c w_c (lse - z_c) = W log s + d``, without the
cancellation of ``W lse - Σ w_c z_c`` at large logits). Pass 2 reads the rows again and writes
the gradient. fp32 math (fp64 for fp64 logits); storage dtype only on load and store. No atomics:
every sum has a fixed order, so results are deterministic.

Non-finite logits, as torch: -inf logits (masked classes) are fine; a row with a NaN or +inf
logit, or of only -inf, has a NaN log-sum-exp, so a NaN loss (0 if ignored) and a NaN gradient
(ignored or not: torch's softmax backward multiplies its NaNs by 0). The running max starts at
the lowest finite value (``LOWEST``), not -inf, and NaN/+inf logits enter the online softmax as
-inf while they turn their lane's sum NaN: no step computes -inf - (-inf) or 0 * inf (which
would warn under the interpreter), and a NaN is never dropped by a max.
"""

import triton
import triton.language as tl

from fusedopt.kernels.common import div_ieee, to_storage


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
    DTYPE: tl.constexpr,  # storage dtype of logits and grad
    COMPUTE: tl.constexpr,  # float32, or float64 for fp64 logits
    LOSS_DTYPE: tl.constexpr,  # dtype of `loss`
    ROWS: tl.constexpr,  # rows per program (> 1 only when a row fits in one block)
    BLOCK: tl.constexpr,  # columns per block; a row spans ceil(C / BLOCK) blocks
    HAS_WEIGHT: tl.constexpr,
    SMOOTHING: tl.constexpr,  # label_smoothing > 0
    LOSS: tl.constexpr,  # pass 1: online softmax and the row's loss
    SAVE_LSE: tl.constexpr,  # store the row's log-sum-exp (for a backward that recomputes)
    GRAD: tl.constexpr,  # pass 2: write the gradient
    DIVIDE_BY_TOTAL: tl.constexpr,  # reduction mean: gradient times 1 / Σ w[target] (stats[2])
    ROW_GRAD_OUTPUT: tl.constexpr,  # reduction none (backward): gradient times grad_output[r]
):
    """A tile of ROWS rows × BLOCK columns per step; each row's scalars are [ROWS] vectors."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < R
    n = rows // S
    x_base = logits + n * stride_xn + (rows - n * S) * stride_xs  # [ROWS] pointers to each row
    x_rows = x_base[:, None]

    y = tl.load(target + rows * stride_t, mask=row_mask, other=0).to(tl.int64)
    # Out-of-range targets are reported by the caller's device assert; here they read nothing.
    valid = row_mask & (y != ignore_index) & (y >= 0) & (y < K)
    eps = tl.full([], label_smoothing, COMPUTE)
    if HAS_WEIGHT:
        w_y = tl.load(weight + y, mask=valid, other=0).to(COMPUTE)
    else:
        w_y = valid.to(COMPUTE)

    if LOSS:
        z_y = tl.load(x_base + y * stride_xc, mask=valid, other=0).to(COMPUTE)
        # Per-lane online softmax: lane i of a row sees columns i, i + BLOCK, ...; one exp per
        # element (exp(-|z - m|) rescales either the old sum or the new term); the lanes are
        # reduced once, after the last block.
        floor = lowest(ROWS, BLOCK, COMPUTE)
        m = floor  # running max of the lane (finite)
        s = tl.zeros([ROWS, BLOCK], COMPUTE)  # Σ exp(z - m) of the lane; NaN after a NaN or +inf
        d = tl.zeros([ROWS, BLOCK], COMPUTE)  # Σ w (m - z) of the lane (label smoothing)
        w_seen = tl.zeros([ROWS, BLOCK], COMPUTE)  # Σ w of the lane (label smoothing)
        for start in range(0, C, BLOCK):
            cols = start + tl.arange(0, BLOCK).to(tl.int64)
            mask = row_mask[:, None] & (cols < C)[None, :]
            z = tl.load(x_rows + cols[None, :] * stride_xc, mask=mask, other=-float("inf")).to(COMPUTE)
            below_inf = z < float("inf")  # false for NaN and +inf: the row's lse is NaN
            z = tl.where(below_inf, z, -float("inf"))
            gap = z - m  # m is finite: -inf at worst, never NaN
            up = gap > 0  # the lane's max grows to z
            e = tl.exp(-tl.abs(gap))
            s = tl.where(below_inf, tl.where(up, s * e + 1, s + e), float("nan"))
            if SMOOTHING:
                if HAS_WEIGHT:
                    w = tl.load(weight + cols, mask=cols < C, other=0).to(COMPUTE)[None, :]
                else:
                    w = (cols < C).to(COMPUTE)[None, :]
                w = tl.where(mask, w, 0)
                # when m grows, every earlier term gains m_new - m (none to gain while the lane's
                # terms are all -inf: d is inf already); else the new term w (m - z)
                grow = w_seen * tl.where(up & (m > floor), gap, 0)
                d = tl.where(up, d + grow, d + w * tl.where(mask & ~up, -gap, 0))
                w_seen += w
            m = tl.maximum(m, z)
        m_lane = m
        m = tl.max(m_lane, 1)
        s = tl.sum(s * tl.exp(m_lane - m[:, None]), 1)
        bad = (s != s) | (s == 0)  # a NaN or +inf logit, or none above -inf (or a masked row)
        s = tl.where(bad, 1, s)
        log_s = tl.log(s)
        row_loss = w_y * (m - z_y + log_s)  # w_y (lse - z_y)
        if SMOOTHING:
            d = tl.sum(d + w_seen * tl.where(m_lane > floor, m[:, None] - m_lane, 0), 1)
            # Σ_c w_c (lse - z_c) = W log s + Σ_c w_c (m - z_c)
            row_loss = (1 - eps) * row_loss + eps / K * (tl.sum(w_seen, 1) * log_s + d)
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

    if GRAD:
        g_rows = (grad + n * stride_gn + (rows - n * S) * stride_gs)[:, None]
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
        # g = (p_j p_factor - hit [j == y] - ε / C w_j) * scale, the factors premultiplied per row;
        # NaN for a row whose lse is NaN
        p_factor = tl.where(bad, float("nan"), p_factor * inv_s * scale)[:, None]
        hit = (hit * scale)[:, None]
        eps_w = (eps / K * scale)[:, None]
        keep = (valid | bad)[:, None]
        m = m[:, None]
        for start in range(0, C, BLOCK):
            cols = start + tl.arange(0, BLOCK).to(tl.int64)
            mask = row_mask[:, None] & (cols < C)[None, :]
            z = tl.load(x_rows + cols[None, :] * stride_xc, mask=mask, other=-float("inf")).to(COMPUTE)
            g = tl.exp(z - m) * p_factor - tl.where(col0 + cols[None, :] == y[:, None], hit, 0)
            if SMOOTHING:
                if HAS_WEIGHT:
                    g -= eps_w * tl.load(weight + col0 + cols, mask=cols < C, other=0).to(COMPUTE)[None, :]
                else:
                    g -= eps_w
            g = tl.where(keep, g, 0)  # exact zeros for ignored rows (NaN where torch's are NaN)
            # to_storage only where it rounds differently from .to (a call per block is slow
            # in the interpreter).
            if DTYPE == tl.bfloat16:
                tl.store(g_rows + cols[None, :] * stride_gc, to_storage(g, DTYPE), mask=mask)
            else:
                tl.store(g_rows + cols[None, :] * stride_gc, g.to(DTYPE), mask=mask)


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
        mask = offs < numel
        g = tl.load(src + offs, mask=mask).to(COMPUTE)
        tl.store(dst + offs, to_storage(g * factor, DTYPE), mask=mask)
