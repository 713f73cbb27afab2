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
def whole_block(start, numel, BLOCK: tl.constexpr, TAIL: tl.constexpr):
    """Whether the block at ``start`` lies inside its tensor of ``numel`` elements: always
    without TAIL (no tensor of the launch ends in a partial block: no masked path compiled)."""
    if TAIL:
        return start + BLOCK <= numel
    else:
        return True


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
def tanh(x, COMPUTE: tl.constexpr):
    """``tanh(x)`` in COMPUTE from ``exp`` (libdevice's ``tanh`` returns None under Triton's
    interpreter): ``(1 - e) / (1 + e)`` with ``e = exp(-2|x|)``, the sign of ``x``; 1 for
    ``|x| = inf``, NaN for NaN. Near 0 that form loses ``eps / 2|x|`` relative, so below
    ``|x| = 0.25`` (fp32) or ``2^-5`` (fp64) the odd Taylor series through ``x^9`` (its first
    omitted term under half an ulp there) takes over. Its coefficients are computed in COMPUTE
    (Triton types a float literal as fp32; constants, folded when compiling)."""
    one = tl.full([], 1, COMPUTE)
    a = tl.abs(x)
    e = tl.exp(-2 * a)
    t = div_ieee(1 - e, 1 + e, COMPUTE)
    t = tl.where(x < 0, -t, t)
    if COMPUTE == tl.float64:
        small = a < 0.03125
    else:
        small = a < 0.25
    xs = tl.where(small, x, 0)  # inf and NaN stay out of the series (no inf - inf)
    x2 = xs * xs
    series = div_ieee(one * 62, one * 2835, COMPUTE)
    series = series * x2 - div_ieee(one * 17, one * 315, COMPUTE)
    series = series * x2 + div_ieee(one * 2, one * 15, COMPUTE)
    series = series * x2 - div_ieee(one, one * 3, COMPUTE)
    return tl.where(small, xs + xs * x2 * series, t)


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


@triton.jit
def decay(p, g, lr, wd, DECOUPLED: tl.constexpr, COMPUTE: tl.constexpr):
    """Weight decay as torch applies it, returned as ``(p, g)``: decoupled ``p * (1 - lr * wd)``
    (a ``mul_``, rounded on its own) or L2 ``g + wd * p`` (``add(alpha=)``: an fma)."""
    if DECOUPLED:
        p = mul_ieee(p, (1.0 - lr * wd).to(COMPUTE))
    else:
        g = fma(p, wd.to(COMPUTE), g)
    return p, g


@triton.jit
def lerp(start, end, weight):
    """``torch.lerp(start, end, weight)`` for a scalar ``weight``, rounded as torch rounds it:
    ``start + weight * (end - start)`` below 0.5, ``end - (1 - weight) * (end - start)`` from
    0.5 (each an fma)."""
    return tl.where(weight < 0.5, fma(weight, end - start, start), fma(weight - 1.0, end - start, end))


@triton.jit
def maximum(a, b):
    """``torch.maximum(a, b)``: a NaN in either comes out NaN."""
    return tl.where((a != a) | (b != b), a + b, tl.maximum(a, b))


# Low-precision storage (fusedopt.optim._precision): how a kernel reads and writes the param and
# its state. MODE says where the param's value lives; SR rounds low-precision stores
# stochastically; state columns are stored in SDTYPE (which may differ from the param's DTYPE).
MODE_PLAIN = tl.constexpr(0)  # the param itself
MODE_MASTER = tl.constexpr(1)  # an fp32 copy in the table's last column; the param is its rounding
MODE_KAHAN = tl.constexpr(2)  # param + a compensation (the param's dtype) in the last column


# Rounds of Philox4x32 where a call serves several elements (:func:`random_bits`): 7, the fewest
# its authors found to pass TestU01's BigCrush (Salmon et al. 2011, "Parallel random numbers: as
# easy as 1, 2, 3"; Triton's default of 10 adds their safety margin). A round is four 32-bit
# multiplies (high and low halves) and two XORs per call: the bulk of a stochastically rounded
# step's extra instructions.
PHILOX_ROUNDS = tl.constexpr(7)


