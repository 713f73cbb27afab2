"""Per-token log-probabilities and entropy of logits rows (``fusedopt.functional.linear_log_probs``).

A row is the logits ``z`` of one token (``C`` classes, already divided by the temperature: the
matmul's alpha does it), ``y`` its target, ``p = softmax(z)``, ``lse = log Σ exp(z)``. The
forward writes

    log_prob = z_y - lse           (0 if y is ignore_index)
    entropy  = -Σ_j p_j log p_j    (every row)

from one online pass per row (``cross_entropy``'s pass 1 with ENTROPY): the running max ``m``,
``s = Σ exp(z - m)`` and ``u = Σ exp(z - m) (m - z)``, rescaled when ``m`` grows
(``u' = e^{m - m'} (u + (m' - m) s)``), then

    log_prob = (z_y - m) - log s   <= 0: z_y <= m, and s >= 1 (the max's own term is 1)
    entropy  = log s + u / s       >= 0: every term of u is >= 0

so the signs hold by construction, whatever the rounding (``log s`` is clamped at 0, where
only an inexact ``log`` could take it below). The lanes' ``s`` and ``u`` are summed exactly, so
a row gives the same bits in any chunk. fp32 arithmetic (fp64 for fp64 logits); 4 bytes a row
of ``lse`` (and the entropy) are kept for the backward.

A row may also be seen in windows of its classes (the vocabulary order of a head sharded over
the vocabulary, ``fusedopt.losses._vocab_parallel``): each window's ``(m, s, z_y, u)`` is
written as a state (``z_y`` 0 where the target is not in the window), the states merged by
rescaling to the overall max ``M`` (``s e^{m - M}``, ``(u + (M - m) s) e^{m - M}``: terms still
>= 0), and the rows finished from the merged state by the formulas above.

The backward recomputes the logits and overwrites them with their gradient, for per-row
upstream grads ``g`` (of log_prob) and ``h`` (of the entropy), ``T`` the temperature:

    dz_j = [g (1[j = y] - p_j) - h p_j (log p_j + entropy)] / T

(``d entropy / dz_j = -p_j (z_j - E_p[z])`` and ``z_j - E_p[z] = log p_j + entropy``):
``cross_entropy``'s pass 2 with ``p_factor = -(g + h entropy) / T``, ``hit = -g / T`` and the
term ``ent log p_j``, ``ent = -h / T``. Rows whose ``lse`` is NaN (a NaN or +inf logit, or only
-inf) get NaN outputs (log_prob 0 if ignored) and a NaN gradient, as the composition.
"""

import triton
import triton.language as tl

from fusedopt.kernels.cross_entropy import _gradient_pass, _softmax_pass


@triton.jit
def log_probs_kernel(
    logits,  # DTYPE [R, C], unit column stride (row stride stride_x): the logits / T (not read if FROM_STATE)
    target,  # int64 or uint8 [R]: each row's class (stride stride_t)
    log_prob,  # COMPUTE [R]: written: log softmax(z)[target], 0 where the target is ignore_index
    entropy,  # COMPUTE [R]: written if ENTROPY
    lse,  # COMPUTE [R]: each row's log-sum-exp, written if SAVE_LSE (for the backward)
    state,  # COMPUTE [4, R]: per row m, s, z_y (0 if not in the window), u (0 without ENTROPY)
    # of the window's classes (written if WINDOW), or of all the classes (read if FROM_STATE)
    R,
    C,  # the row's classes: col0 .. col0 + C - 1 of K
    col0: tl.int64,
    K,
    stride_x,
    stride_t,
    ignore_index: tl.int64,
    DTYPE: tl.constexpr,  # storage dtype of the logits
    COMPUTE: tl.constexpr,  # float32, or float64 for fp64 logits
    ROWS: tl.constexpr,  # rows per program (> 1 only when a row fits in one block)
    BLOCK: tl.constexpr,  # columns per step
    ENTROPY: tl.constexpr,
    SAVE_LSE: tl.constexpr,
    WINDOW: tl.constexpr,  # a window of the classes: write its state, finish no row
    FROM_STATE: tl.constexpr,  # finish the rows from their state (merged over windows): no logits read
):
    """The forward of a tile of ROWS rows: one pass over each row's logits (128-bit reads from
    the rows' 16-byte boundaries, ``fusedopt.kernels.rows``), then the target's logit. A row's
    statistics ``(m, s, z_y, u)`` merge over windows of its classes as
    ``fusedopt.losses._vocab_parallel.merge_rows`` says (``LOG_PROB_STATE``): the vocabulary
    order writes each window's (WINDOW), merges them and finishes the rows (FROM_STATE)."""
    VEC: tl.constexpr = 128 // DTYPE.primitive_bitwidth  # elements per 16 bytes
    # blocks of at least 2 vectors; fp64's exact sums would need more than 64-bit integers
    ALIGNED: tl.constexpr = BLOCK >= 2 * VEC and COMPUTE != tl.float64
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < R
    x_rows = logits + rows * stride_x  # [ROWS] pointers to each row
    y = tl.load(target + rows * stride_t, mask=row_mask, other=0).to(tl.int64)
    # out-of-range targets are reported by the launcher's check; here they read nothing
    valid = row_mask & (y != ignore_index) & (y >= 0) & (y < K)
    if FROM_STATE:
        m = tl.load(state + rows, mask=row_mask, other=0)
        s = tl.load(state + R + rows, mask=row_mask, other=1)
        z_y = tl.load(state + 2 * R + rows, mask=row_mask, other=0)
        u = tl.load(state + 3 * R + rows, mask=row_mask, other=0)
    else:
        m, s, u, _ = _softmax_pass(
            x_rows, x_rows, 0.0, C, 1, row_mask, COMPUTE, ROWS, VEC, BLOCK, False, False, False, ALIGNED, ENTROPY
        )  # fmt: skip
        if not ENTROPY:
            u = tl.zeros([ROWS], COMPUTE)
        here = valid & (y >= col0) & (y < col0 + C)  # the target among the row's classes
        z_y = tl.load(x_rows + (y - col0), mask=here, other=0).to(COMPUTE)
    if WINDOW:
        tl.store(state + rows, m, mask=row_mask)
        tl.store(state + R + rows, s, mask=row_mask)
        tl.store(state + 2 * R + rows, z_y, mask=row_mask)
        tl.store(state + 3 * R + rows, u, mask=row_mask)
    else:
        bad = (s != s) | (s == 0)  # a NaN or +inf logit, or none above -inf
        s = tl.where(bad, 1, s)
        log_s = tl.maximum(tl.log(s), 0)  # s >= 1
        row_lp = tl.where(valid, (z_y - m) - log_s, 0)
        tl.store(log_prob + rows, tl.where(valid & bad, float("nan"), row_lp), mask=row_mask)
        if ENTROPY:
            tl.store(entropy + rows, tl.where(bad, float("nan"), log_s + u / s), mask=row_mask)
        if SAVE_LSE:
            tl.store(lse + rows, tl.where(bad, float("nan"), m + log_s), mask=row_mask)


