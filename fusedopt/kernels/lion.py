"""Lion (decoupled weight decay, maximize): the update of the optimizer kernel
(:mod:`fusedopt.kernels.optimizer`: one pass over memory, one launch per device and dtype).

For each element (fp32 math, fp64 for fp64 params), as the ``lion-pytorch`` package steps it:

    g = grad / grad_scale (AMP);  g = g * clip_coef (max_grad_norm);  g = -g if maximize
    p = p * (1 - lr * wd)
    c = beta1 * m + (1 - beta1) * g
    p = p - lr * sign(c)
    m = beta2 * m + (1 - beta2) * g

The update does not depend on a step count (Lion keeps none).

Bytes per element (fp32): read p, g, m and write p, m = 20 B (8-bit ``exp_avg``: 1 byte each
way, plus its absmax).
"""

import triton
import triton.language as tl

from fusedopt.kernels.common import decay, fma, mul_ieee, named
from fusedopt.kernels.optimizer import bits

# The spec shared with the launcher (fusedopt.optim.lion).
COLUMNS = ("param", "exp_avg")
SCALARS = ("lr", "beta1", "beta2", "weight_decay")
PREPARED = ()
FLAGS = ("MAXIMIZE", "HAS_WD")
REQUIRES = {}
NONNEGATIVE = ()  # exp_avg takes the grad's sign: the signed 8-bit code map
LR, BETA1, BETA2, WEIGHT_DECAY = named(SCALARS)
MAXIMIZE, HAS_WD = bits(FLAGS)


@triton.jit
def update(p, g, m, s2, s3, scalars, prepared, counter, SWITCHES: tl.constexpr, COMPUTE: tl.constexpr):
    lr = tl.load(scalars + LR)
    beta1 = tl.load(scalars + BETA1)
    beta2 = tl.load(scalars + BETA2)
    if HAS_WD & SWITCHES:
        p, g = decay(p, g, lr, tl.load(scalars + WEIGHT_DECAY), True, COMPUTE)
    # A separate rounding where the reference's mul_ rounds, fma where its add(alpha=) does, so
    # fp32 results match lion-pytorch bit for bit (a sign flip would move p by 2 lr).
    c = fma(g, (1.0 - beta1).to(COMPUTE), mul_ieee(m, beta1.to(COMPUTE)))
    step = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0)).to(COMPUTE)  # torch.sign; NaN -> 0
    p = fma(step, (-lr).to(COMPUTE), p)
    m = fma(g, (1.0 - beta2).to(COMPUTE), mul_ieee(m, beta2.to(COMPUTE)))
    return p, m, s2, s3
