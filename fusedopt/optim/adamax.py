"""FusedAdamax: torch.optim.Adamax with a multi-tensor Triton step."""

from __future__ import annotations

import torch

from fusedopt.kernels import adamax as kernels
from fusedopt.optim._fused import FusedStep
from fusedopt.optim._plan import Amp, Bucket, StepGrads
from fusedopt.optim._step import Algorithm, adam_hyper, zeros
from fusedopt.optim._torch_compat import capture_health_check
from fusedopt.optim.reference import adamax_reference, counted_reference


def _state(group: dict) -> dict:
    """torch.optim.Adamax's lazy state besides ``step``: ``exp_avg``, ``exp_inf``, zeros."""
    return dict.fromkeys(kernels.COLUMNS[1:], zeros)


def _switches(group: dict) -> dict:
    return dict(MAXIMIZE=bool(group["maximize"]), HAS_WD=bool(group["weight_decay"] != 0))


def _eager(hyper: dict, flags: dict, bucket: Bucket, grads: StepGrads, amp: Amp, state, storage=None) -> None:
    """Without Triton: the reference (:func:`fusedopt.optim.reference.adamax_reference`: torch's
    for-loop order, fp32 math for bf16/fp16) a cache-sized batch at a time, every dtype."""
    h = {k: float(v) for k, v in hyper.items()}  # CPU tensors: no sync to speak of
    lr, beta1 = h.pop("lr"), h["beta1"]
    counted_reference(
        bucket, amp, storage,
        lambda storage, steps: adamax_reference(
            storage, bucket.grads(grads), amp, [lr / (1 - beta1**t) for t in steps], maximize=flags["MAXIMIZE"], **h
        ),
    )  # fmt: skip


ADAMAX = Algorithm("adamax", kernels, _state, adam_hyper, _switches, _eager)


class FusedAdamax(FusedStep, torch.optim.Adamax):
    r"""torch.optim.Adamax with a fused multi-tensor Triton step.

    Same constructor, defaults, validation, ``param_groups``, state (``step``, ``exp_avg``,
    ``exp_inf``) and ``state_dict`` as :class:`torch.optim.Adamax`; a state dict of either
    loads into the other. One extension: ``max_grad_norm`` (keyword-only, see
    :class:`fusedopt.optim._fused.FusedStep`) clips the global gradient norm inside the step.
    For each param, with :math:`t` its own step count:

    .. math::
        g &\leftarrow \pm\nabla f(\theta) + \lambda\theta \;(-\text{ if maximize}),\qquad
        m \leftarrow \operatorname{lerp}(m, g, 1-\beta_1),\qquad
        u \leftarrow \max(\beta_2 u, |g| + \epsilon)\\
        \theta &\leftarrow \theta - \frac{\gamma}{1-\beta_1^t}\,\frac{m}{u}

    The step runs one Triton kernel per device and dtype (fp32 math, fp64 for fp64 params,
    params and state stored in the param's dtype), reading p, g, m, u and writing p, m, u:
    28 bytes per fp32 element. CUDA tensors use the compiled kernel; CPU tensors the same
    kernel under ``TRITON_INTERPRET=1``, else the reference in torch's for-loop order
    (:func:`fusedopt.optim.reference.adamax_reference`; fp32 math for bf16/fp16) on
    cache-sized batches, faster than torch's own CPU steps.

    The bias correction is computed in the kernel from the step counts, which live on the
    param's device, and hyper-parameters are read on the device, so a step makes no host read
    and can be captured in a CUDA graph (``capturable=True``, as torch requires) and compiled
    with ``torch.compile``. GradScaler's ``grad_scale``/``found_inf`` are applied in the kernel
    (unscale; skip the step and keep ``step`` when an inf was found) without a host sync.
    ``foreach=True``/``False`` run the kernel too; ``differentiable=True`` runs torch's own
    implementation (Adamax has no ``fused`` argument).
    """

    algorithm = ADAMAX

    _before_step = capture_health_check  # as torch's: capture only when capturable
    _check = FusedStep._check_dense