@triton.jit
def log_probs_backward_kernel(
    logits,  # DTYPE [R, C], unit column stride (row stride stride_x): the logits / T (a window of the
    # classes: see C); overwritten
    # with the gradient of the logits before the division
    target,  # int64 or uint8 [R]: each row's class (stride stride_t)
    lse,  # COMPUTE [R]: each row's log-sum-exp (the forward's)
    entropy,  # COMPUTE [R]: each row's entropy (read if ENTROPY)
    grad_log_prob,  # [R]: the upstream grad of each row's log_prob (read if LOG_PROB; stride stride_glp)
    grad_entropy,  # [R]: the upstream grad of each row's entropy (read if ENTROPY; stride stride_gh)
    R,
    C,  # the row's classes: col0 .. col0 + C - 1 of K
    col0: tl.int64,
    K,
    stride_x,
    stride_t,
    stride_glp,
    stride_gh,
    inv_temperature: tl.float64,
    ignore_index: tl.int64,
    DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    LOG_PROB: tl.constexpr,  # a gradient of log_prob to propagate
    ENTROPY: tl.constexpr,  # a gradient of the entropy to propagate
):
    """The gradient of a tile of ROWS rows, in place (the rows' whole 16-byte vectors read and
    written 128-bit, the other columns as an edge tile: ``cross_entropy``'s pass 2)."""
    VEC: tl.constexpr = 128 // DTYPE.primitive_bitwidth
    SPLIT: tl.constexpr = BLOCK >= 2 * VEC
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < R
    x_rows = logits + rows * stride_x
    y = tl.load(target + rows * stride_t, mask=row_mask, other=0).to(tl.int64)
    valid = row_mask & (y != ignore_index) & (y >= 0) & (y < K)
    inv_t = tl.full([], inv_temperature, COMPUTE)
    m = tl.load(lse + rows, mask=row_mask, other=0)
    if LOG_PROB:
        g = tl.load(grad_log_prob + rows * stride_glp, mask=valid, other=0).to(COMPUTE) * inv_t
    else:
        g = tl.zeros([ROWS], COMPUTE)
    p_factor = -g
    if ENTROPY:
        h = tl.load(grad_entropy + rows * stride_gh, mask=row_mask, other=0).to(COMPUTE) * inv_t
        p_factor -= h * tl.load(entropy + rows, mask=row_mask, other=0)
        ent = (-h)[:, None]
    else:
        ent = None
    y_col = tl.where(valid & (y >= col0) & (y < col0 + C), y - col0, -1).to(tl.int32)  # -1: not in the row
    _gradient_pass(
        x_rows, x_rows, x_rows, y_col, C, 1, 1, row_mask, m[:, None], p_factor[:, None], (-g)[:, None],
        0.0, row_mask[:, None], 0.0, DTYPE, COMPUTE, ROWS, VEC, BLOCK, False, False, False, SPLIT, SPLIT, ent,
    )  # fmt: skip
