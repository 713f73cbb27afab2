"""The one kernel of every optimizer step: each algorithm supplies only its update.

``optimizer_kernel`` does what every step shares, once: the block's tensor and offsets
(:func:`fusedopt.kernels.common.block_start`), GradScaler's verdict (nothing is read or written
when ``found_inf`` is set), the gradient (unscaled, clipped, negated for ``maximize``), the
param and state loads and stores in their storage (precision modes, stochastic rounding, 8-bit
state) and the dispatch between full blocks (unmasked, 128-bit accesses on tensors whose
addresses are 16-byte aligned: decided per tensor) and the masked last block of a tensor. The
algorithm's module (``fusedopt.kernels.adam``, ...) declares its spec and two ``@triton.jit``
functions the kernel takes as constexprs:

* ``update(p, g, s1, s2, s3, scalars, prepared, counter, SWITCHES, COMPUTE) -> (p, s1, s2, s3)``:
  the param, the gradient and the state columns 1-3 (``COLUMNS[1:]``; a column the launch does
  not use is passed as ``g`` and never stored) in COMPUTE precision; ``scalars`` the group's
  float64 hyper-parameters, ``prepared`` the tensor's row of per-tensor values, ``counter`` the
  address of the tensor's step count; ``SWITCHES`` the algorithm's ``FLAGS`` as bits.
* ``prepare(scalars, step, out, mask, COMPUTE)`` (only if ``PREPARED`` names values): stores,
  for a vector of tensors with step counts ``step`` (float64), each per-tensor value of the
  step at ``out + i`` (``out``: the tensors' rows of ``prepared``). ``prepare_kernel`` runs it
  once per step over all tensors of a launch (and advances their step counts), so bias
  corrections and decayed learning rates are computed once per tensor, not per thread. An
  algorithm with per-tensor scalar state (``CARRIED``: NAdam's ``mu_product``) takes two more
  arguments, ``prepare(..., COMPUTE, carried, taken)``: the address of each tensor's row of
  those values (the step counters' dtype), which it reads and, where ``taken`` (the step is not
  skipped by GradScaler), updates.

Adding an optimizer is its update (and prepare) function and its ``Algorithm`` spec
(:mod:`fusedopt.optim._step`).
"""

import triton
import triton.language as tl

from fusedopt.kernels.common import (
    address,
    block_start,
    load_grad,
    load_param,
    load_state,
    random_bits,
    step_taken,
    store_param,
    store_state,
    whole_block,
)

# Bits of the STATE constexpr: which state columns a launch reads and writes.
COLUMN_1 = tl.constexpr(1)
COLUMN_2 = tl.constexpr(2)
COLUMN_3 = tl.constexpr(4)


def bits(names: tuple[str, ...]) -> tuple[tl.constexpr, ...]:
    """Constexpr masks ``1, 2, 4, ...`` for an algorithm's ``FLAGS``: the launcher packs the flags
    into ``SWITCHES`` with the same names, the update tests ``if AMSGRAD & SWITCHES:``."""
    return tuple(tl.constexpr(1 << i) for i in range(len(names)))


@triton.jit
def _column(ptrs, absmax_ptrs, codebook, t, c: tl.constexpr, offs, mask, g, USED: tl.constexpr, K: tl.constexpr,
            SDTYPE: tl.constexpr, COMPUTE: tl.constexpr, ALIGNED: tl.constexpr, Q8: tl.constexpr):  # fmt: skip
    """State column ``c`` in COMPUTE, or ``g`` (not read) where the launch does not use it."""
    if USED:
        return load_state(ptrs, absmax_ptrs, codebook, t, c, offs, mask, K, SDTYPE, COMPUTE, ALIGNED, Q8)
    else:
        return g


