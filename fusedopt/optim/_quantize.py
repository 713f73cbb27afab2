"""Blockwise 8-bit optimizer state (``state_dtype="int8"``): the code maps and the quantizer in
torch, which is the plain-torch step's and the tests' version of the kernels' (``load_state`` /
``store_state`` / ``quantize`` in :mod:`fusedopt.kernels.common`), with the same semantics bit
for bit.

A state tensor of ``n`` elements is stored as

* ``state[key]``: ``uint8`` codes, of the param's shape and layout (``empty_like(param)``);
* ``state[key + "_absmax"]``: fp32 ``[ceil(n / 256)]``, the largest magnitude of each block of
  256 consecutive elements in memory order (a kernel block starts at a multiple of 256 within
  its tensor, so a block of 256 lies in one program).

Element ``x`` of block ``b`` is stored as the code whose value is nearest ``x / absmax[b]`` (the
number of decision boundaries strictly below it; a block of zeros keeps absmax 0) and read back
as ``value[code] * absmax[b]``, both rounded once in fp32. Signed state (momenta, averages of
the grad) uses the signed map, state that is never negative (averages of its square, Adagrad's
sum) the unsigned one: each kernel module names the latter in ``NONNEGATIVE``.

The maps are "dynamic" (decimal-exponent) maps, the kind bitsandbytes' and torchao's 8-bit
optimizers use: the magnitudes fill one decade ``(10**-(k+1), 10**-k]`` after another with
``2**(d - k)`` evenly spaced values, so the relative resolution is about the same at every
scale, and the largest code value is exactly 1 (the absmax of a block is stored exactly).

* signed: ``0``, ``±`` 127 magnitudes in 7 decades (1e-6 .. 1, 64 values in the top one),
  ascending; code 255 repeats +1 (never produced: ±1 are codes 0 and 254, zero is code 127).
* unsigned: 255 magnitudes in 8 decades (1e-7 .. 1, 128 values in the top one) and 1e-8, and
  no zero: a second moment rounded to 0 beside a non-zero first moment would make Adam's
  update ``m / eps`` (and centered RMSprop's ``v - grad_avg**2`` negative), which a block whose
  values span more than ~3.5 decades of the grad would hit (the "zero-point problem" of
  low-bit optimizer states, Li et al. 2023, "Memory Efficient Optimizers with 4-bit States").
  Values below the smallest code round up to it; an all-zero block (absmax 0) still reads 0.

Non-finite state (a diverged run without GradScaler) poisons its block: a NaN makes the
block's absmax NaN, so all its 256 values read back NaN; an infinity makes it +inf, the
infinity reads back with its sign (code +-1) and the block's finite values as NaN (0 * inf;
the unsigned map's smallest code: +inf). torch's fp32 state would keep the finite neighbours:
no blockwise 8-bit code can (docs/low-precision.md).

Rounding to the nearest code loses at most half the gap to a neighbour, times the block's
absmax: about 0.7 % (signed) or 0.35 % (unsigned) of the absmax near it, 7 % (3.5 %) of a
value near a tenth of it (the test bound is :func:`half_gaps`).
"""

from __future__ import annotations

import torch

from fusedopt._dist import is_dtensor, local
from fusedopt._multi_tensor import is_dense
from fusedopt.kernels import common as kernels

QBLOCK = kernels.QBLOCK.value  # elements per absmax
CODES = kernels.CODES.value
MIN_NUMEL = 4096  # smaller tensors keep fp32 state
SUFFIX = "_absmax"  # the absmax of state[key] is state[key + SUFFIX]
CHUNK = 1 << 22  # elements the torch quantizer takes at a time (a multiple of QBLOCK)


def absmax_key(key: str) -> str:
    return key + SUFFIX


