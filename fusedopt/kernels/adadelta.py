"""Adadelta (L2 decay, maximize): the update of the optimizer kernel
(:mod:`fusedopt.kernels.optimizer`: one pass over memory, one launch per device and dtype).

For each element (fp32 math, fp64 for fp64 params):

    g     = grad / grad_scale (AMP);  g = g * clip_coef (max_grad_norm);  g = -g if maximize
    g     = g + wd * p
    v     = rho * v + (1 - rho) * g * g
    delta = sqrt(a + eps) / sqrt(v + eps) * g
    a     = rho * a + (1 - rho) * delta * delta
    p     = p - lr * delta

Bytes per element (fp32): read p, g, v, a and write p, v, a = 28 B.
"""

import triton
import triton.language as tl

from fusedopt.kernels.common import div_ieee, fma, mul_ieee, named, sqrt_ieee
from fusedopt.kernels.optimizer import bits

# The spec shared with the launcher (fusedopt.optim.adadelta).
COLUMNS = ("param", "square_avg", "acc_delta")
SCALARS = ("lr", "rho", "eps", "weight_decay")
PREPARED = ()
FLAGS = ("MAXIMIZE", "HAS_WD")
REQUIRES = {}
NONNEGATIVE = ("square_avg", "acc_delta")  # the unsigned 8-bit code map
LR, RHO, EPS, WEIGHT_DECAY = named(SCALARS)
MAXIMIZE, HAS_WD = bits(FLAGS)


@triton.jit
def update(p, g, v, a, s3, scalars, prepared, counter, SWITCHES: tl.constexpr, COMPUTE: tl.constexpr):
    # Rounded where torch's for-loop rounds: mul_ then addcmul_ (one rounding), add(eps) then
    # sqrt_, div_ then mul_, add_(alpha=-lr) (one rounding).
    rho = tl.load(scalars + RHO)
    r = rho.to(COMPUTE)
    w = (1.0 - rho).to(COMPUTE)
    eps = tl.load(scalars + EPS).to(COMPUTE)
    if HAS_WD & SWITCHES:
        g = fma(p, tl.load(scalars + WEIGHT_DECAY).to(COMPUTE), g)
    v = fma(w * g, g, mul_ieee(v, r))
    delta = mul_ieee(div_ieee(sqrt_ieee(a + eps, COMPUTE), sqrt_ieee(v + eps, COMPUTE), COMPUTE), g)
    a = fma(w * delta, delta, mul_ieee(a, r))
    p = fma(delta, -tl.load(scalars + LR).to(COMPUTE), p)
    return p, v, a, s3
