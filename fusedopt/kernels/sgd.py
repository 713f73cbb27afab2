"""SGD (momentum, dampening, nesterov, L2 decay, maximize): the update of the optimizer kernel
(:mod:`fusedopt.kernels.optimizer`).

For each element (fp32 math, fp64 for fp64 params):

    g = grad / grad_scale (AMP);  g = g * clip_coef (max_grad_norm);  g = -g if maximize
    g = g + wd * p
    b = g                                  on the buffer's first step taken (its counter is 1)
    b = momentum * b + (1 - dampening) * g afterwards
    g = g + momentum * b (nesterov)  or  g = b
    p = p - lr * g

Bytes per element (fp32, momentum): read p, g, b and write p, b = 20 B (12 B without momentum).
When ``found_inf`` is non-zero nothing is read or written.

With 8-bit state (``state_dtype="int8"``, Q8) a state element is read and written as 1 byte,
plus a 4-byte absmax for every 256 of them (``fusedopt.optim._quantize``).
"""

import triton
import triton.language as tl

from fusedopt.kernels.common import fma, named
from fusedopt.kernels.optimizer import bits

# The spec shared with the launcher (fusedopt.optim.sgd).
COLUMNS = ("param", "momentum_buffer")
SCALARS = ("lr", "momentum", "dampening", "weight_decay")
PREPARED = ()
FLAGS = ("HAS_MOMENTUM", "NESTEROV", "MAXIMIZE", "HAS_WD")
REQUIRES = {"momentum_buffer": "HAS_MOMENTUM"}
NONNEGATIVE = ()  # state never below 0 (the unsigned 8-bit code map): none
LR, MOMENTUM, DAMPENING, WEIGHT_DECAY = named(SCALARS)
HAS_MOMENTUM, NESTEROV, MAXIMIZE, HAS_WD = bits(FLAGS)


@triton.jit
def update(p, g, b, s2, s3, scalars, prepared, taken, SWITCHES: tl.constexpr, COMPUTE: tl.constexpr):
    """``taken``: the address of the steps the tensor's momentum buffer has taken, this one
    included (1: the buffer is new and takes the gradient)."""
    lr = tl.load(scalars + LR).to(COMPUTE)
    # fma where torch's add(..., alpha=) rounds once, so fp32 results match torch bit for bit.
    if HAS_WD & SWITCHES:
        g = fma(p, tl.load(scalars + WEIGHT_DECAY).to(COMPUTE), g)
    if HAS_MOMENTUM & SWITCHES:
        momentum = tl.load(scalars + MOMENTUM).to(COMPUTE)
        keep = (1.0 - tl.load(scalars + DAMPENING)).to(COMPUTE)
        b = tl.where(tl.load(taken) == 1, g, fma(g, keep, b * momentum))
        if NESTEROV & SWITCHES:
            g = fma(b, momentum, g)
        else:
            g = b
    p = fma(g, -lr, p)
    return p, b, s2, s3