@triton.jit
def _block(ptrs, grad_ptrs, scalars, prepared, steps, seeds, absmax_ptrs, codebook, grad_scale, clip_coef, t,
           offs, mask, UPDATE: tl.constexpr, K: tl.constexpr, STATE: tl.constexpr, SWITCHES: tl.constexpr,
           P: tl.constexpr, DTYPE: tl.constexpr, SDTYPE: tl.constexpr, COMPUTE: tl.constexpr, MODE: tl.constexpr,
           SR: tl.constexpr, Q8: tl.constexpr, BLOCK: tl.constexpr, MAXIMIZE: tl.constexpr,
           HAS_GRAD_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr, ALIGNED: tl.constexpr):  # fmt: skip
    """One block of tensor ``t`` (``mask``: None for a full block)."""
    # Upcast right after loading (the interpreter computes low precision on raw bits).
    p = load_param(ptrs, t, offs, mask, K, DTYPE, COMPUTE, ALIGNED, MODE)
    # One random word per stochastically rounded store: the param and each state column used.
    WORDS: tl.constexpr = 1 + (STATE & 1) + ((STATE >> 1) & 1) + ((STATE >> 2) & 1)
    r_p, r_1, r_2, r_3 = random_bits(seeds, t, offs, WORDS, DTYPE, SDTYPE, SR)
    g_ptr = address(grad_ptrs, t, 0, 1, DTYPE, ALIGNED) + offs
    g = load_grad(g_ptr, mask, grad_scale, clip_coef, COMPUTE, MAXIMIZE, HAS_GRAD_SCALE, HAS_CLIP)
    s1 = _column(
        ptrs, absmax_ptrs, codebook, t, 1, offs, mask, g, COLUMN_1 & STATE, K, SDTYPE, COMPUTE, ALIGNED, Q8
    )
    s2 = _column(
        ptrs, absmax_ptrs, codebook, t, 2, offs, mask, g, COLUMN_2 & STATE, K, SDTYPE, COMPUTE, ALIGNED, Q8
    )
    s3 = _column(
        ptrs, absmax_ptrs, codebook, t, 3, offs, mask, g, COLUMN_3 & STATE, K, SDTYPE, COMPUTE, ALIGNED, Q8
    )
    p, s1, s2, s3 = UPDATE(p, g, s1, s2, s3, scalars, prepared + t * P, steps + t, SWITCHES, COMPUTE)
    store_param(ptrs, t, offs, mask, p, r_p, K, DTYPE, ALIGNED, MODE, SR)
    if COLUMN_1 & STATE:
        store_state(ptrs, absmax_ptrs, codebook, t, 1, offs, mask, s1, r_1, K, SDTYPE, ALIGNED, SR, Q8, BLOCK)
    if COLUMN_2 & STATE:
        store_state(ptrs, absmax_ptrs, codebook, t, 2, offs, mask, s2, r_2, K, SDTYPE, ALIGNED, SR, Q8, BLOCK)
    if COLUMN_3 & STATE:
        store_state(ptrs, absmax_ptrs, codebook, t, 3, offs, mask, s3, r_3, K, SDTYPE, ALIGNED, SR, Q8, BLOCK)


@triton.jit
def _aligned(ptrs, grad_ptrs, t, K: tl.constexpr):
    """Whether every address tensor ``t``'s step walks is 16-byte aligned."""
    bits = tl.load(grad_ptrs + t)
    for k in tl.static_range(K):
        bits = bits | tl.load(ptrs + t * K + k)
    return (bits & 15) == 0


