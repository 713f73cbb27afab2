"""FusedAdam and FusedAdamW: torch.optim.Adam / AdamW with a multi-tensor Triton step."""

from __future__ import annotations

import torch
from torch.optim.optimizer import _device_dtype_check_for_fused, _get_scalar_dtype

from fusedopt._multi_tensor import TL_DTYPE, compute_dtype, float64_vector, to_device
from fusedopt.kernels import adam as kernels
from fusedopt.optim._fused import Bucket, FusedStep, StepGrads, real_view
from fusedopt.optim.reference import adam_reference


def adam_scalars(group: dict, steps: torch.Tensor, device: torch.device) -> torch.Tensor:
    """float64 [5 + 2T] on ``device``: lr, beta1, beta2, eps, weight_decay, then per tensor
    ``1 - beta1**t`` and ``sqrt(1 - beta2**t)`` (layout: ``fusedopt.kernels.adam``).

    Computed where the steps live (or where a tensor hyper-parameter lives), without host reads.
    """
    lr, (beta1, beta2) = group["lr"], group["betas"]
    where = next(
        (x.device for x in (lr, beta1, beta2) if isinstance(x, torch.Tensor) and x.device.type != "cpu"),
        steps.device,
    )
    t = steps.to(where, torch.float64)
    # Python floats stay Python scalars: no host-to-device copy that would wait on the stream.
    b1, b2 = (b.to(where, torch.float64) if isinstance(b, torch.Tensor) else b for b in (beta1, beta2))
    per_tensor = torch.stack([1 - b1**t, (1 - b2**t).sqrt()], dim=1).flatten()
    head = float64_vector([lr, beta1, beta2, group["eps"], group["weight_decay"]], where)
    return to_device(torch.cat([head, per_tensor]), device)


class FusedAdam(FusedStep, torch.optim.Adam):
    r"""torch.optim.Adam with a fused multi-tensor Triton step.

    Same constructor, defaults, validation, ``param_groups``, state (``step``, ``exp_avg``,
    ``exp_avg_sq``, ``max_exp_avg_sq``) and ``state_dict`` as :class:`torch.optim.Adam`; a state
    dict of either loads into the other. For each param, with :math:`t` its own step count:

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

    Flags: ``fused=None`` (default) or ``True`` runs our kernel (``True`` also keeps ``step`` on
    the param's device as float32 and accepts GradScaler's ``grad_scale``/``found_inf``, as torch's
    fused Adam does). ``fused=False``, ``foreach=True`` or ``differentiable=True`` run torch's own
    implementation. ``capturable=True`` keeps ``step`` on the param's device and reads it, and a
    tensor ``lr``, on the device: no host reads.
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
        scalars = adam_scalars(group, steps, bucket.device)
        grad_scale, found_inf = amp["grad_scale"], amp["found_inf"]
        if bucket.kind == "triton":
            dummy = scalars
            bucket.launch(
                grads,
                None,
                lambda table, dynamic: table.launch(
                    kernels.adam_kernel,
                    dynamic,
                    scalars,
                    dummy if grad_scale is None else grad_scale,
                    dummy if found_inf is None else found_inf,
                    DTYPE=TL_DTYPE[bucket.dtype],
                    COMPUTE=TL_DTYPE[compute_dtype(bucket.dtype)],
                    AMSGRAD=group["amsgrad"],
                    MAXIMIZE=group["maximize"],
                    DECOUPLED=group["decoupled_weight_decay"],
                    HAS_WD=group["weight_decay"] != 0,
                    HAS_GRAD_SCALE=grad_scale is not None,
                    HAS_FOUND_INF=found_inf is not None,
                ),
            )
        else:
            values = scalars.tolist()
            lr, beta1, beta2, eps, weight_decay = values[: kernels.HEAD]
            params, exp_avgs, exp_avg_sqs, vmax = bucket.columns
            adam_reference(
                params,
                bucket.grads(grads),
                exp_avgs,
                exp_avg_sqs,
                vmax if group["amsgrad"] else None,
                list(zip(values[kernels.HEAD :: 2], values[kernels.HEAD + 1 :: 2], strict=True)),
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                eps=eps,
                weight_decay=weight_decay,
                decoupled_weight_decay=group["decoupled_weight_decay"],
                maximize=group["maximize"],
                grad_scale=grad_scale,
                found_inf=found_inf,
            )
        if found_inf is not None:  # a skipped step does not count
            if counters is None:
                torch._foreach_sub_(bucket.extra, [found_inf] * len(bucket.extra))
            else:
                counters.sub_(found_inf.to(counters.device))


class FusedAdamW(FusedAdam, torch.optim.AdamW):
    r"""torch.optim.AdamW with a fused multi-tensor Triton step.

    :class:`FusedAdam` with decoupled weight decay
    (:math:`\theta \leftarrow \theta(1 - \gamma\lambda)` before the Adam update) and AdamW's
    defaults (``weight_decay=1e-2``); constructor, state and ``state_dict`` as
    :class:`torch.optim.AdamW` (the method order puts AdamW's ``__init__`` first).
    """
