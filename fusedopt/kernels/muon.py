"""FusedMuon's elementwise passes: the momentum before Newton–Schulz, the update after it.

A Muon step of a group (``fusedopt.optim.muon``) is

1. :func:`muon_momentum_kernel`, one launch over every matrix: the gradient as GradScaler's
   ``unscale_`` and ``clip_grad_norm_`` would have rewritten it (each product rounded to the
   grad's dtype, as those in-place ops store it), ``buf.lerp_(g, 1 - momentum)``, the update
   (Nesterov: ``g.lerp(buf, momentum)``, else ``buf``) rounded to the param's dtype and then to
   bf16 into the group's workspace, and per block the sum of squares of those bf16 values;
2. :func:`muon_norms_kernel`: each matrix's Frobenius norm from its blocks' partial sums (fixed
   order: deterministic), rounded to bf16 and clamped at ``eps``, as torch's
   ``X.norm().clamp(min=eps)`` of the bf16 matrix;
3. Newton–Schulz with torch's batched matmuls, one chain per matrix shape, on the workspace;
4. :func:`muon_update_kernel`, one launch: ``p.mul_(1 - lr * weight_decay)`` then
   ``p.add_(O, alpha=-adjusted_lr)``, each rounded to the param's dtype as torch's two ops.
   torch's CPU ``add_`` differs from its CUDA one, and the kernel can follow either
   (``TORCH_CPU``, for the interpreter): on CPU a bf16/fp16 ``alpha`` is rounded to the dtype,
   and where O is a transposed view (a tall matrix's) its scalar loop rounds ``alpha * O``
   before adding it; on CUDA both stay fp32, one fma.

``lerp`` is torch's: ``start + w * (end - start)`` for ``|w| < 0.5``, else ``end + (w - 1) *
(end - start)``, each one fma (torch's vectorized CPU kernel; nvcc contracts its CUDA one).
Nothing is written when GradScaler found an inf (``found_inf``).
"""

import triton
import triton.language as tl

from fusedopt.kernels.common import (
    address,
    block_start,
    fma,
    mul_ieee,
    sqrt_ieee,
    step_taken,
    to_storage,
    whole_block,
)

# The group's float64 hyper-parameters, in this order (the launcher writes them).
SCALARS = ("momentum", "lr", "weight_decay")
MOMENTUM, LR, WEIGHT_DECAY = (tl.constexpr(i) for i in range(len(SCALARS)))


@triton.jit
def _lerp(start, end, w):
    """torch's ``lerp(start, end, w)`` in fp32 (``w`` a scalar)."""
    small = w < 0.5
    return fma(tl.where(small, w, w - 1.0), end - start, tl.where(small, start, end))


@triton.jit
def _load(ptr, mask, FULL: tl.constexpr):
    """A full block's values, or a masked one's with zeros outside the mask."""
    if FULL:
        return tl.load(ptr)
    else:
        return tl.load(ptr, mask=mask, other=0.0)


@triton.jit
def _momentum_block(ptrs, grad_ptrs, scalars, inv_scale, clip_coef, t, offs, mask, DTYPE: tl.constexpr,
                    COMPUTE: tl.constexpr, NESTEROV: tl.constexpr, HAS_INV_SCALE: tl.constexpr,
                    HAS_CLIP: tl.constexpr, ALIGNED: tl.constexpr):  # fmt: skip
    """One block of matrix ``t``: stores the new buffer and the bf16 update; returns the sum of
    squares of the bf16 update (fp32)."""
    g = _load(address(grad_ptrs, t, 0, 1, DTYPE, ALIGNED) + offs, mask, ALIGNED).to(COMPUTE)
    if HAS_INV_SCALE:  # GradScaler's unscale_: g * fp32(1 / scale), stored in the grad's dtype
        g = to_storage(g * tl.load(inv_scale), DTYPE).to(COMPUTE)
    if HAS_CLIP:  # clip_grad_norm_'s g.mul_(coef)
        g = to_storage(g * tl.load(clip_coef), DTYPE).to(COMPUTE)
    buf_ptr = address(ptrs, t, 0, 2, DTYPE, ALIGNED) + offs
    buf = _load(buf_ptr, mask, ALIGNED).to(COMPUTE)
    momentum = tl.load(scalars + MOMENTUM)
    buf = to_storage(_lerp(buf, g, (1.0 - momentum).to(tl.float32).to(COMPUTE)), DTYPE)
    tl.store(buf_ptr, buf, mask=mask)
    if NESTEROV:
        update = to_storage(_lerp(g, buf.to(COMPUTE), momentum.to(tl.float32).to(COMPUTE)), DTYPE)
    else:
        update = buf
    update = to_storage(update.to(COMPUTE), tl.bfloat16)
    tl.store(address(ptrs, t, 1, 2, tl.bfloat16, ALIGNED) + offs, update, mask=mask)
    square = update.to(tl.float32)
    return tl.sum(square * square, axis=0)


