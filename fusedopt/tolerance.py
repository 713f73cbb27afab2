"""The tolerance contract: how close fusedopt's results must be to torch's.

One table per family, used through :mod:`fusedopt.testing` (``assert_close``, ``Result``) by
the tests and by ``python -m fusedopt check``:

* fp32 / fp64: element-wise ``|ours - torch| <= atol + rtol * |torch|``, torch run on the same
  tensors (optimizers: torch.optim's for-loop path). For the losses ``atol`` is ``rtol`` times
  the largest expected magnitude (sums of signed terms may cancel).
* bf16 / fp16: the oracle is torch's algorithm in fp32 from the same values, rounded to the
  dtype (optimizers: after every step, params and every state tensor). Allowed: ``ulps``
  rounding steps of the dtype at the expected value, plus fp32 rounding noise
  (``8 * 2**-24 * max|expected|``), visible only where a result cancels to near zero.
* ``max_grad_norm`` (:data:`CLIP_TOLERANCE`): each step's clip coefficient, against
  ``min(1, max_norm / (norm + 1e-6))`` with the norm in fp64 from the same grads, within
  ``rtol`` of the dtype it is computed in (fp32; fp64 where every grad is fp64). The oracle's grads are
  then scaled by ours, and the step is held to the rows above: a coefficient a few fp32
  roundings off (any other summation order) flips bf16/fp16 roundings of the state, which a
  momentum cancelling to near zero keeps as many rounding steps of its own value.
* The fused linear cross-entropy (:data:`LINEAR_CE_TOLERANCE`) and the fused linear
  distillation loss (:data:`LINEAR_DISTILLATION_TOLERANCE`): per tensor (the loss, each
  gradient), against the composition in fp64, within twice the composition's own error in the
  dtype plus ``rtol`` of the largest magnitude; the fused linear log-probs and entropy
  (:data:`LINEAR_LOG_PROBS_TOLERANCE`) the same, by the inputs' dtype.
"""

from __future__ import annotations

import torch

OPTIM_TOLERANCE: dict[torch.dtype, dict[str, float]] = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-12, atol=1e-14),
    torch.bfloat16: dict(ulps=1),
    torch.float16: dict(ulps=1),
}

# The fused losses round a stored gradient twice when grad_output != 1: two steps in bf16/fp16.
LOSS_TOLERANCE: dict[torch.dtype, dict[str, float]] = {
    torch.float32: dict(rtol=1e-5),
    torch.float64: dict(rtol=1e-12),
    torch.bfloat16: dict(ulps=2),
    torch.float16: dict(ulps=2),
}

FP32_NOISE = 8 * 2.0**-24  # relative to the largest expected magnitude

# The kernels' tanh (``fusedopt.kernels.common.tanh``, the softcap's): its relative error in
# units of the dtype's eps (interpreter: 1.8 fp32, 3.1 fp64; a GPU's approximate fp32 exp may
# add about 2 at |x| = 0.25, where the exponential form starts).
TANH_EPS: dict[torch.dtype, float] = {torch.float32: 4.0, torch.float64: 4.0}

# FusedMuon's Muon-group params against torch.optim.Muon's (run in the same dtype): within the
# noise of bf16 Newton–Schulz. FusedMuon runs the matrices of one shape batched (bmm, baddbmm)
# where torch runs each alone (mm, addmm); the two round alike almost everywhere, but now and
# then an element of the orthogonalized update O is a bf16 rounding step apart (2^-8 of it, |O|
# below 1), which the step scales by the adjusted lr (0.02-0.05 x up to 2.6 in the tests and the
# check): about 1e-4 a step, 1e-3 over the 5-7 steps compared. The momentum buffers and the AdamW
# groups are held to OPTIM_TOLERANCE (their bf16/fp16 rows against torch in the same dtype).
MUON_TOLERANCE: dict[torch.dtype, dict[str, float]] = {
    torch.float32: dict(rtol=1e-5, atol=1e-3),
    torch.float64: dict(rtol=1e-12, atol=1e-3),
    torch.bfloat16: dict(ulps=1, atol=1e-3),  # a param's own rounding may flip with it
    torch.float16: dict(ulps=1, atol=1e-3),
}

# max_grad_norm's clip coefficient, by the dtype it is computed in: rtol against fp64.
CLIP_TOLERANCE: dict[torch.dtype, float] = {torch.float32: 1e-5, torch.float64: 1e-12}

# torch: the factor on the composition's own error; rtol: of the oracle's largest magnitude.
LINEAR_CE_TOLERANCE: dict[torch.dtype, dict[str, float]] = {
    torch.float32: dict(torch=2.0, rtol=1e-5),
    torch.float64: dict(torch=2.0, rtol=1e-12),
    torch.bfloat16: dict(torch=2.0, rtol=2.0**-8),
    torch.float16: dict(torch=2.0, rtol=2.0**-11),
}
"""The fused linear cross-entropy against ``F.cross_entropy(F.linear(...))``. Its logits and
their gradient are rounded to the dtype like the composition's, but at other points (chunk by
chunk; the weight's gradient summed over the chunks in fp32), so no element-wise bound in
rounding steps holds. The oracle is the composition in fp64 from the same (dtype) values, and
for each tensor::

    max|ours - oracle| <= torch * max|composition in the dtype - oracle| + rtol * max|oracle|

(:func:`linear_ce_allowed_error`). ``rtol``: half a rounding step of bf16 / fp16 at the largest
magnitude, fp32 / fp64 as the losses' table."""

