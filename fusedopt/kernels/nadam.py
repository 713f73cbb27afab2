"""NAdam (momentum decay, L2 or decoupled decay, maximize): the update and per-tensor values of
the optimizer kernel (:mod:`fusedopt.kernels.optimizer`: one pass over memory, one launch per
device and dtype).

For each element (fp32 math, fp64 for fp64 params; ``t`` is the tensor's own step count):

    g  = grad / grad_scale (AMP);  g = g * clip_coef (max_grad_norm);  g = -g if maximize
    p  = p * (1 - lr * wd)                 (decoupled)   |  g = g + wd * p   (L2)
    m  = lerp(m, g, 1 - beta1)
    v  = beta2 * v + (1 - beta2) * g * g
    d  = sqrt(v / (1 - beta2**t)) + eps
    p  = p + a * g / d + b * m / d

with, per tensor (``prepare``, fp64 as torch's Python floats): ``mu_t = beta1 (1 - 0.96**(t
momentum_decay) / 2)``, the state ``mu_product *= mu_t`` (a 0-d tensor of the step counter's
dtype, as torch keeps it: ``CARRIED``), ``a = -lr (1 - mu_t) / (1 - mu_product)`` and ``b = -lr
mu_{t+1} / (1 - mu_product mu_{t+1})``.

Bytes per element (fp32): read p, g, m, v and write p, m, v = 28 B.
"""

import math

import triton
import triton.language as tl

from fusedopt.kernels.common import decay, div_ieee, fma, lerp, mul_ieee, named, sqrt_ieee
from fusedopt.kernels.optimizer import bits

# The spec shared with the launcher (fusedopt.optim.nadam).
COLUMNS = ("param", "exp_avg", "exp_avg_sq")
SCALARS = ("lr", "beta1", "beta2", "eps", "weight_decay", "momentum_decay")
PREPARED = ("bias_correction2", "grad_coef", "avg_coef")
CARRIED = {"mu_product": 1.0}  # per-tensor scalar state: key -> initial value
FLAGS = ("MAXIMIZE", "DECOUPLED", "HAS_WD")
REQUIRES = {}
NONNEGATIVE = ("exp_avg_sq",)  # the unsigned 8-bit code map
LR, BETA1, BETA2, EPS, WEIGHT_DECAY, MOMENTUM_DECAY = named(SCALARS)
BIAS_CORRECTION2, GRAD_COEF, AVG_COEF = named(PREPARED)
(MU_PRODUCT,) = named(tuple(CARRIED))
MAXIMIZE, DECOUPLED, HAS_WD = bits(FLAGS)
_LOG_096 = tl.constexpr(math.log(0.96))


@triton.jit
def _mu(beta1, step, momentum_decay):
    return beta1 * (1.0 - 0.5 * tl.exp(step * momentum_decay * _LOG_096))


@triton.jit
def prepare(scalars, step, out, mask, COMPUTE: tl.constexpr, carried, taken):
    """``1 - beta2**t`` and the two coefficients of each tensor's step ``t``; ``mu_product``
    multiplied by ``mu_t`` in its own dtype (torch's ``mu_product *= mu``), kept where the step
    is taken."""
    lr, beta1 = tl.load(scalars + LR), tl.load(scalars + BETA1)
    momentum_decay = tl.load(scalars + MOMENTUM_DECAY)
    mu = _mu(beta1, step, momentum_decay)
    mu_next = _mu(beta1, step + 1.0, momentum_decay)
    old = tl.load(carried + MU_PRODUCT, mask=mask)
    product = mul_ieee(old, mu.to(old.dtype))
    tl.store(carried + MU_PRODUCT, product, mask=taken)
    product = product.to(tl.float64)
    bias_correction2 = 1.0 - tl.exp(step * tl.log(tl.load(scalars + BETA2)))
    tl.store(out + BIAS_CORRECTION2, bias_correction2.to(COMPUTE), mask=mask)
    tl.store(out + GRAD_COEF, (-lr * (1.0 - mu) / (1.0 - product)).to(COMPUTE), mask=mask)
    tl.store(out + AVG_COEF, (-lr * mu_next / (1.0 - product * mu_next)).to(COMPUTE), mask=mask)


@triton.jit
def update(p, g, m, v, s3, scalars, prepared, counter, SWITCHES: tl.constexpr, COMPUTE: tl.constexpr):
    beta2 = tl.load(scalars + BETA2)
    if HAS_WD & SWITCHES:
        p, g = decay(
            p, g, tl.load(scalars + LR), tl.load(scalars + WEIGHT_DECAY), DECOUPLED & SWITCHES, COMPUTE
        )
    # Rounded where torch's for-loop rounds: lerp, mul_ + addcmul_, div, sqrt, add_, two addcdiv_.
    m = lerp(m, g, (1.0 - tl.load(scalars + BETA1)).to(COMPUTE))
    v = fma((1.0 - beta2).to(COMPUTE) * g, g, mul_ieee(v, beta2.to(COMPUTE)))
    denom = sqrt_ieee(div_ieee(v, tl.load(prepared + BIAS_CORRECTION2), COMPUTE), COMPUTE)
    denom = denom + tl.load(scalars + EPS).to(COMPUTE)
    p = p + div_ieee(tl.load(prepared + GRAD_COEF) * g, denom, COMPUTE)
    p = p + div_ieee(tl.load(prepared + AVG_COEF) * m, denom, COMPUTE)
    return p, m, v, s3
