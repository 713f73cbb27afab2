"""Rows read and written with 128-bit accesses whatever their length and start.

Triton emits a 128-bit load or store (``ld.global.v4.b32``) only where it can prove that the
vector's address is 16-byte aligned and that its mask is the same for the whole vector. A row of
``C`` elements that starts off a 16-byte boundary (row ``r`` of an ``[N, C]`` tensor when ``C``
times the element size is not a multiple of 16: GPT-2's ``C = 50,257``), or a mask ``col < C``
with ``C`` not known to be a multiple of 16, turns every access of a row into a scalar one. Two
ways around it, for rows of unit column stride (``VEC`` = elements per 16 bytes):

* Split rows, for elementwise passes (a gradient): a row is cut at 16-byte boundaries
  (:func:`row_layout`): ``shift < VEC`` columns before its first boundary, then ``end`` columns
  of whole vectors (a multiple of ``VEC``), then fewer than ``VEC`` columns. The whole vectors
  are walked in blocks of positions (position ``q`` is column ``shift + q``), the blocks below
  :func:`interior_end` without a column mask, the last with a mask that is the same for every
  vector (:func:`load_block`, :func:`store_block`); the at most ``2 VEC - 2`` other columns are
  a small tile of their own (:func:`edge_columns`), scalar. Rows of another stride take
  ``ALIGNED=False``: ``shift = 0``, ``end = C``, scalar accesses.
* Rotated rows, for reductions over a row (below :func:`row_start`).

The kernels decide per tensor (a misaligned or strided tensor makes only its own accesses
scalar), and for the unit stride when compiling: Triton specializes a stride of 1.
"""

import triton
import triton.language as tl


