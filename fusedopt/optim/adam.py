"""FusedAdam and FusedAdamW: torch.optim.Adam / AdamW with a multi-tensor Triton step."""

from __future__ import annotations

import importlib

import torch

from fusedopt.kernels import adam as kernels
from fusedopt.optim._fused import FusedStep
from fusedopt.optim._plan import Amp, Bucket, StepGrads
from fusedopt.optim._step import Algorithm, adam_hyper, zeros
from fusedopt.optim._torch_compat import (
    capture_health_check,
    check_capturable_device,
    check_fused_device_dtype,
)
from fusedopt.optim.reference import Storage, adam_reference, dense_cpu_fused_ok, eager_grads, skipped

_torch_adam = importlib.import_module("torch.optim.adam")


def _state(group: dict) -> dict:
    """torch.optim.Adam's lazy state after ``step``: its keys and initial values."""
    out = {"exp_avg": zeros, "exp_avg_sq": zeros}
    if group["amsgrad"]:
        out["max_exp_avg_sq"] = zeros
    return out


def _switches(group: dict) -> dict:
    return dict(
        AMSGRAD=group["amsgrad"],
        MAXIMIZE=group["maximize"],
        DECOUPLED=group["decoupled_weight_decay"],
        HAS_WD=group["weight_decay"] != 0,
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
    """Without Triton: torch's fused CPU Adam where it is right, its for-loop Adam for other
    fp32/fp64 layouts. bf16/fp16 (torch's for-loop computes those in bf16): torch's fused CPU
    Adam in fp32, each result rounded once (on the tensors themselves where their layouts
    allow, else on fp32 working copies); the low-precision options (``storage``: see
    ``fusedopt.optim._precision.eager_step``): torch's fp32 step on working copies, fused
    where the fp32 copies would share a dense layout."""
    params, exp_avgs, exp_avg_sqs, vmax, _ = bucket.columns  # the last: the precision column
    mine = bucket.grads(grads)
    hyper = {k: float(v) for k, v in hyper.items()}  # CPU tensors: no sync to speak of
    if storage is None and bucket.dtype in (torch.float32, torch.float64):
        fused = dense_cpu_fused_ok(bucket, mine)
        mine = eager_grads(mine, amp, fused)
        if mine is None:
            return
        _torch_adam.adam(
            params, mine, exp_avgs, exp_avg_sqs, vmax if flags["AMSGRAD"] else [], bucket.counters,
            foreach=False, fused=fused, grad_scale=amp.grad_scale if fused else None,
            found_inf=amp.found_inf if fused else None, amsgrad=flags["AMSGRAD"], beta1=hyper["beta1"],
            beta2=hyper["beta2"], lr=hyper["lr"], weight_decay=hyper["weight_decay"], eps=hyper["eps"],
            maximize=flags["MAXIMIZE"], decoupled_weight_decay=flags["DECOUPLED"],
        )  # fmt: skip
        return
    if skipped(amp.found_inf):
        return
    storage = storage or Storage(bucket)
    torch._foreach_add_(bucket.counters, 1)
    beta1, beta2 = hyper["beta1"], hyper["beta2"]
    adam_reference(
        storage, mine, amp, [(1 - beta1**t, (1 - beta2**t) ** 0.5) for t in torch.stack(bucket.counters).tolist()],
        amsgrad=flags["AMSGRAD"], lr=hyper["lr"], beta1=beta1, beta2=beta2, eps=hyper["eps"],
        weight_decay=hyper["weight_decay"], decoupled_weight_decay=flags["DECOUPLED"], maximize=flags["MAXIMIZE"],
        fused=not storage.options or storage.fused(mine), steps=bucket.counters,
    )  # fmt: skip


ADAM = Algorithm("adam", kernels, _state, adam_hyper, _switches, _eager)


class FusedAdam(FusedStep, torch.optim.Adam):
    r"""torch.optim.Adam with a fused multi-tensor Triton step.

    Same constructor, defaults, validation, ``param_groups``, state (``step``, ``exp_avg``,
    ``exp_avg_sq``, ``max_exp_avg_sq``) and ``state_dict`` as :class:`torch.optim.Adam`; a state
    dict of either loads into the other. One extension: ``max_grad_norm`` (keyword-only, see
    :class:`fusedopt.optim._fused.FusedStep`) clips the global gradient norm inside the step.
    For each param, with :math:`t` its own step count:

    .. math::
        g &\leftarrow \pm\nabla f(\theta) \;(-\text{ if maximize}),\quad
        g \leftarrow g + \lambda\theta \text{ (L2) or } \theta \leftarrow \theta(1-\gamma\lambda)
        \text{ (decoupled)}\\
        m &\leftarrow \operatorname{lerp}(m, g, 1-\beta_1),\quad
        v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
        \hat v \leftarrow \max(\hat v, v) \text{ (amsgrad)}\\
        \theta &\leftarrow \theta - \frac{\gamma}{1-\beta_1^t}\,
        \frac{m}{\sqrt{v\text{ or }\hat v}/\sqrt{1-\beta_2^t} + \epsilon}

    The step runs one Triton kernel per device and dtype (fp32 math, fp64 for fp64 params,
    params and state stored in the param's dtype), reading p, g, m, v and writing p, m, v:
    28 bytes per fp32 element. CUDA tensors use the compiled kernel; CPU tensors the same
    kernel under ``TRITON_INTERPRET=1``, else the identical algorithm in plain torch
    (:func:`fusedopt.optim.reference.adam_reference`).

    The bias corrections are computed in the kernel from the step counts, and hyper-parameters
    are read on the device, so a step makes no host read and can be captured in a CUDA graph
    (``capturable=True``, as torch requires) and compiled with ``torch.compile``.

    Flags: ``fused=None`` (default) or ``True`` runs our kernel (``True`` also keeps ``step`` on
    the param's device as float32, as torch's fused Adam does). Either way GradScaler's
    ``grad_scale``/``found_inf`` are applied in the kernel (unscale; skip the step and keep
    ``step`` when an inf was found) without a host sync. ``fused=False``, ``foreach=True`` or
    ``differentiable=True`` run torch's own implementation. ``capturable=True`` keeps ``step``
    on the param's device.
    """

    algorithm = ADAM

    def _before_step(self) -> None:
        capture_health_check(self)  # as torch.optim.Adam: capture only when capturable

    def _check(self, p: torch.Tensor, g: torch.Tensor, group: dict) -> None:
        if g.is_sparse:
            # torch's message, word for word (AdamW's step is Adam's)
            raise RuntimeError("Adam does not support sparse gradients, please consider SparseAdam instead")
        self._refuse_integer(p)
        if group["capturable"]:
            check_capturable_device(p)
        if group["fused"] and not self.state.get(p):
            check_fused_device_dtype(p)


class FusedAdamW(FusedAdam, torch.optim.AdamW):
    r"""torch.optim.AdamW with a fused multi-tensor Triton step.

    :class:`FusedAdam` with decoupled weight decay
    (:math:`\theta \leftarrow \theta(1 - \gamma\lambda)` before the Adam update) and AdamW's
    defaults (``weight_decay=1e-2``); constructor, state and ``state_dict`` as
    :class:`torch.optim.AdamW` (the method order puts AdamW's ``__init__`` first).
    """
