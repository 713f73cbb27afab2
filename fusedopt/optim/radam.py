"""FusedRAdam: torch.optim.RAdam with a multi-tensor Triton step."""

from __future__ import annotations

import importlib

import torch

from fusedopt.kernels import radam as kernels
from fusedopt.optim._fused import FusedStep
from fusedopt.optim._plan import Amp, Bucket, StepGrads
from fusedopt.optim._step import Algorithm
from fusedopt.optim._torch_compat import capture_health_check
from fusedopt.optim.reference import radam_corrections, radam_reference, torch_or_reference

_torch_radam = importlib.import_module("torch.optim.radam")


def _state(group: dict) -> dict:
    """torch.optim.RAdam's lazy state besides ``step``: ``exp_avg``, ``exp_avg_sq``, zeros."""
    return dict.fromkeys(
        kernels.COLUMNS[1:], lambda p: torch.zeros_like(p, memory_format=torch.preserve_format)
    )


def _hyper(group: dict) -> dict:
    beta1, beta2 = group["betas"]
    return dict(
        lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"]
    )


def _switches(group: dict) -> dict:
    return dict(
        MAXIMIZE=bool(group["maximize"]),
        DECOUPLED=bool(group["decoupled_weight_decay"]),
        HAS_WD=bool(group["weight_decay"] != 0),
    )


def _eager(hyper: dict, flags: dict, bucket: Bucket, grads: StepGrads, amp: Amp, state, storage=None) -> None:
    """Without Triton: torch's for-loop RAdam for fp32/fp64 (it has no fused one, and its
    foreach one is no faster on CPU); for bf16/fp16 and the low-precision options the fp32-math
    reference on working copies."""
    params, exp_avgs, exp_avg_sqs, _ = bucket.columns  # the last: the precision column
    h = {k: float(v) for k, v in hyper.items()}  # CPU tensors: no sync to speak of
    maximize, decoupled = flags["MAXIMIZE"], flags["DECOUPLED"]
    torch_or_reference(
        bucket, bucket.grads(grads), amp, storage,
        lambda mine: _torch_radam.radam(
            params, mine, exp_avgs, exp_avg_sqs, bucket.counters, foreach=False, maximize=maximize,
            decoupled_weight_decay=decoupled, **h,
        ),
        lambda storage, steps: radam_reference(
            storage, bucket.grads(grads), amp, [radam_corrections(h["beta1"], h["beta2"], t) for t in steps],
            decoupled_weight_decay=decoupled, maximize=maximize, **h,
        ),
    )  # fmt: skip


RADAM = Algorithm("radam", kernels, _state, _hyper, _switches, _eager)


class FusedRAdam(FusedStep, torch.optim.RAdam):
    r"""torch.optim.RAdam with a fused multi-tensor Triton step.

    Same constructor, defaults, validation, ``param_groups``, state (``step``, ``exp_avg``,
    ``exp_avg_sq``) and ``state_dict`` as :class:`torch.optim.RAdam`; a state dict of either
    loads into the other. One extension: ``max_grad_norm`` (keyword-only, see
    :class:`fusedopt.optim._fused.FusedStep`) clips the global gradient norm inside the step.
    For each param, with :math:`t` its own step count:

    .. math::
        g &\leftarrow \pm\nabla f(\theta) \;(-\text{ if maximize}),\quad
        g \leftarrow g + \lambda\theta \text{ (L2) or } \theta \leftarrow \theta(1-\gamma\lambda)
        \text{ (decoupled)}\\
        m &\leftarrow \operatorname{lerp}(m, g, 1-\beta_1),\quad
        v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
        \hat m \leftarrow \gamma\,m / (1-\beta_1^t)\\
        \theta &\leftarrow \theta - \hat m\,r_t\,\frac{\sqrt{1-\beta_2^t}}{\sqrt v + \epsilon}
        \text{ where } \rho_t > 5,\qquad \theta \leftarrow \theta - \hat m \text{ otherwise}

    (:math:`\rho_t` and the rectification :math:`r_t` as in torch's documentation, per tensor
    in fp64.) The step runs one Triton kernel per device and dtype (fp32 math, fp64 for fp64
    params, params and state stored in the param's dtype), reading p, g, m, v and writing p, m,
    v: 28 bytes per fp32 element. CUDA tensors use the compiled kernel; CPU tensors the same
    kernel under ``TRITON_INTERPRET=1``, else torch's for-loop RAdam (fp32/fp64) or the
    fp32-math reference (:func:`fusedopt.optim.reference.radam_reference`, bf16/fp16).

    The per-tensor values are computed in the kernel from the step counts, which live on the
    param's device, and hyper-parameters are read on the device, so a step makes no host read
    and can be captured in a CUDA graph (``capturable=True``, as torch requires) and compiled
    with ``torch.compile``. GradScaler's ``grad_scale``/``found_inf`` are applied in the kernel
    (unscale; skip the step and keep ``step`` when an inf was found) without a host sync.
    ``foreach=True``/``False`` run the kernel too; ``differentiable=True`` runs torch's own
    implementation (RAdam has no ``fused`` argument).
    """

    algorithm = RADAM

    def _before_step(self) -> None:
        capture_health_check(self)  # as torch.optim.RAdam: capture only when capturable

    _check = FusedStep._check_dense