@triton.jit
def muon_momentum_kernel(
    ptrs,  # int64 [T, 2]: momentum buffer (DTYPE), update (bf16, the workspace; written)
    grad_ptrs,  # int64 [T, 1]: grad (DTYPE)
    meta,  # int64 [T, 2]: numel, first block
    owner,  # int32 [B]: matrix of each block
    partials,  # float32 [B]: sum of squares of each block's bf16 update (written)
    scalars,  # float64 [len(SCALARS)]
    inv_scale,  # float32 [1]: GradScaler's 1 / scale (read if HAS_INV_SCALE)
    found_inf,  # float32 [1]: non-zero: nothing is written (read if HAS_FOUND_INF)
    clip_coef,  # float32 [1]: max_grad_norm's coefficient (read if HAS_CLIP)
    DTYPE: tl.constexpr,  # params, grads and buffers
    COMPUTE: tl.constexpr,  # float32, or float64 for fp64
    NESTEROV: tl.constexpr,
    HAS_INV_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    BLOCK: tl.constexpr,
    TAIL: tl.constexpr,  # some matrix ends in a partial block
    TAIL_BLOCK: tl.constexpr,  # elements per sub-block of a last block
    ALIGNED: tl.constexpr,  # every address is 16-byte aligned (else the masked path)
):
    t, start, numel = block_start(meta, owner, BLOCK)
    # A step GradScaler skips writes nothing: Newton-Schulz then runs on a stale workspace whose
    # result the update kernel does not apply.
    if step_taken(found_inf, HAS_FOUND_INF):
        whole = whole_block(start, numel, BLOCK, TAIL)
        if whole & ALIGNED:
            offs = start + tl.arange(0, BLOCK).to(tl.int64)
            total = _momentum_block(ptrs, grad_ptrs, scalars, inv_scale, clip_coef, t, offs, None, DTYPE, COMPUTE,
                                    NESTEROV, HAS_INV_SCALE, HAS_CLIP, True)  # fmt: skip
        else:
            total = 0.0
            for sub in range(start, tl.minimum(start + BLOCK, numel), TAIL_BLOCK):
                offs = sub + tl.arange(0, TAIL_BLOCK).to(tl.int64)
                total += _momentum_block(ptrs, grad_ptrs, scalars, inv_scale, clip_coef, t, offs, offs < numel,
                                         DTYPE, COMPUTE, NESTEROV, HAS_INV_SCALE, HAS_CLIP, False)  # fmt: skip
        tl.store(partials + tl.program_id(0), total)


@triton.jit
def muon_norms_kernel(
    partials,  # float32 [B]: sum of squares of each block (muon_momentum_kernel)
    meta,  # int64 [T, 2]: numel, first block
    divisors,  # bf16 [T]: max(bf16(‖X‖_F), eps) of each matrix (written)
    eps,  # float: Muon's eps
    BLOCK: tl.constexpr,  # elements per block of the momentum launch
    CHUNK: tl.constexpr,  # partials added per iteration
):
    """Program ``t``: matrix ``t``'s divisor, from its blocks' partials in a fixed order."""
    t = tl.program_id(0).to(tl.int64)
    numel, first = tl.load(meta + 2 * t), tl.load(meta + 2 * t + 1)
    blocks = tl.cdiv(numel, BLOCK)
    acc = tl.zeros((CHUNK,), dtype=tl.float32)
    for i in range(0, blocks, CHUNK):
        j = i + tl.arange(0, CHUNK).to(tl.int64)
        acc += tl.load(partials + first + j, mask=j < blocks, other=0.0)
    norm = to_storage(sqrt_ieee(tl.sum(acc, axis=0), tl.float32), tl.bfloat16).to(tl.float32)
    tl.store(divisors + t, to_storage(tl.maximum(norm, eps), tl.bfloat16))


