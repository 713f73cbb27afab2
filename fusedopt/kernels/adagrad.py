"""Adagrad (learning-rate decay, L2 decay, maximize): the update and per-tensor values of the
optimizer kernel (:mod:`fusedopt.kernels.optimizer`: one pass over memory, one launch per device
and dtype).

For each element (fp32 math, fp64 for fp64 params; ``t`` is the tensor's own step count):

    g   = grad / grad_scale (AMP);  g = g * clip_coef (max_grad_norm);  g = -g if maximize
    g   = g + wd * p
    clr = lr / (1 + (t - 1) * lr_decay)           (in fp64, as torch's Python floats)
    s   = s + g * g
    p   = p - clr * g / (sqrt(s) + eps)

The decayed learning rate is computed on the device from each tensor's step count (once per
tensor and step: ``prepare``), so a step reads nothing from the host: it can be captured in a
CUDA graph.

Bytes per element (fp32): read p, g, s and write p, s = 20 B.
When ``found_inf`` is non-zero nothing is read or written.

With 8-bit state (``state_dtype="int8"``, Q8) a state element is read and written as 1 byte,
plus a 4-byte absmax for every 256 of them (``fusedopt.optim._quantize``).
"""

import triton
import triton.language as tl

from fusedopt.kernels.common import div_ieee, fma, mul_ieee, named, sqrt_ieee
from fusedopt.kernels.optimizer import bits

# The spec shared with the launcher (fusedopt.optim.adagrad): table columns (state keys), float64
# scalar slots, per-tensor values and the constexpr switches.
COLUMNS = ("param", "sum")
SCALARS = ("lr", "lr_decay", "weight_decay", "eps")
PREPARED = ("minus_clr",)
FLAGS = ("MAXIMIZE", "HAS_WD")
REQUIRES = {}
# State never below 0 (with initial_accumulator_value >= 0): the unsigned 8-bit code map.
NONNEGATIVE = ("sum",)
LR, LR_DECAY, WEIGHT_DECAY, EPS = named(SCALARS)
(MINUS_CLR,) = named(PREPARED)
MAXIMIZE, HAS_WD = bits(FLAGS)


@triton.jit
def prepare(scalars, step, out, mask, COMPUTE: tl.constexpr):
    """``-clr`` of each tensor's step ``t``."""
    # clr in fp64, rounded as torch's Python floats: (t - 1) * lr_decay, then 1 + that, then lr / it.
    clr = tl.load(scalars + LR) / (1.0 + mul_ieee(step - 1.0, tl.load(scalars + LR_DECAY)))
    tl.store(out + MINUS_CLR, (-clr).to(COMPUTE), mask=mask)


@triton.jit
def update(p, g, s, s2, s3, scalars, prepared, counter, SWITCHES: tl.constexpr, COMPUTE: tl.constexpr):
    minus_clr = tl.load(prepared + MINUS_CLR)
    eps = tl.load(scalars + EPS).to(COMPUTE)
    # fma exactly where torch's add(alpha=) / addcmul round once; addcdiv divides (IEEE) and
    # adds with separate roundings (CPU), so fp32 results follow torch's for-loop step.
    if HAS_WD & SWITCHES:
        g = fma(p, tl.load(scalars + WEIGHT_DECAY).to(COMPUTE), g)
    s = fma(g, g, s)
    std = sqrt_ieee(s, COMPUTE) + eps
    p = p + div_ieee(minus_clr * g, std, COMPUTE)
    return p, s, s2, s3