def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256 code values (fp32, ascending) of the signed or the unsigned map."""
    decades = 7 if signed else 8
    magnitudes = []
    for i in range(decades):  # decade (top / 10, top] holds 2**i values
        top = 10.0 ** (i + 1 - decades)
        magnitudes += [top * (0.1 + 0.9 * j / 2**i) for j in range(1, 2**i + 1)]
    # signed: code 255 repeats +1, so that -1 and +1 both are codes; unsigned: no zero (above)
    values = [*(-m for m in magnitudes), 0.0, *magnitudes, 1.0] if signed else [1e-8, *magnitudes]
    assert len(values) == CODES
    return torch.tensor(sorted(values), dtype=torch.float64).to(torch.float32)


def _make_book(signed: bool) -> torch.Tensor:
    """float32 [2, CODES]: the code values, then the boundaries between neighbours (fp32
    midpoints) and +inf."""
    values = dynamic_map(signed)
    wide = values.double()
    bounds = ((wide[:-1] + wide[1:]) / 2).to(torch.float32)
    return torch.stack([values, torch.cat([bounds, torch.tensor([float("inf")])])])


# Built once at import, not behind functools.cache: torch.compile traces the quantizer (lazy
# 8-bit state) and warns about every lru_cache-wrapped call it meets.
_BOOKS = {signed: _make_book(signed) for signed in (False, True)}


def _book(signed: bool) -> torch.Tensor:
    return _BOOKS[bool(signed)]


def _bucket_starts(bounds: torch.Tensor) -> torch.Tensor:
    """uint8 [2 * BUCKETS]: for each magnitude bucket (``fusedopt.kernels.common``: the fp32
    bits of ``|a|`` shifted right by 16, from BUCKET_LOW, clamped to 0 .. BUCKETS - 1) of
    positive, then of negative values, the number of ``bounds`` (ascending, fp32) strictly below
    the bucket's smallest value; the kernels' code of ``a`` is that plus whether the next
    boundary is below ``a``, which needs every bucket's values to hold at most one boundary
    (checked here)."""
    buckets = kernels.BUCKETS.value
    key = (kernels.BUCKET_LOW.value + torch.arange(buckets + 1, dtype=torch.int64)) << 16
    edges = key.to(torch.int32).view(torch.float32).double()  # smallest magnitude of each bucket
    lowest = torch.cat([torch.zeros(1, dtype=torch.float64), edges[1:buckets]])  # bucket 0: from 0
    # largest magnitude: the float below the next bucket's (the last bucket: up to inf, and NaN)
    highest = (key[1:] - 1).to(torch.int32).view(torch.float32).double()
    highest[-1] = float("inf")
    wide = bounds.double()
    out = []
    for low, high in ((lowest, highest), (-highest, -lowest)):  # positive, then negative values
        start = torch.searchsorted(wide, low)  # boundaries strictly below the smallest value
        inside = torch.searchsorted(wide, high, right=True) - start  # boundaries in [low, high]
        assert int(inside.max()) <= 1, "a magnitude bucket holds two code boundaries"
        out.append(start)
    return torch.cat(out).to(torch.uint8)


def _kernel_book(signed: bool) -> torch.Tensor:
    """float32 [BOOK]: the code values, the boundaries (then +inf) and the bucket starts
    (uint8, packed four to a word), as the kernels read a column's book."""
    book = _book(signed)
    starts = _bucket_starts(book[1, :-1]).view(torch.float32)
    out = torch.cat([book[0], book[1], starts])
    assert out.numel() == kernels.BOOK.value
    return out


_KERNEL_BOOKS = {signed: _kernel_book(signed) for signed in (False, True)}


def codebook(signed: tuple[bool, ...]) -> torch.Tensor:
    """float32 [S, BOOK]: the book of each state column (its ``signed`` flag), as the kernels
    read it (``fusedopt.kernels.common``: values, boundaries, bucket starts)."""
    return torch.stack([_KERNEL_BOOKS[bool(s)] for s in signed])


def half_gaps(signed: bool) -> torch.Tensor:
    """float32 [CODES]: the largest distance from a code's value to a value rounded to it (in
    units of the block's absmax; the lowest code takes all from -1, or 0 if unsigned)."""
    values, bounds = _book(signed).double()
    below = torch.cat([values[:1].clamp(max=0.0), bounds[:-1]])
    above = torch.cat([bounds[:-1], values[-1:]])
    return torch.maximum(values - below, above - values).to(torch.float32)


