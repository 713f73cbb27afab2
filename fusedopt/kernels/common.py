"""Triton helpers shared by every multi-tensor kernel.

A multi-tensor launch walks many tensors of one dtype with a single grid. The launcher
(`fusedopt._multi_tensor.TensorTable`) splits every tensor into blocks of ``BLOCK``
elements and hands the kernel two small tables:

* ``meta``  int64 [T, 2]: element count and first block of each tensor;
* ``owner`` int32 [B]:    the tensor each block belongs to.

Program ``pid`` handles block ``pid``: it looks up its tensor and its element offsets, then
loads that tensor's addresses from the kernel's own pointer table. Full blocks run without a
mask, so loads and stores are vectorized when the launcher vouches that every address is
16-byte aligned (``ALIGNED``); only the last block of each tensor is masked. A block starts at
a multiple of ``BLOCK`` within its tensor (``BLOCK`` a multiple of ``QBLOCK``).
"""

import os

import triton
import triton.language as tl

# Triton's interpreter before 3.9 evaluates tl.fma as x * y + z rounded twice (product, then
# sum); 3.9 rounds once, as a GPU does. Read when the kernels are defined, as triton.jit does.
_FMA_ROUNDS_TWICE = tl.constexpr(
    os.environ.get("TRITON_INTERPRET") == "1"
    and tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 9)
)


# The interpreter converts fp32 -> bf16 by truncation, a GPU by rounding to nearest even.
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


def named(names: tuple[str, ...]) -> tuple[tl.constexpr, ...]:
    """Constexpr indices ``0 .. len(names) - 1`` for a kernel's table columns or scalar slots:
    ``PARAM, EXP_AVG = named(COLUMNS)``. The names are the algorithm's spec (the launcher builds
    its tables from the same tuple), so an index never means something else on the other side."""
    return tuple(tl.constexpr(i) for i in range(len(names)))


@triton.jit
def block_start(
    meta,  # int64 [T, 2]: numel, first block of each tensor
    owner,  # int32 [B]: tensor index of each block
    BLOCK: tl.constexpr,
):
    """Return ``(t, start, numel)``: this program's tensor, the offset of its block's first
    element (int64) and the tensor's element count."""
    pid = tl.program_id(0)
    t = tl.load(owner + pid).to(tl.int64)
    return t, (pid - tl.load(meta + 2 * t + 1)) * BLOCK, tl.load(meta + 2 * t)


@triton.jit
def locate_block(
    meta,  # int64 [T, 2]: numel, first block of each tensor
    owner,  # int32 [B]: tensor index of each block
    BLOCK: tl.constexpr,
):
    """Return ``(t, offs, mask, full)``: this program's tensor, int64 element offsets, their
    mask, and whether the whole block is in bounds."""
    t, start, numel = block_start(meta, owner, BLOCK)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    return t, offs, offs < numel, start + BLOCK <= numel