@triton.jit
def _update_block(ptrs, t, offs, mask, decay, alpha, strided, DTYPE: tl.constexpr, COMPUTE: tl.constexpr,
                  TORCH_CPU: tl.constexpr, ALIGNED: tl.constexpr):  # fmt: skip
    p_ptr = address(ptrs, t, 0, 2, DTYPE, ALIGNED) + offs
    p = tl.load(p_ptr, mask=mask).to(COMPUTE)
    o = tl.load(address(ptrs, t, 1, 2, tl.bfloat16, ALIGNED) + offs, mask=mask).to(COMPUTE)
    p = to_storage(mul_ieee(p, decay), DTYPE).to(COMPUTE)  # p.mul_(1 - lr * weight_decay)
    p_new = fma(alpha, o, p)  # p.add_(O, alpha=-adjusted_lr)
    if TORCH_CPU:  # a bf16/fp16 transposed O (a tall matrix's): torch's scalar loop rounds the product
        p_new = tl.where(strided, p + to_storage(mul_ieee(alpha, o), DTYPE).to(COMPUTE), p_new)
    tl.store(p_ptr, to_storage(p_new, DTYPE), mask=mask)


@triton.jit
def muon_update_kernel(
    ptrs,  # int64 [T, 2]: param (DTYPE), orthogonalized update (bf16, the workspace)
    meta,  # int64 [T, 2]: numel, first block
    owner,  # int32 [B]: matrix of each block
    scalars,  # float64 [len(SCALARS)]
    ratios,  # float64 [T, 2]: each matrix's adjusted_lr / lr (its adjust_lr_fn); 1.0 if torch's CPU add_ rounds alpha * O first (TORCH_CPU)
    found_inf,  # float32 [1]: non-zero skips the step (read if HAS_FOUND_INF)
    DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    FP32_LR: tl.constexpr,  # lr is an fp32 tensor: decay and alpha in fp32, as torch's tensor ops
    TORCH_CPU: tl.constexpr,  # round as torch's CPU add_ (see the module doc), not as its CUDA one
    HAS_FOUND_INF: tl.constexpr,
    BLOCK: tl.constexpr,
    TAIL: tl.constexpr,
    TAIL_BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    t, start, numel = block_start(meta, owner, BLOCK)
    if step_taken(found_inf, HAS_FOUND_INF):
        lr, weight_decay, ratio = (
            tl.load(scalars + LR),
            tl.load(scalars + WEIGHT_DECAY),
            tl.load(ratios + 2 * t),
        )
        if FP32_LR:
            lr32 = lr.to(tl.float32)
            decay = (1.0 - mul_ieee(lr32, weight_decay.to(tl.float32))).to(COMPUTE)
            alpha = -mul_ieee(lr32, ratio.to(tl.float32)).to(COMPUTE)
        else:  # Python numbers: float64 arithmetic, as torch's
            decay = (1.0 - lr * weight_decay).to(COMPUTE)
            alpha = (-(lr * ratio)).to(COMPUTE)
        strided = False
        if TORCH_CPU:  # torch's CPU add_ of bf16/fp16 tensors rounds alpha to their dtype
            alpha = to_storage(alpha, DTYPE).to(COMPUTE)
            strided = tl.load(ratios + 2 * t + 1) != 0
        whole = whole_block(start, numel, BLOCK, TAIL)
        if whole & ALIGNED:
            offs = start + tl.arange(0, BLOCK).to(tl.int64)
            _update_block(ptrs, t, offs, None, decay, alpha, strided, DTYPE, COMPUTE, TORCH_CPU, True)
        else:
            for sub in range(start, tl.minimum(start + BLOCK, numel), TAIL_BLOCK):
                offs = sub + tl.arange(0, TAIL_BLOCK).to(tl.int64)
                _update_block(
                    ptrs, t, offs, offs < numel, decay, alpha, strided, DTYPE, COMPUTE, TORCH_CPU, False
                )
