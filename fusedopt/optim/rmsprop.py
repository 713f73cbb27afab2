"""FusedRMSprop: torch.optim.RMSprop with a multi-tensor Triton step."""

from __future__ import annotations

import importlib

import torch

from fusedopt.kernels import rmsprop as kernels
from fusedopt.optim._fused import FusedStep
from fusedopt.optim._plan import Amp, Bucket, StepGrads
from fusedopt.optim._step import Algorithm
from fusedopt.optim._torch_compat import capture_health_check
from fusedopt.optim.reference import Storage, eager_grads, rmsprop_reference, skipped

_torch_rmsprop = importlib.import_module("torch.optim.rmsprop")


def _zeros(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(p, memory_format=torch.preserve_format)


def _state(group: dict) -> dict:
    """torch.optim.RMSprop's lazy state after ``step``: its keys and initial values."""
    out = {"square_avg": _zeros}
    if group["momentum"] > 0:
        out["momentum_buffer"] = _zeros
    if group["centered"]:
        out["grad_avg"] = _zeros
    return out


def _hyper(group: dict) -> dict:
    return {k: group[k] for k in kernels.SCALARS}


def _switches(group: dict) -> dict:
    return dict(
        CENTERED=bool(group["centered"]),
        HAS_MOMENTUM=bool(group["momentum"] > 0),
        MAXIMIZE=bool(group["maximize"]),
        HAS_WD=bool(group["weight_decay"] != 0),
    )


def _eager(
    hyper: dict,
    flags: dict,
    bucket: Bucket,
    grads: StepGrads,
    amp: Amp,
    state,
    storage: Storage | None = None,
) -> None:
    """Without Triton: torch's for-loop RMSprop for fp32/fp64 (torch has no fused RMSprop, and
    its foreach one is slower on CPU); for bf16/fp16 (torch computes those in bf16) and the
    low-precision options (``storage``: see ``fusedopt.optim._precision.eager_step``) the
    fp32-math reference on working copies."""
    params, square_avgs, buffers, grad_avgs, _ = bucket.columns  # the last: the precision column
    hyper = {k: float(v) for k, v in hyper.items()}  # CPU tensors: no sync to speak of
    if storage is None and bucket.dtype in (torch.float32, torch.float64):
        mine = eager_grads(bucket.grads(grads), amp, fused=False)
        if mine is None:
            return
        _torch_rmsprop.rmsprop(
            params, mine, square_avgs, grad_avgs if flags["CENTERED"] else [],
            buffers if flags["HAS_MOMENTUM"] else [], bucket.counters, foreach=False,
            maximize=flags["MAXIMIZE"], centered=flags["CENTERED"], **hyper,
        )  # fmt: skip
        return
    if skipped(amp.found_inf):
        return
    torch._foreach_add_(bucket.counters, 1)
    rmsprop_reference(
        storage or Storage(bucket), bucket.grads(grads), amp, centered=flags["CENTERED"],
        maximize=flags["MAXIMIZE"], **hyper,
    )  # fmt: skip


RMSPROP = Algorithm("rmsprop", kernels, _state, _hyper, _switches, _eager)


class FusedRMSprop(FusedStep, torch.optim.RMSprop):
    r"""torch.optim.RMSprop with a fused multi-tensor Triton step.

    Same constructor, defaults, validation, ``param_groups``, state (``step``, ``square_avg``,
    ``momentum_buffer`` when ``momentum > 0``, ``grad_avg`` when ``centered``) and
    ``state_dict`` as :class:`torch.optim.RMSprop`; a state dict of either loads into the other.
    One extension: ``max_grad_norm`` (keyword-only, see
    :class:`fusedopt.optim._fused.FusedStep`) clips the global gradient norm inside the step.
    Per param:

    .. math::
        g &\leftarrow \pm\nabla f(\theta) + \lambda\theta \;(-\text{ if maximize}),\qquad
        v \leftarrow \alpha v + (1-\alpha) g^2\\
        \bar g &\leftarrow \operatorname{lerp}(\bar g, g, 1-\alpha),\;\;
        d \leftarrow \sqrt{v - \bar g^2} + \epsilon \text{ (centered)},\qquad
        d \leftarrow \sqrt{v} + \epsilon \text{ (otherwise)}\\
        b &\leftarrow \mu b + g/d,\;\; \theta \leftarrow \theta - \gamma b \text{ (momentum)},\qquad
        \theta \leftarrow \theta - \gamma g/d \text{ (otherwise)}

    The step runs one Triton kernel per device and dtype (fp32 math, fp64 for fp64 params,
    params and state stored in the param's dtype), reading p, g, v and writing p, v: 20 bytes
    per fp32 element, plus 8 for each of the momentum buffer and the centered average. CUDA
    tensors use the compiled kernel; CPU tensors the same kernel under ``TRITON_INTERPRET=1``,
    else torch's for-loop RMSprop (fp32/fp64) or the fp32-math reference
    (:func:`fusedopt.optim.reference.rmsprop_reference`, bf16/fp16).

    ``step`` lives on the param's device and hyper-parameters are read on the device, so a step
    makes no host read and can be captured in a CUDA graph (``capturable=True``, as torch
    requires) and compiled with ``torch.compile``. GradScaler's ``grad_scale``/``found_inf`` are
    applied in the kernel (unscale; skip the step and keep ``step`` when an inf was found)
    without a host sync. ``foreach=True`` or ``differentiable=True`` run torch's own
    implementation (RMSprop has no ``fused`` argument).
    """

    algorithm = RMSPROP

    def _before_step(self) -> None:
        capture_health_check(self)  # as torch.optim.RMSprop: capture only when capturable

    _check = FusedStep._check_dense