@triton.jit
def address(
    table,  # int64 [T, K]: data pointers
    t,
    k,
    K: tl.constexpr,
    DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Pointer to the first element of operand ``k`` of tensor ``t``."""
    ptr = tl.load(table + t * K + k).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def to_storage(x, DTYPE: tl.constexpr):
    """Round fp32/fp64 ``x`` to the storage dtype, to nearest even.

    Compiled, the hardware convert does it (one instruction); the Triton interpreter truncates
    fp32 -> bf16, so there bf16 is rounded with integer arithmetic, which gives the GPU's answer
    (NaN stays NaN; its payload may differ from the GPU's canonical NaN).
    """
    if DTYPE == tl.bfloat16:
        if _INTERPRETED:
            bits = x.to(tl.uint32, bitcast=True)
            rounded = bits + 0x7FFF + ((bits >> 16) & 1)
            rounded = tl.where(x != x, bits | 0x400000, rounded)  # NaN stays a (quiet) NaN
            return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(tl.bfloat16, fp_downcast_rounding="rtne")
    else:
        return x.to(DTYPE)


@triton.jit
def sqrt_ieee(x, COMPUTE: tl.constexpr):
    """Correctly rounded square root, as torch's (Triton's ``tl.sqrt`` is approximate on GPU)."""
    if COMPUTE == tl.float32:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)  # fp64 sqrt is correctly rounded


@triton.jit
def div_ieee(x, y, COMPUTE: tl.constexpr):
    """Correctly rounded division, as torch's (Triton's fp32 ``/`` is approximate on GPU)."""
    if COMPUTE == tl.float32:
        return tl.div_rn(x, y)
    else:
        return x / y  # fp64 division is correctly rounded


@triton.jit
def mul_ieee(x, y):
    """``x * y`` rounded on its own, as a separate torch ``mul_`` does: never contracted into
    an fma with the addition that follows it (Triton's fp fusion would do that on the GPU).
    ``fma(x, y, +0.0)`` rounds the product once; with a +0.0 addend it cannot be turned back
    into a plain multiply (that needs no-signed-zeros), so nothing fuses it. (A product of
    -0.0 comes out +0.0.)"""
    return tl.fma(x, y, 0.0)


@triton.jit
def load_grad(
    g_ptr,
    mask,
    grad_scale,  # float32 [1]: AMP scale the grads carry (read if HAS_GRAD_SCALE)
    clip_coef,  # float32 [1]: global-norm clip coefficient (read if HAS_CLIP)
    COMPUTE: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_CLIP: tl.constexpr,
):
    """The gradient a step uses: unscaled (``g / grad_scale``, as torch's fused steps), then
    clipped (``g * clip_coef``, as ``clip_grad_norm_`` would have rewritten it), then negated
    for ``maximize``; in ``COMPUTE`` precision."""
    g = tl.load(g_ptr, mask=mask).to(COMPUTE)
    if HAS_GRAD_SCALE:
        g = g / tl.load(grad_scale).to(COMPUTE)
    if HAS_CLIP:
        g = g * tl.load(clip_coef).to(COMPUTE)
    if MAXIMIZE:
        g = -g
    return g


@triton.jit
def step_taken(
    found_inf,  # float32 [1]: GradScaler's verdict (read if HAS_FOUND_INF)
    HAS_FOUND_INF: tl.constexpr,
):
    """False when GradScaler found an inf or NaN: the step then reads and writes nothing."""
    if HAS_FOUND_INF:
        return tl.load(found_inf) == 0
    else:
        return True


@triton.jit
def fma(x, y, z):
    """``x * y + z`` rounded once (``tl.fma``), as torch's ``add(..., alpha=)`` / ``addcmul``.

    Under an interpreter whose ``tl.fma`` rounds twice (Triton < 3.9), an fp32 fma is computed
    in fp64: the product of two fp32 values is exact there, so only the fp64 sum is rounded
    before the final rounding to fp32 (different from one rounding only in the rare case where
    the fp64 sum lands exactly half-way between two fp32 values). Other dtypes keep ``tl.fma``.
    """
    if _FMA_ROUNDS_TWICE:
        if z.dtype == tl.float32:
            return (x.to(tl.float64) * y.to(tl.float64) + z.to(tl.float64)).to(tl.float32)
        else:
            return tl.fma(x, y, z)
    else:
        return tl.fma(x, y, z)


# Low-precision storage (fusedopt.optim._precision): how a kernel reads and writes the param and
# its state. MODE says where the param's value lives; SR rounds low-precision stores
# stochastically; state columns are stored in SDTYPE (which may differ from the param's DTYPE).
MODE_PLAIN = tl.constexpr(0)  # the param itself
MODE_MASTER = tl.constexpr(1)  # an fp32 copy in the table's last column; the param is its rounding
MODE_KAHAN = tl.constexpr(2)  # param + a compensation (the param's dtype) in the last column


@triton.jit
def random_bits(
    seeds,  # int64 [T]: each tensor's rounding seed (read if SR)
    t,
    offs,
    SR: tl.constexpr,
):
    """Four independent uint32 random words per element (Philox, keyed by the tensor's seed and
    the element's index), for up to four stochastically rounded stores; zeros without SR."""
    if SR:
        return tl.randint4x(tl.load(seeds + t), offs)
    else:
        zero = tl.zeros(offs.shape, tl.uint32)
        return zero, zero, zero, zero


@triton.jit
def stochastic_round(x, r, DTYPE: tl.constexpr):
    """Round fp32 ``x`` to bf16 or fp16 up or down, with probabilities that make the result's
    expectation ``x`` (``r``: uniform uint32 random bits); other dtypes round to nearest."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = bits + (r & 0xFFFF)  # carries into the kept bits with probability low / 2**16
        rounded = tl.where(x != x, bits | 0x400000, rounded)
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif DTYPE == tl.float16:
        near = x.to(tl.float16)
        nf = near.to(tl.float32)
        bits = near.to(tl.uint16, bitcast=True)
        # The fp16 neighbour on x's other side: one step smaller in magnitude if near overshot.
        other_bits = tl.where(tl.abs(nf) > tl.abs(x), bits - 1, bits + 1)
        other = other_bits.to(tl.float16, bitcast=True).to(tl.float32)
        p_other = (x - nf) / (other - nf)  # in [0, 1/2]; NaN only where x is NaN or overflows
        u = (r >> 8).to(tl.float32) * (1.0 / 16777216.0)
        take = (u < p_other) & (nf != x) & (tl.abs(nf) != float("inf"))
        return tl.where(take, other_bits, bits).to(tl.float16, bitcast=True)
    else:
        return to_storage(x, DTYPE)


@triton.jit
def store_rounded(ptr, x, mask, r, DTYPE: tl.constexpr, SR: tl.constexpr):
    """Store ``x`` in ``DTYPE``: stochastically rounded with SR, else to nearest even."""
    if SR:
        tl.store(ptr, stochastic_round(x, r, DTYPE), mask=mask)
    else:
        tl.store(ptr, to_storage(x, DTYPE), mask=mask)


@triton.jit
def load_param(ptrs, t, offs, mask, K: tl.constexpr, DTYPE: tl.constexpr, COMPUTE: tl.constexpr,
               ALIGNED: tl.constexpr, MODE: tl.constexpr):  # fmt: skip
    """The param's value for the update, in COMPUTE: the param, its fp32 master (MODE_MASTER:
    the param itself is not read) or the param plus its compensation (MODE_KAHAN)."""
    if MODE == MODE_MASTER:
        return tl.load(address(ptrs, t, K - 1, K, tl.float32, ALIGNED) + offs, mask=mask).to(COMPUTE)
    else:
        p = tl.load(address(ptrs, t, 0, K, DTYPE, ALIGNED) + offs, mask=mask).to(COMPUTE)
        if MODE == MODE_KAHAN:
            p = p + tl.load(address(ptrs, t, K - 1, K, DTYPE, ALIGNED) + offs, mask=mask).to(COMPUTE)
        return p


@triton.jit
def store_param(ptrs, t, offs, mask, p, r, K: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
                MODE: tl.constexpr, SR: tl.constexpr):  # fmt: skip
    """Write the updated value ``p``: the master in fp32 and the param its rounding
    (MODE_MASTER); the param rounded and the rounding error as the new compensation
    (MODE_KAHAN); else the param, rounded stochastically with SR."""
    p_ptr = address(ptrs, t, 0, K, DTYPE, ALIGNED) + offs
    if MODE == MODE_MASTER:
        tl.store(address(ptrs, t, K - 1, K, tl.float32, ALIGNED) + offs, p.to(tl.float32), mask=mask)
        tl.store(p_ptr, to_storage(p, DTYPE), mask=mask)
    elif MODE == MODE_KAHAN:
        high = to_storage(p, DTYPE)
        tl.store(p_ptr, high, mask=mask)
        stored = high.to(p.dtype)
        low = tl.where(stored == p, 0.0, p - stored)  # an inf param keeps no (NaN) compensation
        tl.store(address(ptrs, t, K - 1, K, DTYPE, ALIGNED) + offs, to_storage(low, DTYPE), mask=mask)
    else:
        store_rounded(p_ptr, p, mask, r, DTYPE, SR)


# Blockwise 8-bit state (state_dtype="int8"; the torch side and the code maps are in
# fusedopt.optim._quantize). With Q8 each state column of each tensor is either fp32 or uint8
# codes with one fp32 absmax per QBLOCK elements, as the tensor's row of ``absmax_ptrs`` says
# (int64 [T, K - 2]: the address of each state column's absmax, 0 for fp32): a runtime branch,
# uniform over a program since a block belongs to one tensor. A block starts at a multiple of
# BLOCK, itself a multiple of QBLOCK, so every absmax block lies in one program: no extra pass.
# ``codebook`` (float32 [K - 2, 2, CODES]) holds, for each state column, its code values
# (ascending) and the decision boundaries between neighbours (CODES - 1 of them, then +inf).
QBLOCK = tl.constexpr(256)  # elements per absmax
CODES = tl.constexpr(256)  # entries of a code map (uint8 codes)


@triton.jit
def _absmax_address(absmax_ptrs, t, c, K: tl.constexpr):
    """The address of state column ``c``'s absmax for tensor ``t`` (int64; 0: fp32 state)."""
    return tl.load(absmax_ptrs + t * (K - 2) + (c - 1))


@triton.jit
def load_state(ptrs, absmax_ptrs, codebook, t, c: tl.constexpr, offs, mask, K: tl.constexpr, SDTYPE: tl.constexpr,
               COMPUTE: tl.constexpr, ALIGNED: tl.constexpr, Q8: tl.constexpr):  # fmt: skip
    """State column ``c`` of tensor ``t`` in COMPUTE: stored in SDTYPE; with Q8 stored in fp32
    or as 8-bit codes, read as ``value[code] * absmax[offs // QBLOCK]``."""
    if Q8:
        scales = _absmax_address(absmax_ptrs, t, c, K)
        if scales != 0:
            codes = tl.load(address(ptrs, t, c, K, tl.uint8, ALIGNED) + offs, mask=mask)
            value = tl.load(codebook + (c - 1) * 2 * CODES + codes.to(tl.int32))
            absmax = tl.load(scales.to(tl.pointer_type(tl.float32)) + offs // QBLOCK, mask=mask)
            x = mul_ieee(value, absmax)  # rounded on its own, as torch's dequantization
        else:
            x = tl.load(address(ptrs, t, c, K, tl.float32, ALIGNED) + offs, mask=mask)
    else:
        x = tl.load(address(ptrs, t, c, K, SDTYPE, ALIGNED) + offs, mask=mask).to(COMPUTE)
    return x


@triton.jit
def store_state(ptrs, absmax_ptrs, codebook, t, c: tl.constexpr, offs, mask, x, r, K: tl.constexpr,
                SDTYPE: tl.constexpr, ALIGNED: tl.constexpr, SR: tl.constexpr, Q8: tl.constexpr,
                BLOCK: tl.constexpr):  # fmt: skip
    """Store ``x`` as state column ``c`` of tensor ``t``: in SDTYPE (rounded stochastically with
    SR); with Q8 in fp32, or quantized (:func:`quantize`; 8-bit codes never round
    stochastically)."""
    if Q8:
        scales = _absmax_address(absmax_ptrs, t, c, K)
        if scales != 0:
            quantize(address(ptrs, t, c, K, tl.uint8, ALIGNED) + offs, scales.to(tl.pointer_type(tl.float32)),
                     codebook + (c - 1) * 2 * CODES, offs, mask, x, BLOCK)  # fmt: skip
        else:
            tl.store(address(ptrs, t, c, K, tl.float32, ALIGNED) + offs, x, mask=mask)
    else:
        store_rounded(address(ptrs, t, c, K, SDTYPE, ALIGNED) + offs, x, mask, r, SDTYPE, SR)


@triton.jit
def quantize(
    code_ptr,  # uint8 [BLOCK]: where the codes go (offs applied)
    absmax_ptr,  # float32 [ceil(numel / QBLOCK)]: the tensor's absmax
    book,  # float32 [2, CODES]: code values, then decision boundaries
    offs,
    mask,  # None for a full block
    x,  # float32 [BLOCK]
    BLOCK: tl.constexpr,
):
    """Blockwise 8-bit quantization of fp32 ``x`` (the semantics of
    ``fusedopt.optim._quantize.quantize_``): per QBLOCK elements, ``absmax = max |x|``, then
    each element's code is the number of decision boundaries strictly below ``x / absmax``
    (the nearest code value; a block of zeros divides by 1), found by binary search. Non-finite
    ``x`` as torch's ``amax``/``searchsorted``: a NaN makes its block's absmax NaN (its code is
    the last), +-inf is code +-1 of an absmax of inf."""
    tl.static_assert(BLOCK // QBLOCK * QBLOCK == BLOCK)  # blocks hold whole absmax blocks
    if mask is not None:
        x = tl.where(mask, x, 0.0)
    blocks = tl.reshape(x, (BLOCK // QBLOCK, QBLOCK))
    magnitudes = tl.abs(blocks)
    absmax = tl.max(magnitudes, axis=1)  # a GPU's max drops NaN: put back below
    nan = tl.max((blocks != blocks).to(tl.int32), axis=1) > 0
    absmax = tl.where(nan, float("nan"), absmax)
    normalized = div_ieee(blocks, tl.where(absmax > 0, absmax, 1.0)[:, None], tl.float32)
    normalized = tl.where(magnitudes == float("inf"), tl.where(blocks > 0, 1.0, -1.0), normalized)
    code = tl.zeros((BLOCK // QBLOCK, QBLOCK), tl.int32)
    for i in tl.static_range(8):  # CODES == 2**8
        probe = code + (128 >> i)  # not (bound >= x): a NaN goes past every bound
        code = tl.where(tl.load(book + CODES + probe - 1) >= normalized, code, probe)
    tl.store(code_ptr, tl.reshape(code, (BLOCK,)).to(tl.uint8), mask=mask)
    block = tl.min(tl.reshape(offs // QBLOCK, (BLOCK // QBLOCK, QBLOCK)), axis=1)  # absmax index
    if mask is not None:
        inside = tl.max(tl.reshape(mask.to(tl.int32), (BLOCK // QBLOCK, QBLOCK)), axis=1) > 0
        tl.store(absmax_ptr + block, absmax, mask=inside)
    else:
        tl.store(absmax_ptr + block, absmax)
