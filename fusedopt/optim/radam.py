"""FusedRAdam: torch.optim.RAdam with a multi-tensor Triton step."""

from __future__ import annotations

import torch

from fusedopt.kernels import radam as kernels
from fusedopt.optim._fused import FusedStep
from fusedopt.optim._plan import Amp, Bucket, StepGrads
from fusedopt.optim._step import Algorithm, adam_hyper, decay_switches, zeros
from fusedopt.optim._torch_compat import capture_health_check
from fusedopt.optim.reference import counted_reference, radam_corrections, radam_reference


def _state(group: dict) -> dict:
    """torch.optim.RAdam's lazy state besides ``step``: ``exp_avg``, ``exp_avg_sq``, zeros."""
    return dict.fromkeys(kernels.COLUMNS[1:], zeros)


def _eager(hyper: dict, flags: dict, bucket: Bucket, grads: StepGrads, amp: Amp, state, storage=None) -> None:
    """Without Triton: the reference (:func:`fusedopt.optim.reference.radam_reference`: torch's
    for-loop order, fp32 math for bf16/fp16) a cache-sized batch at a time, every dtype."""
    h = {k: float(v) for k, v in hyper.items()}  # CPU tensors: no sync to speak of
    counted_reference(
        bucket, amp, storage,
        lambda storage, steps: radam_reference(
            storage, bucket.grads(grads), amp, [radam_corrections(h["beta1"], h["beta2"], t) for t in steps],
            decoupled_weight_decay=flags["DECOUPLED"], maximize=flags["MAXIMIZE"], **h,
        ),
    )  # fmt: skip


RADAM = Algorithm("radam", kernels, _state, adam_hyper, decay_switches, _eager)


class FusedRAdam(FusedStep, torch.optim.RAdam):
    r"""torch.optim.RAdam with a fused multi-tensor Triton step: torch's constructor, defaults,
    validation, ``param_groups``, state (``step``, ``exp_avg``, ``exp_avg_sq``) and
    ``state_dict`` (either loads into the other), plus ``max_grad_norm``
    (:class:`fusedopt.optim._fused.FusedStep`). The decay and moments are Adam's
    (:class:`fusedopt.FusedAdam`; ``decoupled_weight_decay`` as there); then, with :math:`t`
    the param's step count, :math:`\hat m = \gamma\,m / (1-\beta_1^t)` and

    .. math::
        \theta \leftarrow \theta - \hat m\,r_t\,\frac{\sqrt{1-\beta_2^t}}{\sqrt v + \epsilon}
        \text{ where } \rho_t > 5,\qquad \theta \leftarrow \theta - \hat m \text{ otherwise}

    (:math:`\rho_t` and the rectification :math:`r_t` as torch documents them, per tensor in
    fp64). One Triton kernel per device and dtype (fp32 math, fp64 for fp64 params), reading
    p, g, m, v and writing p, m, v: 28 bytes per fp32 element; the per-tensor values are
    computed on the device from the step counts (no host read: ``capturable=True`` captures,
    ``torch.compile`` compiles it), GradScaler's ``grad_scale``/``found_inf`` applied in the
    kernel. CPU tensors without ``TRITON_INTERPRET=1``: :func:`fusedopt.optim.reference.radam_reference`
    (torch's for-loop order; fp32 math for bf16/fp16) on cache-sized batches. ``foreach`` runs the kernel
    too; ``differentiable=True`` runs torch's step.
    """

    algorithm = RADAM

    _before_step = capture_health_check  # as torch's: capture only when capturable
    _check = FusedStep._check_dense
