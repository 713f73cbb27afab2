"""FusedSGD: torch.optim.SGD with a multi-tensor Triton step."""

from __future__ import annotations

import importlib

import torch

from fusedopt.kernels import sgd as kernels
from fusedopt.optim._fused import FusedStep
from fusedopt.optim._plan import Amp, Bucket, StepGrads
from fusedopt.optim._step import Algorithm
from fusedopt.optim._torch_compat import check_fused_device_dtype
from fusedopt.optim.reference import Storage, dense_cpu_fused_ok, eager_grads, sgd_reference, skipped

# torch.optim does not export the module name on every version.
_torch_sgd = importlib.import_module("torch.optim.sgd")


def _state(group: dict) -> dict:
    """The momentum buffer (torch creates it from the first grad; we create it zeroed and count
    the steps it has taken: the kernel takes the grad as the buffer on its first)."""
    if group["momentum"] == 0:
        return {}
    return {"momentum_buffer": lambda p: torch.zeros_like(p, memory_format=torch.preserve_format)}


def _hyper(group: dict) -> dict:
    return {k: group[k] for k in kernels.SCALARS}


def _switches(group: dict) -> dict:
    wd = group["weight_decay"]
    return dict(
        HAS_MOMENTUM=group["momentum"] != 0,
        NESTEROV=group["nesterov"],
        MAXIMIZE=group["maximize"],
        HAS_WD=isinstance(wd, torch.Tensor) or wd != 0,
    )


def _torch_functional(params, grads, buffers, hyper: dict, flags: dict, **how) -> None:
    _torch_sgd.sgd(
        params, grads, buffers, weight_decay=hyper["weight_decay"], momentum=hyper["momentum"],
        lr=hyper["lr"], dampening=hyper["dampening"], nesterov=flags["NESTEROV"],
        maximize=flags["MAXIMIZE"], **how,
    )  # fmt: skip


def _eager(
    hyper: dict,
    flags: dict,
    bucket: Bucket,
    grads: StepGrads,
    amp: Amp,
    state,
    storage: Storage | None = None,
) -> None:
    """Without Triton: sparse grads and integer params run torch's for-loop SGD (its behaviour
    for them; GradScaler's skip read on the host, as torch's own path does); other CPU tensors
    torch's fused CPU SGD where it is right, its for-loop SGD for other fp32/fp64 layouts; for
    bf16/fp16 and the low-precision options (``storage``: see
    ``fusedopt.optim._precision.eager_step``) the fp32-math reference on working copies."""
    momentum = flags["HAS_MOMENTUM"]
    if not bucket.walkable:
        mine = eager_grads(bucket.grads(grads), amp, fused=False)
        if mine is None:
            return
        params = bucket.params
        buffers = [state[p].get("momentum_buffer") for p in params] if momentum else []
        _torch_functional(params, mine, buffers, hyper, flags, has_sparse_grad=any(g.is_sparse for g in mine))
        for p, b in zip(params, buffers, strict=False):
            state[p]["momentum_buffer"] = b
        return
    # Once a step was taken no buffer of the bucket is new again (a new plan starts over).
    taken = bucket.memo.get("taken", 0)
    fresh = [not taken and c.item() == 0 for c in bucket.counters]
    params, buffers, _ = bucket.columns  # the last: the precision column
    mine = bucket.grads(grads)
    hyper = {k: float(v) for k, v in hyper.items()}  # CPU tensors: no sync to speak of
    if storage is None and bucket.dtype in (torch.float32, torch.float64):
        fused = dense_cpu_fused_ok(bucket, mine) and not any(fresh)
        mine = eager_grads(mine, amp, fused)
        if mine is None:
            return
        given = [None if f else b for f, b in zip(fresh, buffers, strict=True)] if momentum else []
        _torch_functional(
            params, mine, given, hyper, flags, foreach=False, fused=fused,
            grad_scale=amp.grad_scale if fused else None, found_inf=amp.found_inf if fused else None,
        )  # fmt: skip
        for f, b, new in zip(fresh, buffers, given, strict=False):
            if f:
                b.copy_(new)
    else:
        if skipped(amp.found_inf):
            return
        storage = storage or Storage(bucket)
        sgd_reference(
            storage, mine, amp, fresh if momentum else [False] * len(params), nesterov=flags["NESTEROV"],
            maximize=flags["MAXIMIZE"], fused=storage.fused(mine) and not any(fresh), **hyper,
        )  # fmt: skip
    if momentum:
        torch._foreach_add_(bucket.counters, 1)
        bucket.memo["taken"] = taken + 1


SGD = Algorithm(
    "sgd", kernels, _state, _hyper, _switches, _eager, counter=None, saturates=2,
    optional=frozenset({"momentum_buffer"}),
)  # fmt: skip


class FusedSGD(FusedStep, torch.optim.SGD):
    r"""torch.optim.SGD with a fused multi-tensor Triton step.

    Same constructor, defaults, validation, ``param_groups``, state (``momentum_buffer``, only
    when ``momentum != 0``) and ``state_dict`` as :class:`torch.optim.SGD`, plus the keyword-only
    ``max_grad_norm`` (see :class:`fusedopt.optim._fused.FusedStep`). Per param:

    .. math::
        g &\leftarrow \pm\nabla f(\theta) + \lambda\theta,\qquad
        b \leftarrow g \text{ (first step)},\;\; b \leftarrow \mu b + (1-\tau) g \text{ (later)}\\
        g &\leftarrow g + \mu b \text{ (nesterov) or } b,\qquad \theta \leftarrow \theta - \gamma g

    One Triton kernel per device and dtype reads p, g, b and writes p, b: 20 bytes per fp32
    element with momentum (12 without). Sparse gradients and integer params run torch's own SGD
    (its behaviour for them). ``fused=False``, ``foreach=True`` or ``differentiable=True`` run
    torch's own implementation. GradScaler's ``grad_scale`` and ``found_inf`` are applied in
    the kernel whatever ``fused`` says (unscale; skip on inf, without a host sync).
    """

    algorithm = SGD

    def _check(self, p: torch.Tensor, g: torch.Tensor, group: dict) -> None:
        if group["fused"] and not self.state.get(p):
            check_fused_device_dtype(p)
