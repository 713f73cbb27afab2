"""RMSprop (centered, momentum, L2 decay, maximize): the update of the optimizer kernel
(:mod:`fusedopt.kernels.optimizer`: one pass over memory, one launch per device and dtype).

For each element (fp32 math, fp64 for fp64 params):

    g  = grad / grad_scale (AMP);  g = g * clip_coef (max_grad_norm);  g = -g if maximize
    g  = g + wd * p
    v  = alpha * v + (1 - alpha) * g * g
    ga = lerp(ga, g, 1 - alpha)                   (centered)
    d  = sqrt(v - ga * ga) + eps  (centered)  |  d = sqrt(v) + eps
    b  = momentum * b + g / d;  p = p - lr * b   (momentum > 0)
    p  = p - lr * g / d                           (otherwise)

The update does not depend on the step count (the launcher advances the counters only).

Bytes per element (fp32): read p, g, v and write p, v = 20 B; 28 B with momentum or centered
(+ b or ga, read and written), 36 B with both. When ``found_inf`` is non-zero nothing is read
or written.

With 8-bit state (``state_dtype="int8"``, Q8) a state element is read and written as 1 byte,
plus a 4-byte absmax for every 256 of them (``fusedopt.optim._quantize``).
"""

import triton
import triton.language as tl

from fusedopt.kernels.common import div_ieee, fma, lerp, mul_ieee, named, sqrt_ieee
from fusedopt.kernels.optimizer import bits

# The spec shared with the launcher (fusedopt.optim.rmsprop): table columns (state keys), float64
# scalar slots, per-tensor values, the constexpr switches and the state columns a switch adds.
COLUMNS = ("param", "square_avg", "momentum_buffer", "grad_avg")
SCALARS = ("lr", "alpha", "eps", "weight_decay", "momentum")
PREPARED = ()
FLAGS = ("CENTERED", "HAS_MOMENTUM", "MAXIMIZE", "HAS_WD")
REQUIRES = {"momentum_buffer": "HAS_MOMENTUM", "grad_avg": "CENTERED"}
NONNEGATIVE = ("square_avg",)  # state never below 0: the unsigned 8-bit code map
LR, ALPHA, EPS, WEIGHT_DECAY, MOMENTUM = named(SCALARS)
CENTERED, HAS_MOMENTUM, MAXIMIZE, HAS_WD = bits(FLAGS)


@triton.jit
def update(p, g, v, b, ga, scalars, prepared, counter, SWITCHES: tl.constexpr, COMPUTE: tl.constexpr):
    lr = tl.load(scalars + LR).to(COMPUTE)
    alpha = tl.load(scalars + ALPHA)
    eps = tl.load(scalars + EPS).to(COMPUTE)
    a = alpha.to(COMPUTE)
    w = (1.0 - alpha).to(COMPUTE)
    # fma exactly where torch's add(alpha=) / addcmul / lerp round once, a separate rounding
    # where torch's mul_ / addcdiv do (CPU), so fp32 results follow torch's for-loop step.
    if HAS_WD & SWITCHES:
        g = fma(p, tl.load(scalars + WEIGHT_DECAY).to(COMPUTE), g)
    v = fma(w * g, g, v * a)
    if CENTERED & SWITCHES:
        ga = lerp(ga, g, w)
        avg = sqrt_ieee(fma(-ga, ga, v), COMPUTE) + eps
    else:
        avg = sqrt_ieee(v, COMPUTE) + eps
    if HAS_MOMENTUM & SWITCHES:
        b = mul_ieee(b, tl.load(scalars + MOMENTUM).to(COMPUTE)) + div_ieee(g, avg, COMPUTE)
        p = fma(b, -lr, p)
    else:
        p = p + div_ieee(-lr * g, avg, COMPUTE)
    return p, v, b, ga