def _memory(t: torch.Tensor) -> torch.Tensor:
    """``t``'s elements in memory order (``t`` dense: it covers its memory exactly once)."""
    return t.as_strided((t.numel(),), (1,))


def _chunks(n: int):
    """Element ranges of at most CHUNK elements, starting at multiples of QBLOCK: the torch
    quantizer's temporaries (int64 indices) stay small whatever the tensor's size."""
    for start in range(0, n, CHUNK):
        yield start, min(n, start + CHUNK)


def _like(local_tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``local_tensor`` as ``like``'s local shard if ``like`` is a DTensor (same mesh and
    placements), else itself."""
    if not is_dtensor(like):
        return local_tensor
    return type(like).from_local(
        local_tensor,
        like.device_mesh,
        like.placements,
        run_check=False,
        shape=like.shape,
        stride=like.stride(),
    )


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """fp32 values of 8-bit state, in the codes' layout (a DTensor's codes: a DTensor placed
    alike; its absmax are those of its local shard)."""
    if is_dtensor(codes):
        return _like(dequantize(local(codes), absmax, signed), codes)
    values = _book(signed)[0].to(codes.device)
    flat = _memory(codes)
    out = torch.empty_like(codes, dtype=torch.float32)
    for a, b in _chunks(flat.numel()):
        scale = absmax[a // QBLOCK : -(-b // QBLOCK)].repeat_interleave(QBLOCK)[: b - a]
        _memory(out)[a:b] = values[flat[a:b].long()] * scale
    return out


def quantize_(codes: torch.Tensor, absmax: torch.Tensor, x: torch.Tensor, signed: bool) -> None:
    """Store fp32 ``x`` (any layout, the codes' shape) in ``codes`` and ``absmax``, in place."""
    if x.stride() != codes.stride() or x.dtype != torch.float32:
        x = torch.empty_like(codes, dtype=torch.float32).copy_(x)
    flat, out = _memory(x), _memory(codes)
    bounds = _book(signed)[1, :-1].to(x.device)
    for a, b in _chunks(flat.numel()):
        blocks = -(-(b - a) // QBLOCK)
        chunk = torch.nn.functional.pad(flat[a:b], (0, blocks * QBLOCK - (b - a))).view(blocks, QBLOCK)
        amax = chunk.abs().amax(dim=1)  # NaN if the block holds one
        normalized = chunk / torch.where(amax > 0, amax, 1.0)[:, None]
        normalized = torch.where(chunk.isinf(), chunk.sign(), normalized)  # +-inf: code +-1
        out[a:b] = torch.searchsorted(bounds, normalized).view(-1)[: b - a]  # boundaries strictly below
        absmax[a // QBLOCK : a // QBLOCK + blocks] = amax


def quantize(x: torch.Tensor, like: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """New 8-bit state ``(codes, absmax)`` holding ``x``, on ``like``'s (the param's) device,
    the codes laid out as :func:`codes_stride` says. A DTensor param's codes are a DTensor placed
    as the param, over its local shard's codes; the absmax, of the local shard's blocks, stay a
    plain tensor (the portable state dict holds the dequantized state instead: see
    ``fusedopt.optim._precision.portable``)."""
    if is_dtensor(like):
        codes, absmax = quantize(local(x), local(like), signed)
        return _like(codes, like), absmax
    codes = torch.empty_strided(like.shape, codes_stride(like), dtype=torch.uint8, device=like.device)
    absmax = torch.empty(-(-like.numel() // QBLOCK), dtype=torch.float32, device=like.device)
    quantize_(codes, absmax, x.to(like.device), signed)
    return codes, absmax


def codes_stride(p: torch.Tensor) -> tuple[int, ...]:
    """The layout of the codes of ``p``'s state: ``p``'s own if dense, else contiguous. The
    kernels then walk the codes in their memory order, the order of the absmax blocks: with
    ``p`` (dense), or with its contiguous staged copy (see ``fusedopt.optim._plan.Bucket``)."""
    if is_dense(p):
        return p.stride()
    return torch.empty(p.shape, device="meta").stride()
