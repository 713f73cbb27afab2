"""FusedNAdam: torch.optim.NAdam with a multi-tensor Triton step."""

from __future__ import annotations

import torch

from fusedopt.kernels import nadam as kernels
from fusedopt.optim._fused import FusedStep
from fusedopt.optim._plan import Amp, Bucket, StepGrads
from fusedopt.optim._step import Algorithm, adam_hyper, decay_switches, zeros
from fusedopt.optim._torch_compat import capture_health_check
from fusedopt.optim.reference import counted_reference, nadam_coefficients, nadam_reference


def _state(group: dict) -> dict:
    """torch.optim.NAdam's lazy state besides ``step`` and ``mu_product`` (the kernel module's
    ``CARRIED``): ``exp_avg``, ``exp_avg_sq``, zeros."""
    return dict.fromkeys(kernels.COLUMNS[1:], zeros)


def _hyper(group: dict) -> dict:
    return {**adam_hyper(group), "momentum_decay": group["momentum_decay"]}


def _eager(hyper: dict, flags: dict, bucket: Bucket, grads: StepGrads, amp: Amp, state, storage=None) -> None:
    """Without Triton: the reference (:func:`fusedopt.optim.reference.nadam_reference`: torch's
    for-loop order, fp32 math for bf16/fp16) a cache-sized batch at a time, every dtype;
    ``mu_product`` advanced by torch's own op first."""
    h = {k: float(v) for k, v in hyper.items()}  # CPU tensors: no sync to speak of
    mu = {k: h[k] for k in ("lr", "beta1", "beta2", "momentum_decay")}
    del h["momentum_decay"]
    counted_reference(
        bucket, amp, storage,
        lambda storage, steps: nadam_reference(
            storage, bucket.grads(grads), amp,
            [nadam_coefficients(c, t, **mu) for c, t in zip(bucket.carried, steps, strict=True)],
            decoupled_weight_decay=flags["DECOUPLED"], maximize=flags["MAXIMIZE"], **h,
        ),
    )  # fmt: skip


NADAM = Algorithm("nadam", kernels, _state, _hyper, decay_switches, _eager)


class FusedNAdam(FusedStep, torch.optim.NAdam):
    r"""torch.optim.NAdam with a fused multi-tensor Triton step: torch's constructor, defaults,
    validation, ``param_groups``, state (``step``, ``mu_product``, ``exp_avg``,
    ``exp_avg_sq``) and ``state_dict`` (either loads into the other), plus ``max_grad_norm``
    (:class:`fusedopt.optim._fused.FusedStep`). The decay and moments are Adam's
    (:class:`fusedopt.FusedAdam`; ``decoupled_weight_decay`` as there); then, with :math:`t`
    the param's step count and :math:`\mu_t = \beta_1(1 - 0.96^{t\psi}/2)` (:math:`\psi`:
    ``momentum_decay``), ``mu_product`` :math:`\Pi_t = \Pi_{t-1}\mu_t` and

    .. math::
        \theta \leftarrow \theta - \gamma\,\frac{1-\mu_t}{1-\Pi_t}\,\frac{g}{d}
        - \gamma\,\frac{\mu_{t+1}}{1-\Pi_t\mu_{t+1}}\,\frac{m}{d},\qquad
        d = \sqrt{v / (1-\beta_2^t)} + \epsilon

    One Triton kernel per device and dtype (fp32 math, fp64 for fp64 params), reading p, g,
    m, v and writing p, m, v: 28 bytes per fp32 element. ``mu_product`` stays torch's 0-d
    tensor per param (the step counter's dtype, on the param's device as the counter): the
    launch's ``prepare`` multiplies it by :math:`\mu_t` on the device, once per tensor, and
    computes the two coefficients from it, so a step makes no host read (``capturable=True``
    captures, ``torch.compile`` compiles it); GradScaler's ``grad_scale``/``found_inf`` are
    applied in the kernel (a skipped step advances neither ``step`` nor ``mu_product``). CPU
    tensors without ``TRITON_INTERPRET=1``: :func:`fusedopt.optim.reference.nadam_reference`
    (torch's for-loop order; fp32 math for bf16/fp16) on cache-sized batches. ``foreach`` runs the kernel
    too; ``differentiable=True`` runs torch's step.
    """

    algorithm = NADAM

    _before_step = capture_health_check  # as torch's: capture only when capturable
    _check = FusedStep._check_dense
