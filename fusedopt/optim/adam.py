"""FusedAdam and FusedAdamW: torch.optim.Adam / AdamW with a multi-tensor Triton step."""

from __future__ import annotations

import torch
from torch.optim.optimizer import _device_dtype_check_for_fused, _get_scalar_dtype

from fusedopt._multi_tensor import TL_DTYPE, to_device
from fusedopt.kernels import adam as kernels
from fusedopt.optim._fused import Bucket, FusedStep, StepGrads, op_buckets, real_view
from fusedopt.optim.reference import adam_reference


def adam_launch(group: dict, bucket: Bucket, grads: StepGrads, steps: torch.Tensor, amp: dict) -> None:
    """Step one bucket: ``steps`` holds each tensor's step count, already advanced."""
    beta1, beta2 = group["betas"]
    scalars = bucket.scalars([group["lr"], beta1, beta2, group["eps"], group["weight_decay"]])
    if bucket.kind == "triton":
        bucket.launch(
            grads,
            kernels.adam_kernel,
            amp,
            scalars,
            to_device(steps, bucket.device),
            AMSGRAD=group["amsgrad"],
            MAXIMIZE=group["maximize"],
            DECOUPLED=group["decoupled_weight_decay"],
            HAS_WD=group["weight_decay"] != 0,
        )
    else:
        lr, beta1, beta2, eps, weight_decay = scalars.tolist()
        params, exp_avgs, exp_avg_sqs, vmax = bucket.columns
        adam_reference(
            params,
            bucket.grads(grads),
            exp_avgs,
            exp_avg_sqs,
            vmax if group["amsgrad"] else None,
            [(1 - beta1**t, (1 - beta2**t) ** 0.5) for t in steps.tolist()],
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=group["decoupled_weight_decay"],
            maximize=group["maximize"],
            **amp,
        )


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

    def _before_step(self) -> None:
        # As torch.optim.Adam: refuse CUDA-graph capture unless capturable (older torch names it
        # _cuda_graph_capture_health_check).
        check = getattr(self, "_accelerator_graph_capture_health_check", None)
        (check or self._cuda_graph_capture_health_check)()

    def _check(self, p: torch.Tensor, g: torch.Tensor, group: dict) -> None:
        name = type(self).__name__
        if g.is_sparse:
            raise RuntimeError(
                f"{name} does not support sparse gradients, please consider SparseAdam instead"
            )
        if real_view(p).dtype not in TL_DTYPE:
            raise NotImplementedError(
                f"{name} steps floating-point or complex params (fp32, fp64, fp16, bf16); got {p.dtype}"
            )
        if group["fused"] and not self.state.get(p):
            _device_dtype_check_for_fused(p)

    def _operands(self, p: torch.Tensor, group: dict, memo: dict):
        state = self.state[p]
        if len(state) == 0:  # lazy state initialization, exactly as torch.optim.Adam
            on_device = group["capturable"] or group["fused"]
            state["step"] = (
                torch.zeros((), dtype=_get_scalar_dtype(is_fused=group["fused"]), device=p.device)
                if on_device
                else torch.tensor(0.0, dtype=_get_scalar_dtype())
            )
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        vmax = state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"]
        return [state["exp_avg"], state["exp_avg_sq"], vmax], state["step"]

    def _step_counters(self, bucket: Bucket) -> torch.Tensor | None:
        """One tensor whose elements are the bucket's ``state["step"]`` tensors, or None.

        On a bucket's first run its step counters become 0-d views of one tensor (same values,
        dtype and device; state_dict() and checkpoints are unchanged), so a single op advances
        them all instead of one op per param. A plan is rebuilt after load_state_dict() and
        add_param_group(); a step tensor replaced by hand in ``optimizer.state`` (not changed in
        place) is seen only then. Params listed twice keep separate counters.
        """
        counters = getattr(bucket, "step_counters", None)
        if counters is None and bucket.unique:
            steps = bucket.extra
            if len({(s.dtype, s.device) for s in steps}) == 1 and all(s.dim() == 0 for s in steps):
                counters = torch.stack(steps)
                for i, p in enumerate(bucket.params):
                    self.state[p]["step"] = bucket.extra[i] = counters[i]
            bucket.step_counters = counters
        return counters

    def _run(self, group: dict, bucket: Bucket, grads: StepGrads, amp: dict) -> None:
        counters = self._step_counters(bucket)
        if counters is None:
            torch._foreach_add_(bucket.extra, 1)
            steps = torch.stack(bucket.extra)
        else:
            steps = counters.add_(1)
        adam_launch(group, bucket, grads, steps, amp)
        if amp["found_inf"] is not None:  # a skipped step does not count
            if counters is None:
                torch._foreach_sub_(bucket.extra, [amp["found_inf"]] * len(bucket.extra))
            else:
                counters.sub_(amp["found_inf"].to(counters.device))

    def _step_op(self, group: dict, params: list, grads: list, operands: list, amp: dict) -> None:
        states = list(zip(*(ops for ops, _ in operands), strict=True))
        exp_avgs, exp_avg_sqs, vmax = (list(c) for c in states)
        lr = group["lr"]
        beta1, beta2 = group["betas"]
        torch.ops.fusedopt.adam_(
            params, grads, exp_avgs, exp_avg_sqs, vmax if group["amsgrad"] else [],
            [step for _, step in operands],
            0.0 if isinstance(lr, torch.Tensor) else lr, lr if isinstance(lr, torch.Tensor) else None,
            beta1, beta2, group["eps"], group["weight_decay"], group["amsgrad"], group["maximize"],
            group["decoupled_weight_decay"], amp["grad_scale"], amp["found_inf"], amp["clip_coef"],
        )  # fmt: skip


class FusedAdamW(FusedAdam, torch.optim.AdamW):
    r"""torch.optim.AdamW with a fused multi-tensor Triton step.

    :class:`FusedAdam` with decoupled weight decay
    (:math:`\theta \leftarrow \theta(1 - \gamma\lambda)` before the Adam update) and AdamW's
    defaults (``weight_decay=1e-2``); constructor, state and ``state_dict`` as
    :class:`torch.optim.AdamW` (the method order puts AdamW's ``__init__`` first).
    """


@torch.library.custom_op(
    "fusedopt::adam_", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps")
)
def adam_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    lr: float,
    lr_tensor: torch.Tensor | None,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
    clip_coef: torch.Tensor | None,
) -> None:
    """The Adam step as an op ``torch.compile`` sees (``FusedAdam.step`` while compiling):
    advances ``steps`` (not when ``found_inf``) and steps every param, like the eager path."""
    group = dict(
        lr=lr if lr_tensor is None else lr_tensor, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay,
        amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=decoupled_weight_decay,
    )  # fmt: skip
    amp = dict(grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef)
    torch._foreach_add_(steps, 1)
    vmax = max_exp_avg_sqs if amsgrad else exp_avg_sqs
    step_grads, buckets = op_buckets([params, exp_avgs, exp_avg_sqs, vmax], grads, steps)
    for bucket in buckets:
        adam_launch(group, bucket, step_grads, torch.stack(bucket.extra), amp)
    if found_inf is not None:
        torch._foreach_sub_(steps, [found_inf] * len(steps))


@adam_.register_fake
def _(*args) -> None:
    return None
