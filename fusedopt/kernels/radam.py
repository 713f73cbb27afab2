"""RAdam (L2 or decoupled decay, maximize): the update and per-tensor values of the optimizer
kernel (:mod:`fusedopt.kernels.optimizer`: one pass over memory, one launch per device and dtype).

For each element (fp32 math, fp64 for fp64 params; ``t`` is the tensor's own step count):

    g  = grad / grad_scale (AMP);  g = g * clip_coef (max_grad_norm);  g = -g if maximize
    p  = p * (1 - lr * wd)                 (decoupled)   |  g = g + wd * p   (L2)
    m  = lerp(m, g, 1 - beta1)
    v  = beta2 * v + (1 - beta2) * g * g
    u  = m / (1 - beta1**t) * lr
    u  = u * (sqrt(1 - beta2**t) / (sqrt(v) + eps)) * rect      (where rho_t > 5)
    p  = p - u

with ``rho_inf = 2 / (1 - beta2) - 1``, ``rho_t = rho_inf - 2 t beta2**t / (1 - beta2**t)`` and
``rect = sqrt((rho_t - 4) (rho_t - 2) rho_inf / ((rho_inf - 4) (rho_inf - 2) rho_t))``, computed
per tensor in fp64 (``prepare``; rect 0 where rho_t <= 5: no adaptive term).

Bytes per element (fp32): read p, g, m, v and write p, m, v = 28 B.
"""

import triton
import triton.language as tl

from fusedopt.kernels.common import decay, div_ieee, fma, lerp, mul_ieee, named, sqrt_ieee
from fusedopt.kernels.optimizer import bits

# The spec shared with the launcher (fusedopt.optim.radam).
COLUMNS = ("param", "exp_avg", "exp_avg_sq")
SCALARS = ("lr", "beta1", "beta2", "eps", "weight_decay")
PREPARED = ("bias_correction1", "bias_correction2_sqrt", "rect")
FLAGS = ("MAXIMIZE", "DECOUPLED", "HAS_WD")
REQUIRES = {}
NONNEGATIVE = ("exp_avg_sq",)  # the unsigned 8-bit code map
LR, BETA1, BETA2, EPS, WEIGHT_DECAY = named(SCALARS)
BIAS_CORRECTION1, BIAS_CORRECTION2_SQRT, RECT = named(PREPARED)
MAXIMIZE, DECOUPLED, HAS_WD = bits(FLAGS)


@triton.jit
def prepare(scalars, step, out, mask, COMPUTE: tl.constexpr):
    """``1 - beta1**t``, ``sqrt(1 - beta2**t)`` and the rectification of each tensor's step
    ``t`` (0 where ``rho_t <= 5``), in fp64 as torch's Python floats."""
    beta2 = tl.load(scalars + BETA2)
    beta2_t = tl.exp(step * tl.log(beta2))
    bias_correction2 = 1.0 - beta2_t
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * step * beta2_t / bias_correction2
    ratio = (rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)
    rect = tl.sqrt(tl.where(rho_t > 5.0, ratio, 0.0))
    tl.store(
        out + BIAS_CORRECTION1, (1.0 - tl.exp(step * tl.log(tl.load(scalars + BETA1)))).to(COMPUTE), mask=mask
    )
    tl.store(out + BIAS_CORRECTION2_SQRT, tl.sqrt(bias_correction2).to(COMPUTE), mask=mask)
    tl.store(out + RECT, rect.to(COMPUTE), mask=mask)


@triton.jit
def update(p, g, m, v, s3, scalars, prepared, counter, SWITCHES: tl.constexpr, COMPUTE: tl.constexpr):
    lr = tl.load(scalars + LR)
    beta2 = tl.load(scalars + BETA2)
    if HAS_WD & SWITCHES:
        p, g = decay(p, g, lr, tl.load(scalars + WEIGHT_DECAY), DECOUPLED & SWITCHES, COMPUTE)
    # Rounded where torch's for-loop rounds: each tensor op of its step once (fma where lerp
    # and addcmul fuse; ``float / tensor`` is torch's reciprocal, then a product).
    m = lerp(m, g, (1.0 - tl.load(scalars + BETA1)).to(COMPUTE))
    v = fma((1.0 - beta2).to(COMPUTE) * g, g, mul_ieee(v, beta2.to(COMPUTE)))
    u = mul_ieee(div_ieee(m, tl.load(prepared + BIAS_CORRECTION1), COMPUTE), lr.to(COMPUTE))
    rect = tl.load(prepared + RECT)
    denom = sqrt_ieee(v, COMPUTE) + tl.load(scalars + EPS).to(COMPUTE)
    adaptive = mul_ieee(div_ieee(1.0, denom, COMPUTE), tl.load(prepared + BIAS_CORRECTION2_SQRT))
    u = tl.where(rect > 0, mul_ieee(mul_ieee(u, adaptive), rect), u)
    return p - u, m, v, s3
