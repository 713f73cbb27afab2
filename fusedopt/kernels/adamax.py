"""Adamax (L2 decay, maximize): the update and per-tensor values of the optimizer kernel
(:mod:`fusedopt.kernels.optimizer`: one pass over memory, one launch per device and dtype).

For each element (fp32 math, fp64 for fp64 params; ``t`` is the tensor's own step count):

    g   = grad / grad_scale (AMP);  g = g * clip_coef (max_grad_norm);  g = -g if maximize
    g   = g + wd * p
    m   = lerp(m, g, 1 - beta1)
    u   = max(beta2 * u, |g| + eps)
    clr = lr / (1 - beta1**t)                      (in fp64, as torch's Python floats)
    p   = p - clr * m / u

Bytes per element (fp32): read p, g, m, u and write p, m, u = 28 B.
"""

import triton
import triton.language as tl

from fusedopt.kernels.common import div_ieee, fma, lerp, maximum, mul_ieee, named
from fusedopt.kernels.optimizer import bits

# The spec shared with the launcher (fusedopt.optim.adamax).
COLUMNS = ("param", "exp_avg", "exp_inf")
SCALARS = ("lr", "beta1", "beta2", "eps", "weight_decay")
PREPARED = ("minus_clr",)
FLAGS = ("MAXIMIZE", "HAS_WD")
REQUIRES = {}
NONNEGATIVE = ("exp_inf",)  # the unsigned 8-bit code map
LR, BETA1, BETA2, EPS, WEIGHT_DECAY = named(SCALARS)
(MINUS_CLR,) = named(PREPARED)
MAXIMIZE, HAS_WD = bits(FLAGS)


@triton.jit
def prepare(scalars, step, out, mask, COMPUTE: tl.constexpr):
    """``-lr / (1 - beta1**t)`` of each tensor's step ``t``."""
    bias_correction = 1.0 - tl.exp(step * tl.log(tl.load(scalars + BETA1)))
    tl.store(out + MINUS_CLR, (-tl.load(scalars + LR) / bias_correction).to(COMPUTE), mask=mask)


@triton.jit
def update(p, g, m, u, s3, scalars, prepared, counter, SWITCHES: tl.constexpr, COMPUTE: tl.constexpr):
    # Rounded where torch's for-loop rounds: lerp, mul_, abs().add_, maximum, addcdiv.
    if HAS_WD & SWITCHES:
        g = fma(p, tl.load(scalars + WEIGHT_DECAY).to(COMPUTE), g)
    m = lerp(m, g, (1.0 - tl.load(scalars + BETA1)).to(COMPUTE))
    u = maximum(
        mul_ieee(u, tl.load(scalars + BETA2).to(COMPUTE)), tl.abs(g) + tl.load(scalars + EPS).to(COMPUTE)
    )
    p = p + div_ieee(tl.load(prepared + MINUS_CLR) * m, u, COMPUTE)
    return p, m, u, s3