@triton.jit
def optimizer_kernel(
    ptrs,  # int64 [T, K]: COLUMNS, then the precision column (absent operands: the param, never read)
    grad_ptrs,  # int64 [T, 1]: grad
    meta,  # int64 [T, 2]: numel, first block
    owner,  # int32 [B]: tensor of each block
    scalars,  # float64 [len(SCALARS)]: the group's hyper-parameters
    prepared,  # COMPUTE [T, P]: each tensor's PREPARED values of this step (read if P > 0)
    steps,  # float32 or float64 [T]: each tensor's step count, this step included
    seeds,  # int64 [T]: each tensor's stochastic-rounding seed (read if SR)
    absmax_ptrs,  # int64 [T, K - 2]: address of each state column's absmax, 0: fp32 state (read if Q8)
    codebook,  # float32 [K - 2, BOOK]: each state column's code map (fusedopt.kernels.common; read if Q8)
    grad_scale,  # float32 [1]: AMP scale the grads carry (read if HAS_GRAD_SCALE)
    found_inf,  # float32 [1]: non-zero skips the step (read if HAS_FOUND_INF)
    clip_coef,  # float32 [1]: min(1, max_grad_norm / (norm + 1e-6)) (read if HAS_CLIP)
    UPDATE: tl.constexpr,  # the algorithm's update (a @triton.jit function, see the module doc)
    K: tl.constexpr,  # table columns: len(COLUMNS) + 1
    STATE: tl.constexpr,  # the state columns used (COLUMN_1 | COLUMN_2 | COLUMN_3)
    SWITCHES: tl.constexpr,  # the algorithm's FLAGS, as bits
    P: tl.constexpr,  # per-tensor values in a row of ``prepared``
    DTYPE: tl.constexpr,  # storage dtype of params and grads
    SDTYPE: tl.constexpr,  # storage dtype of the state
    COMPUTE: tl.constexpr,  # float32, or float64 for fp64 params
    MODE: tl.constexpr,  # MODE_PLAIN, MODE_MASTER or MODE_KAHAN (fusedopt.kernels.common)
    SR: tl.constexpr,  # stochastic rounding of low-precision stores
    Q8: tl.constexpr,  # state columns may be 8-bit (per tensor: absmax_ptrs); SDTYPE is then fp32
    BLOCK: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    TAIL: tl.constexpr,  # some tensor ends in a partial block (else no masked path is compiled)
    TAIL_BLOCK: tl.constexpr,  # elements per sub-block of a last or misaligned block (QBLOCK's multiple)
    ALIGNED: tl.constexpr,  # every address is 16-byte aligned (else decided per tensor)
):
    t, start, numel = block_start(meta, owner, BLOCK)
    if step_taken(found_inf, HAS_FOUND_INF):
        # A full block of a tensor whose addresses are all 16-byte aligned: one piece, vector
        # accesses. Else (a tensor's last block, or a misaligned tensor's block) sub-blocks of
        # TAIL_BLOCK elements with scalar accesses, which need more registers per element.
        whole = whole_block(start, numel, BLOCK, TAIL)
        if ALIGNED:
            vector = whole
        else:
            vector = whole & _aligned(ptrs, grad_ptrs, t, K)
        if vector:
            _block(ptrs, grad_ptrs, scalars, prepared, steps, seeds, absmax_ptrs, codebook, grad_scale, clip_coef, t,
                   start + tl.arange(0, BLOCK).to(tl.int64), None, UPDATE, K, STATE, SWITCHES, P, DTYPE, SDTYPE,
                   COMPUTE, MODE, SR, Q8, BLOCK, MAXIMIZE, HAS_GRAD_SCALE, HAS_CLIP, True)  # fmt: skip
        else:
            for sub in range(start, tl.minimum(start + BLOCK, numel), TAIL_BLOCK):
                offs = sub + tl.arange(0, TAIL_BLOCK).to(tl.int64)
                _block(ptrs, grad_ptrs, scalars, prepared, steps, seeds, absmax_ptrs, codebook, grad_scale,
                       clip_coef, t, offs, offs < numel, UPDATE, K, STATE, SWITCHES, P, DTYPE, SDTYPE, COMPUTE, MODE,
                       SR, Q8, TAIL_BLOCK, MAXIMIZE, HAS_GRAD_SCALE, HAS_CLIP, False)  # fmt: skip


@triton.jit
def prepare_kernel(
    scalars,  # float64 [len(SCALARS)]: the group's hyper-parameters
    steps,  # float32 or float64 [T]: each tensor's step count before this step (advanced here)
    prepared,  # COMPUTE [T, P]: each tensor's PREPARED values of this step (written)
    found_inf,  # float32 [1]: non-zero: the step is skipped and does not count (read if HAS_FOUND_INF)
    carried,  # [T, C], the counters' dtype: each tensor's CARRIED values (read and written if C > 0)
    T,  # tensors
    PREPARE: tl.constexpr,  # the algorithm's prepare (a @triton.jit function, see the module doc)
    P: tl.constexpr,
    C: tl.constexpr,  # carried values per tensor
    COMPUTE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Advance each tensor's step count by one step taken (``step - found_inf + 1``, as torch's
    ``sub_`` and ``add_``: a skipped step does not count) and compute its per-tensor values."""
    i = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    inside = i < T
    step = tl.load(steps + i, mask=inside)
    taken = inside
    if HAS_FOUND_INF:
        skipped = tl.load(found_inf).to(step.dtype) + tl.zeros_like(step)
        step = step - skipped
        taken = inside & (skipped == 0)
    step = step + 1.0
    tl.store(steps + i, step, mask=inside)
    if C > 0:
        PREPARE(scalars, step.to(tl.float64), prepared + i * P, inside, COMPUTE, carried + i * C, taken)
    else:
        PREPARE(scalars, step.to(tl.float64), prepared + i * P, inside, COMPUTE)
