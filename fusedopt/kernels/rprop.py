"""Rprop (maximize): the update of the optimizer kernel (:mod:`fusedopt.kernels.optimizer`: one
pass over memory, one launch per device and dtype).

For each element (fp32 math, fp64 for fp64 params):

    g      = grad / grad_scale (AMP);  g = g * clip_coef (max_grad_norm);  g = -g if maximize
    q      = g * prev
    eta    = etaplus where q > 0, etaminus where q < 0, else 1     (torch.sign(NaN) is 0: 1)
    s      = clamp(s * eta, step_size_min, step_size_max)
    g      = 0 where q < 0                                          (the sign flipped)
    p      = p - sign(g) * s
    prev   = g

Bytes per element (fp32): read p, g, prev, s and write p, prev, s = 28 B.
"""

import triton
import triton.language as tl

from fusedopt.kernels.common import mul_ieee, named
from fusedopt.kernels.optimizer import bits

# The spec shared with the launcher (fusedopt.optim.rprop).
COLUMNS = ("param", "prev", "step_size")
SCALARS = ("etaminus", "etaplus", "step_size_min", "step_size_max")
PREPARED = ()
FLAGS = ("MAXIMIZE",)
REQUIRES = {}
NONNEGATIVE = ("step_size",)  # the unsigned 8-bit code map
ETAMINUS, ETAPLUS, STEP_SIZE_MIN, STEP_SIZE_MAX = named(SCALARS)
(MAXIMIZE,) = bits(FLAGS)


@triton.jit
def update(p, g, prev, s, s3, scalars, prepared, counter, SWITCHES: tl.constexpr, COMPUTE: tl.constexpr):
    # As torch's for-loop: the sign of the product (rounded, so an underflow to 0 counts as 0),
    # the step size's mul_ then clamp_, and addcmul_(sign, s, value=-1) (exact product).
    q = mul_ieee(g, prev)
    eta = tl.where(
        q > 0,
        tl.load(scalars + ETAPLUS).to(COMPUTE),
        tl.where(q < 0, tl.load(scalars + ETAMINUS).to(COMPUTE), 1.0),
    )
    s = mul_ieee(s, eta.to(COMPUTE))
    s = tl.minimum(
        tl.maximum(s, tl.load(scalars + STEP_SIZE_MIN).to(COMPUTE)),
        tl.load(scalars + STEP_SIZE_MAX).to(COMPUTE),
    )
    g = tl.where(q < 0, 0.0, g).to(COMPUTE)
    p = p - tl.where(g > 0, s, tl.where(g < 0, -s, 0.0))
    return p, g, s, s3
