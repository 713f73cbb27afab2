"""FusedAdadelta: torch.optim.Adadelta with a multi-tensor Triton step."""

from __future__ import annotations

import torch

from fusedopt.kernels import adadelta as kernels
from fusedopt.optim._fused import FusedStep
from fusedopt.optim._step import Algorithm, zeros
from fusedopt.optim._torch_compat import capture_health_check
from fusedopt.optim.reference import adadelta_reference, scalar_reference


def _state(group: dict) -> dict:
    """torch.optim.Adadelta's lazy state besides ``step``: ``square_avg``, ``acc_delta``, zeros."""
    return dict.fromkeys(kernels.COLUMNS[1:], zeros)


def _hyper(group: dict) -> dict:
    return {k: group[k] for k in kernels.SCALARS}


def _switches(group: dict) -> dict:
    return dict(MAXIMIZE=bool(group["maximize"]), HAS_WD=bool(group["weight_decay"] != 0))


ADADELTA = Algorithm("adadelta", kernels, _state, _hyper, _switches, scalar_reference(adadelta_reference))


class FusedAdadelta(FusedStep, torch.optim.Adadelta):
    r"""torch.optim.Adadelta with a fused multi-tensor Triton step.

    Same constructor, defaults, validation, ``param_groups``, state (``step``, ``square_avg``,
    ``acc_delta``) and ``state_dict`` as :class:`torch.optim.Adadelta`; a state dict of either
    loads into the other. One extension: ``max_grad_norm`` (keyword-only, see
    :class:`fusedopt.optim._fused.FusedStep`) clips the global gradient norm inside the step.
    For each param:

    .. math::
        g &\leftarrow \pm\nabla f(\theta) + \lambda\theta \;(-\text{ if maximize}),\qquad
        v \leftarrow \rho v + (1-\rho) g^2\\
        \Delta &\leftarrow \frac{\sqrt{u + \epsilon}}{\sqrt{v + \epsilon}}\,g,\qquad
        u \leftarrow \rho u + (1-\rho)\Delta^2,\qquad
        \theta \leftarrow \theta - \gamma\Delta

    (:math:`v` is ``square_avg``, :math:`u` ``acc_delta``.) The step runs one Triton kernel per
    device and dtype (fp32 math, fp64 for fp64 params, params and state stored in the param's
    dtype), reading p, g, v, u and writing p, v, u: 28 bytes per fp32 element. CUDA tensors use
    the compiled kernel; CPU tensors the same kernel under ``TRITON_INTERPRET=1``, else the
    reference in torch's for-loop order (:func:`fusedopt.optim.reference.adadelta_reference`;
    fp32 math for bf16/fp16, every dtype) on cache-sized batches.

    Hyper-parameters are read on the device, so a step makes no host read and can be captured
    in a CUDA graph (``capturable=True``, as torch requires) and compiled with
    ``torch.compile``. GradScaler's ``grad_scale``/``found_inf`` are applied in the kernel
    (unscale; skip the step and keep ``step`` when an inf was found) without a host sync.
    ``foreach=True``/``False`` run the kernel too; ``differentiable=True`` runs torch's own
    implementation (Adadelta has no ``fused`` argument).
    """

    algorithm = ADADELTA

    _before_step = capture_health_check  # as torch's: capture only when capturable
    _check = FusedStep._check_dense