@triton.jit
def _halves(w):
    """``[n]`` uint32 words -> ``[n, 2]``: 16 random bits for each of two elements, the low half
    of ``w`` for the first (:func:`stochastic_round` of bf16 reads the low 16 bits), the high
    half for the second."""
    return tl.join(w, w >> 16)


@triton.jit
def random_bits(
    seeds,  # int64 [T]: each tensor's rounding seed (read if SR)
    t,
    offs,
    WORDS: tl.constexpr,
    DTYPE: tl.constexpr,
    SDTYPE: tl.constexpr,
    SR: tl.constexpr,
):
    """Four uint32 words per element, random for the first ``WORDS`` (1 to 4), one for each of
    up to ``WORDS`` stochastically rounded stores (zeros without SR; words past ``WORDS`` are
    not for use): Philox keyed by the tensor's seed, its counter an element offset, so the bits
    depend on the seed and the element only.

    A bf16 store reads 16 bits (:func:`stochastic_round`), so one Philox call (four words)
    serves several elements: four when ``WORDS`` is at most 2 (element ``4i + 2h + a`` takes
    half ``h`` of word ``2s + a`` for its store ``s``), else two (element ``2i + h``: half ``h``
    of word ``s``); the call's counter is the offset of its first element. An fp16 store reads
    24 bits of a word: where DTYPE or SDTYPE is fp16 a call serves two elements when ``WORDS``
    is at most 2 (element ``2i + h``: word ``2s + h``), else each element has its own call (as
    before: Triton's 10 rounds, word ``s`` for store ``s``; a fourth store's word unused)."""
    tl.static_assert(WORDS >= 1 and WORDS <= 4)
    n: tl.constexpr = offs.shape[0]
    if SR:
        seed = tl.load(seeds + t)
        if DTYPE == tl.float16 or SDTYPE == tl.float16:
            if WORDS <= 2:
                first, _ = tl.split(tl.reshape(offs, (n // 2, 2)))  # [n / 2]: offs[2i]
                w0, w1, w2, w3 = tl.randint4x(seed, first, PHILOX_ROUNDS)
                r0 = tl.reshape(tl.join(w0, w1), (n,))
                r1 = tl.reshape(tl.join(w2, w3), (n,))
                r2, r3 = r0, r1  # (unused)
            else:
                r0, r1, r2, r3 = tl.randint4x(seed, offs)
        elif WORDS <= 2:
            first, _ = tl.split(tl.reshape(offs, (n // 4, 2, 2)))
            first, _ = tl.split(first)  # [n / 4]: offs[4i]
            w0, w1, w2, w3 = tl.randint4x(seed, first, PHILOX_ROUNDS)
            r0 = tl.reshape(tl.join(_halves(w0), _halves(w1)), (n,))
            r1 = tl.reshape(tl.join(_halves(w2), _halves(w3)), (n,))
            r2, r3 = r0, r1  # (unused)
        else:
            first, _ = tl.split(tl.reshape(offs, (n // 2, 2)))  # [n / 2]: offs[2i]
            w0, w1, w2, w3 = tl.randint4x(seed, first, PHILOX_ROUNDS)
            r0 = tl.reshape(_halves(w0), (n,))
            r1 = tl.reshape(_halves(w1), (n,))
            r2 = tl.reshape(_halves(w2), (n,))
            r3 = tl.reshape(_halves(w3), (n,))
    else:
        r0 = tl.zeros(offs.shape, tl.uint32)
        r1, r2, r3 = r0, r0, r0
    return r0, r1, r2, r3


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
#
# ``codebook`` (float32 [K - 2, BOOK]) holds, for each state column, its code map's
# ``value`` (CODES fp32, ascending), ``bound`` (the CODES - 1 decision boundaries between
# neighbours, then +inf) and ``start`` (2 * BUCKETS uint8, packed four to a float32 word): the
# code of a value ``a`` is the number of boundaries strictly below it, which the kernel finds
# without a search. The magnitude of ``a`` falls in one of BUCKETS buckets, by its fp32 bits
# (exponent and 7 mantissa bits: ``(bits >> 16) - BUCKET_LOW``, clamped to 0 .. BUCKETS - 1);
# ``start[bucket + BUCKETS * (a < 0)]`` is the number of boundaries below the bucket's values,
# and a bucket's values hold at most one boundary (checked where the book is built), so the
# code is ``start + (bound[start] < a)``. A program loads the tables of its columns once and
# reads them with ``tl.gather`` (shared memory).
QBLOCK_SHIFT = tl.constexpr(8)
QBLOCK = tl.constexpr(1 << 8)  # elements per absmax
CODES = tl.constexpr(256)  # entries of a code map (uint8 codes)
BUCKETS = tl.constexpr(4096)  # magnitude buckets, for each sign
BUCKET_LOW = tl.constexpr(0x3480)  # bits >> 16 of 2**-22: smaller magnitudes share bucket 0
BOOK = tl.constexpr(2 * 256 + 2 * 4096 // 4)  # float32 words of a column's book


@triton.jit
def _absmax_address(absmax_ptrs, t, c, K: tl.constexpr):
    """The address of state column ``c``'s absmax for tensor ``t`` (int64; 0: fp32 state)."""
    return tl.load(absmax_ptrs + t * (K - 2) + (c - 1))


@triton.jit
def _keep(a, b):
    """Reduction combine keeping its first operand: the value of a row whose elements all hold
    it, without moving data between threads."""
    return a


@triton.jit
def _max_keep(top, row, other_top, other_row):
    """Reduction combine: the larger magnitude bits, the (common) row index kept."""
    return tl.maximum(top, other_top), row


@triton.jit
def _absmax_rows(offs):
    """``[BLOCK / QBLOCK]``: the absmax index of each absmax block of a full block (a row of
    ``offs`` viewed as ``[BLOCK / QBLOCK, QBLOCK]``)."""
    rows = tl.reshape(offs >> QBLOCK_SHIFT, (offs.shape[0] // QBLOCK, QBLOCK))
    if _INTERPRETED:  # the same values (a row's are all equal): the interpreter runs a custom combine
        return tl.min(rows, 1)  # element by element in Python, ~40x slower than a built-in reduction
    else:
        return tl.reduce(rows, 1, _keep)


@triton.jit
def load_state(ptrs, absmax_ptrs, codebook, t, c: tl.constexpr, offs, mask, K: tl.constexpr, SDTYPE: tl.constexpr,
               COMPUTE: tl.constexpr, ALIGNED: tl.constexpr, Q8: tl.constexpr):  # fmt: skip
    """State column ``c`` of tensor ``t`` in COMPUTE: stored in SDTYPE; with Q8 stored in fp32
    or as 8-bit codes, read as ``value[code] * absmax[offs // QBLOCK]``."""
    if Q8:
        scales = _absmax_address(absmax_ptrs, t, c, K)
        if scales != 0:
            codes = tl.load(address(ptrs, t, c, K, tl.uint8, ALIGNED) + offs, mask=mask)
            values = tl.load(codebook + (c - 1) * BOOK + tl.arange(0, CODES))  # once per program
            value = tl.gather(values, codes.to(tl.int32), 0)
            if mask is None:  # one load per row and thread, not per element
                absmax = tl.load(scales.to(tl.pointer_type(tl.float32)) + _absmax_rows(offs))
                value = tl.reshape(value, (offs.shape[0] // QBLOCK, QBLOCK))
                x = tl.reshape(mul_ieee(value, absmax[:, None]), offs.shape)  # rounded on its own, as torch's
            else:
                absmax = tl.load(scales.to(tl.pointer_type(tl.float32)) + (offs >> QBLOCK_SHIFT), mask=mask)
                x = mul_ieee(value, absmax)
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
                     codebook + (c - 1) * BOOK, offs, mask, x, BLOCK)  # fmt: skip
        else:
            tl.store(address(ptrs, t, c, K, tl.float32, ALIGNED) + offs, x, mask=mask)
    else:
        store_rounded(address(ptrs, t, c, K, SDTYPE, ALIGNED) + offs, x, mask, r, SDTYPE, SR)


@triton.jit
def quantize(
    code_ptr,  # uint8 [BLOCK]: where the codes go (offs applied)
    absmax_ptr,  # float32 [ceil(numel / QBLOCK)]: the tensor's absmax
    book,  # float32 [BOOK]: the column's code map (value, bound, start)
    offs,
    mask,  # None for a full block
    x,  # float32 [BLOCK]
    BLOCK: tl.constexpr,
):
    """Blockwise 8-bit quantization of fp32 ``x`` (the semantics of
    ``fusedopt.optim._quantize.quantize_``): per QBLOCK elements, ``absmax = max |x|``, then
    each element's code is the number of decision boundaries strictly below ``x / absmax``
    (the nearest code value; a block of zeros divides by 1). Non-finite ``x`` as torch's
    ``amax``/``searchsorted``: a NaN makes its block's absmax NaN (and the divisor 1; its own
    code is the last), +-inf is code +-1 of an absmax of inf.

    ``x / absmax`` is torch's correctly rounded quotient, from the block's reciprocal: with
    ``y = 1 / d`` rounded to nearest and ``q = x * y`` (within an ulp or two of ``x / d``),
    ``e = fma(-q, d, x)`` is exact and ``fma(e, y, q)`` is ``x / d`` rounded to nearest
    (Markstein's theorem). It needs ``d`` and the quotient's remainder in the normal range:
    a block scales ``x`` and ``d`` by a power of two where ``d`` is tiny or huge (exact, but
    for quotients far below every boundary, whose code does not change)."""
    tl.static_assert(BLOCK // QBLOCK * QBLOCK == BLOCK)  # blocks hold whole absmax blocks
    if mask is not None:
        x = tl.where(mask, x, 0.0)
    blocks = tl.reshape(x, (BLOCK // QBLOCK, QBLOCK))
    # max |x| on the bits (a NaN's bits exceed +inf's: a GPU's float max would drop the NaN),
    # with each row's absmax index (see _absmax_rows); in a masked block the top bit of the
    # magnitudes says which rows hold an element of the tensor
    magnitudes = blocks.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
    if mask is not None:
        magnitudes = magnitudes | tl.where(tl.reshape(mask, blocks.shape), 0x80000000, 0).to(tl.uint32)
    rows = tl.reshape(offs >> QBLOCK_SHIFT, blocks.shape)
    if _INTERPRETED:  # the same results through built-in reductions (see _absmax_rows)
        top = tl.max(magnitudes, 1)
        row = tl.min(rows, 1)
    else:
        top, row = tl.reduce((magnitudes, rows), 1, _max_keep)
    inside = top >= 0x80000000
    top = top & 0x7FFFFFFF
    absmax = tl.where(top > 0x7F800000, float("nan"), top.to(tl.float32, bitcast=True))
    d = tl.where(absmax > 0, absmax, 1.0)  # the divisor (NaN and 0: 1, as torch's)
    huge = d == float("inf")  # x / inf: +-0 for finite x (+-inf: set below)
    scale = tl.where(huge, 0.0, tl.where(d < 2.0**-40, 2.0**100, tl.where(d >= 2.0**100, 2.0**-64, 1.0)))
    d = tl.where(huge, 1.0, d * scale)
    y = div_ieee(1.0, d, tl.float32)
    xs = blocks * scale[:, None]
    q = xs * y[:, None]
    q = fma(fma(-q, d[:, None], xs), y[:, None], q)
    q = tl.where(tl.abs(blocks) == float("inf"), tl.where(blocks > 0, 1.0, -1.0), q)
    q = tl.reshape(q, (BLOCK,))
    magnitude = (q.to(tl.uint32, bitcast=True) & 0x7FFFFFFF) >> 16
    bucket = tl.minimum(tl.maximum(magnitude, BUCKET_LOW) - BUCKET_LOW, BUCKETS - 1)
    bucket = bucket + tl.where(q < 0, BUCKETS, 0)  # NaN: the last positive bucket
    starts = tl.load((book + 2 * CODES).to(tl.pointer_type(tl.uint8)) + tl.arange(0, 2 * BUCKETS))
    start = tl.gather(starts, bucket.to(tl.int32), 0).to(tl.int32)
    bounds = tl.load(book + CODES + tl.arange(0, CODES))
    code = start + (tl.gather(bounds, start, 0) < q).to(tl.int32)
    tl.store(code_ptr, code.to(tl.uint8), mask=mask)
    if mask is None:
        tl.store(absmax_ptr + row, absmax)
    else:
        tl.store(absmax_ptr + row, absmax, mask=inside)
