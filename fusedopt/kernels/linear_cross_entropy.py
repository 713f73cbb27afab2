"""The one kernel of the fused linear + cross-entropy that is not cross-entropy's: the fp32
accumulation of the weight's gradient over token chunks.

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


@triton.jit
def matmul_accumulate_kernel(
    acc,  # fp32 [M, N], any strides: acc += a @ b
    a,  # DTYPE [M, K], any strides (dZ_kᵀ: a transposed view)
    b,  # DTYPE [K, N], any strides (X_k)
    M,
    N,
    K,
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
    """One BLOCK_M x BLOCK_N tile of ``acc`` per program, in grouped order."""
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
            a + rm[:, None] * stride_am + rk[None, :] * stride_ak, mask=in_m[:, None] & in_k[None, :], other=0
        )
        b_tile = tl.load(
            b + rk[:, None] * stride_bk + rn[None, :] * stride_bn, mask=in_k[:, None] & in_n[None, :], other=0
        )
        if UPCAST:  # exact: a product of two bf16 values is an fp32 value
            a_tile = a_tile.to(tl.float32)
            b_tile = b_tile.to(tl.float32)
        total = tl.dot(a_tile, b_tile, total)
    tl.store(c_ptrs, total, mask=c_mask)