LINEAR_LOG_PROBS_TOLERANCE: dict[torch.dtype, dict[str, float]] = LINEAR_CE_TOLERANCE
"""The fused linear log-probs and entropy (``linear_log_probs``: both outputs and the gradients
of input, weight and bias) against their composition, ``log_softmax(F.linear(...) / T)``: the
linear cross-entropy's contract, the row chosen by the inputs' dtype (the outputs are fp32 for
bf16/fp16 inputs, and the composition's own error is that of its logits in the inputs'
dtype)."""


LINEAR_DISTILLATION_TOLERANCE: dict[torch.dtype, dict[str, float]] = dict(LINEAR_CE_TOLERANCE)
"""The fused linear distillation loss against its composition
(``fusedopt.losses.linear_distillation.linear_distillation_reference``: both heads'
``F.linear``, the divergence in fp32 from the logits), under the linear cross-entropy's
contract and for the same reason (logits rounded at other points, the weight's gradient summed
over chunks in fp32). The divergence is summed from terms that are each ``>= 0`` (see
``fusedopt.kernels.distillation``), which the composition's ``Σ p (log p - log q)`` is not: they
agree to fp32 rounding of the larger of the two sums' terms, which the ``rtol`` row covers."""


def spacing(x: torch.Tensor) -> torch.Tensor:
    """Distance from |x| to the next representable value of x's 16-bit dtype, as float64."""
    mag = x.abs().contiguous()
    up = (mag.view(torch.int16) + 1).view(x.dtype)
    return up.double() - mag.double()


def allowed_error(expected: torch.Tensor, dtype: torch.dtype, table: dict) -> torch.Tensor:
    """Largest ``|ours - expected|`` the contract allows at each element, as float64.

    Args:
        expected: the oracle, any shape (converted to ``dtype``).
        dtype: the dtype of the result under test (selects the row of ``table``).
        table: ``OPTIM_TOLERANCE`` or ``LOSS_TOLERANCE``.
    """
    tol = table[dtype]
    e = expected.detach().to(dtype)
    scale = e.double().abs().max() if e.numel() else torch.zeros((), dtype=torch.float64)
    if "ulps" in tol:  # plus an optional atol (MUON_TOLERANCE)
        return tol["ulps"] * spacing(e) + FP32_NOISE * scale + tol.get("atol", 0.0)
    atol = tol["atol"] if "atol" in tol else tol["rtol"] * scale
    return atol + tol["rtol"] * e.double().abs()


def linear_ce_allowed_error(
    oracle: torch.Tensor, in_dtype: torch.Tensor, dtype: torch.dtype, table: dict = LINEAR_CE_TOLERANCE
) -> float:
    """The largest ``max|ours - oracle|`` :data:`LINEAR_CE_TOLERANCE` (or ``table``, of its
    form: :data:`LINEAR_DISTILLATION_TOLERANCE`) allows for one tensor.

    Args:
        oracle: the composition in fp64, any shape.
        in_dtype: the composition run in ``dtype`` on the same values, ``oracle``'s shape.
        dtype: the dtype of the result under test (selects the row of the table).
        table: the contract's table.
    """
    tol = table[dtype]
    o = oracle.detach().double()
    if o.numel() == 0:
        return 0.0
    finite = o.isfinite()
    own = (in_dtype.detach().double() - o).abs()
    own = torch.where(finite & own.isfinite(), own, torch.zeros((), dtype=own.dtype, device=own.device))
    scale = torch.where(finite, o.abs(), torch.zeros((), dtype=o.dtype, device=o.device))
    return float(tol["torch"] * own.max() + tol["rtol"] * scale.max())


# torch's per-param scalar state (0-d tensors kept in the step counter's dtype whatever the
# param's): never rounded to the param's storage dtype.
SCALAR_STATE = ("step", "mu_product")


@torch.no_grad()
def round_to_storage_(
    optimizer: torch.optim.Optimizer,
    params: list[torch.Tensor],
    dtype: torch.dtype,
    state_dtype: torch.dtype | None = None,
) -> None:
    """Make an fp32 torch optimizer the bf16/fp16 oracle: round its params to ``dtype`` (None:
    keep them) and every state tensor but ``step`` to ``state_dtype`` (default ``dtype``), in
    place, kept in fp32 (the scalar state of :data:`SCALAR_STATE` as it is). Call after
    constructing it (the state torch's Adagrad creates there, ``sum``, is stored in the dtype
    too) and after each step."""
    state_dtype = state_dtype or dtype
    for q in params:
        if dtype is not None:
            q.copy_(q.to(dtype))
        for key, v in optimizer.state.get(q, {}).items():
            if key not in SCALAR_STATE:
                v.copy_(v.to(state_dtype))