@triton.jit
def row_layout(rows, ok, C, VEC: tl.constexpr):
    """Per row: ``(shift, end)``, the columns before the row's first 16-byte boundary (``< VEC``)
    and the columns of whole vectors after it (a multiple of VEC); ``(0, C)`` unless ``ok``."""
    ELEM: tl.constexpr = 16 // VEC
    shift = tl.where(ok, ((-rows.to(tl.int64) & 15) // ELEM).to(tl.int32), 0)
    return shift, tl.where(ok, tl.maximum(C - shift, 0) // VEC * VEC, C)


@triton.jit
def interior_end(C, ok, VEC: tl.constexpr, BLOCK: tl.constexpr):
    """Scalar, a multiple of BLOCK: the blocks of positions below it are below every row's
    ``end`` (whatever its shift); 0 unless ``ok``."""
    return tl.where(ok, tl.maximum(C - (VEC - 1), 0) // BLOCK * BLOCK, 0)


@triton.jit
def load_block(
    rows,  # [ROWS] pointers to column 0 of each row
    shift,  # [ROWS]: row_layout
    end,  # [ROWS]: row_layout
    start,  # first position of the block: a multiple of BLOCK (below interior_end if INTERIOR)
    stride,
    row_mask,  # [ROWS]; None: every row is in range (INTERIOR only)
    other,
    VEC: tl.constexpr,
    BLOCK: tl.constexpr,
    INTERIOR: tl.constexpr,  # the whole block is below interior_end: no column mask
    ALIGNED: tl.constexpr,  # unit stride, the rows' layout (shift, end): 128-bit; else scalar accesses
):
    """The elements ``[ROWS, BLOCK]`` at positions ``start .. start + BLOCK - 1`` of each row
    (columns ``shift + start ..``), ``other`` where :func:`block_mask` is false."""
    ptrs = _pointers(rows, shift, start, stride, BLOCK, ALIGNED)
    if INTERIOR and row_mask is None:
        return tl.load(ptrs)
    else:
        return tl.load(
            ptrs, mask=block_mask(end, start, row_mask, VEC, BLOCK, INTERIOR, ALIGNED), other=other
        )


@triton.jit
def block_mask(
    end,
    start,
    row_mask,
    VEC: tl.constexpr,
    BLOCK: tl.constexpr,
    INTERIOR: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """The positions of the block at ``start`` below ``end``, in the rows of ``row_mask``:
    ``[ROWS, 1]`` if INTERIOR (all of them), else ``[ROWS, BLOCK]``, the same for every vector if
    ALIGNED."""
    if INTERIOR:
        return row_mask[:, None]
    else:
        left = tl.minimum(tl.maximum(end - start, 0), BLOCK).to(tl.int32)
        if ALIGNED:  # end is a multiple of VEC, hence so is left
            left = tl.multiple_of(left, VEC)
        return row_mask[:, None] & (tl.arange(0, BLOCK)[None, :] < left[:, None])


@triton.jit
def _pointers(rows, shift, start, stride, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """``[ROWS, BLOCK]``: the pointers to positions ``start ..`` of each row (ALIGNED: unit
    stride, the first 16-byte aligned)."""
    j = tl.arange(0, BLOCK)[None, :]
    if ALIGNED:
        return (tl.multiple_of(rows + shift, 16) + start)[:, None] + j
    else:
        return (rows + (shift + start) * stride)[:, None] + j.to(tl.int64) * stride


@triton.jit
def store_block(
    rows,  # [ROWS] pointers to column 0 of each row
    shift,  # [ROWS]: row_layout
    end,  # [ROWS]: row_layout
    start,  # first position of the block
    stride,
    row_mask,  # [ROWS]; None: every row is in range (INTERIOR only)
    value,  # [ROWS, BLOCK]: the values of positions start .. start + BLOCK - 1
    VEC: tl.constexpr,
    BLOCK: tl.constexpr,
    INTERIOR: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Store ``value`` at positions ``start ..`` of each row, as :func:`load_block` reads them."""
    ptrs = _pointers(rows, shift, start, stride, BLOCK, ALIGNED)
    if INTERIOR and row_mask is None:
        tl.store(ptrs, value)
    else:
        tl.store(ptrs, value, mask=block_mask(end, start, row_mask, VEC, BLOCK, INTERIOR, ALIGNED))


@triton.jit
def edge_columns(shift, end, C, row_mask, VEC: tl.constexpr):
    """``(columns, mask)``, ``[ROWS, 2 VEC]``: the columns of each row outside its whole
    vectors, the ``shift`` before them and those after ``shift + end`` (none unless aligned)."""
    k = tl.arange(0, 2 * VEC)[None, :]
    head = k < VEC
    cols = tl.where(head, k, shift[:, None] + end[:, None] + (k - VEC))
    valid = tl.where(head, k < shift[:, None], True) & (cols < C) & row_mask[:, None]
    return cols, valid


# Reductions over a row: lanes rotated, sums exact ----------------------------------------------
#
# A pass that sums over a row keeps per-lane partial results (an online softmax) and reduces the
# lanes at the end; split as above, which columns a lane sees would depend on the row's address
# modulo 16, and so would the rounding of the result (the same logits in another buffer, e.g.
# another chunk of a linear cross-entropy, would give other bits). So such a pass reads each row
# from the 16-byte boundary at or before it instead: position ``q`` is column ``q - r``, with
# ``r`` (:func:`row_start`) the elements between that boundary and the row. Lane ``j`` then sees
# the columns of lane ``(j - r) mod BLOCK`` of an unshifted walk, in the same order, so the lanes'
# partial results are the same for every ``r``, only rotated; the lanes are then summed exactly
# (:func:`exact_sum`), in no order at all. A vector that holds a column of the row is read whole
# (the 16-byte chunk lies in the row's allocation: allocations are at least 16-byte aligned,
# PyTorch's 512 bytes on CUDA and 64 on CPU), and its elements outside the row are replaced in
# registers; only stores need exact masks.

HEAD, INTERIOR_BLOCK, TAIL = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def row_start(rows, ok, VEC: tl.constexpr):
    """Per row (int32): the elements between the 16-byte boundary at or before the row and its
    first column (``< VEC``); 0 unless ``ok``."""
    ELEM: tl.constexpr = 16 // VEC
    return tl.where(ok, ((rows.to(tl.int64) & 15) // ELEM).to(tl.int32), 0)


@triton.jit
def load_rotated(
    rows,  # [ROWS] pointers to column 0 of each row
    r,  # [ROWS] int32: row_start
    start,  # first position of the block (a multiple of BLOCK)
    C,
    stride,
    row_mask,  # [ROWS]; None: every row is in range (HEAD and INTERIOR_BLOCK only)
    other,
    VEC: tl.constexpr,
    BLOCK: tl.constexpr,
    PART: tl.constexpr,  # HEAD (block 0, C >= BLOCK), INTERIOR_BLOCK (1 <= block < C // BLOCK) or TAIL
    ALIGNED: tl.constexpr,  # rows read from their 16-byte boundary (unit stride); else r is 0
):
    """``(values, mask)`` ``[ROWS, BLOCK]`` at positions ``start .. start + BLOCK - 1`` of each
    row (columns ``start - r ..``): ``other`` outside the row, and the mask of the columns in
    it (``[ROWS, 1]`` for an interior block)."""
    j = tl.arange(0, BLOCK)[None, :]
    if ALIGNED:
        ptrs = (tl.multiple_of(rows - r, 16) + start)[:, None] + j  # unit stride
        if PART == INTERIOR_BLOCK:
            if row_mask is None:
                z = tl.load(ptrs)
                mask = j >= 0
            else:
                mask = row_mask[:, None]
                z = tl.load(ptrs, mask=mask, other=other)
        else:
            lo = r - start  # the columns: lanes lo .. lo + C - 1
            if PART == HEAD:
                mask = j >= lo[:, None]
                if row_mask is None:
                    z = tl.load(ptrs)
                else:
                    mask = mask & row_mask[:, None]
                    z = tl.load(ptrs, mask=row_mask[:, None], other=other)
            else:
                mask = ((j - lo[:, None]).to(tl.uint32) < C) & row_mask[:, None]  # lo <= j < lo + C
                whole = tl.multiple_of((C + lo + VEC - 1) // VEC * VEC, VEC)  # the vectors holding a column
                z = tl.load(ptrs, mask=row_mask[:, None] & (j < whole[:, None]), other=other)
            z = tl.where(mask, z, other)
    else:
        cols = start + j
        mask = row_mask[:, None] & (cols < C)
        z = tl.load(rows[:, None] + cols.to(tl.int64) * stride, mask=mask, other=other)
    return z, mask


@triton.jit
def rotated_counts(r, C, row_mask, BLOCK: tl.constexpr):
    """``[ROWS, BLOCK]`` int32: the columns each lane of :func:`load_rotated`'s blocks saw."""
    lane = (tl.arange(0, BLOCK)[None, :] - r[:, None] + BLOCK) % BLOCK  # the lane of an unshifted walk
    return tl.where(row_mask[:, None] & (lane < C), (C - lane + BLOCK - 1) // BLOCK, 0)


@triton.jit
def exact_sum(v, special, EXACT: tl.constexpr):
    """``[ROWS]``: the sum of fp32 ``v >= 0`` ``[ROWS, BLOCK]`` over its lanes, the same whatever
    the lanes' order (EXACT; else ``tl.sum``): the lanes as 64-bit integers in units of ``2^-k``,
    ``k`` from the largest (an error below ``2^-45`` of it per lane); ``special`` where a lane
    is NaN or +inf."""
    if EXACT:
        big = tl.max(tl.where(v < float("inf"), v, float("inf")), 1)  # inf if a lane is NaN or inf
        # 2^(e - 1) <= big < 2^e; every v 2^k < 2^46: a sum of up to 2^16 lanes fits in int64
        e = ((big.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126
        k = tl.minimum(tl.maximum(46 - e, -126), 126)
        up = ((k + 127) << 23).to(tl.float32, bitcast=True)[:, None]  # 2^k
        down = ((127 - k) << 23).to(tl.float32, bitcast=True)  # 2^-k
        total = tl.sum((tl.where(v < float("inf"), v, 0.0) * up).to(tl.int64), 1)
        return tl.where(big < float("inf"), total.to(tl.float32) * down, special)
    else:
        return tl.sum(v, 1)
