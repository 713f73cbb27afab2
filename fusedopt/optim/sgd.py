"""FusedSGD: torch.optim.SGD with a multi-tensor Triton step."""

from __future__ import annotations

import importlib

import torch
from torch.optim.optimizer import _device_dtype_check_for_fused

from fusedopt._multi_tensor import TL_DTYPE, to_device
from fusedopt.kernels import sgd as kernels
from fusedopt.optim._fused import Bucket, FusedStep, StepGrads, op_buckets, real_view
from fusedopt.optim.reference import sgd_reference, skipped, unscale_and_clip

# torch.optim does not export the module name on every version.
_torch_sgd = importlib.import_module("torch.optim.sgd")


def sgd_launch(group: dict, bucket: Bucket, grads: StepGrads, fresh: torch.Tensor, amp: dict) -> None:
    """Step one bucket (our kernel, or the plain-torch reference); ``fresh`` (float32 [T] on the
    bucket's device) is non-zero for momentum buffers that hold no value yet."""
    params, buffers = bucket.columns
    scalars = bucket.scalars([group["lr"], group["momentum"], group["dampening"], group["weight_decay"]])
    if bucket.kind == "triton":
        bucket.launch(
            grads,
            kernels.sgd_kernel,
            amp,
            scalars,
            fresh,
            HAS_MOMENTUM=group["momentum"] != 0,
            NESTEROV=group["nesterov"],
            MAXIMIZE=group["maximize"],
            HAS_WD=_nonzero(group["weight_decay"]),
        )
    else:
        lr, momentum, dampening, weight_decay = scalars.tolist()
        sgd_reference(
            params,
            bucket.grads(grads),
            buffers,
            fresh.tolist(),
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            **amp,
        )


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

    def _check(self, p: torch.Tensor, g: torch.Tensor, group: dict) -> None:
        if group["fused"] and not self.state.get(p):
            _device_dtype_check_for_fused(p)

    def _operands(self, p: torch.Tensor, group: dict, memo: dict):
        if group["momentum"] == 0:
            return [p], 0  # no state, as torch; the buffer column is never read
        state = self.state[p]
        if id(p) not in memo:
            # A buffer missing when the step starts is new for every occurrence of the param
            # (torch takes the grad as the buffer each time a listed-twice param comes up).
            memo[id(p)] = "momentum_buffer" not in state
            if memo[id(p)] and not p.grad.is_sparse and real_view(p).dtype in TL_DTYPE:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return [state.get("momentum_buffer", p)], int(memo[id(p)])

    def _run(self, group: dict, bucket: Bucket, grads: StepGrads, amp: dict) -> None:
        if bucket.kind == "torch":
            self._torch_functional(group, bucket, grads, amp)
            return
        fresh = getattr(bucket, "fresh", None)
        if fresh is None:  # the bucket's first run: the flags _operands() gave, on the device
            fresh = bucket.fresh = to_device(torch.tensor(bucket.extra, dtype=torch.float32), bucket.device)
            bucket.maybe_fresh = any(bucket.extra)
        sgd_launch(group, bucket, grads, fresh, amp)
        # A new buffer holds a value once a step was taken; a step GradScaler skipped (found_inf)
        # leaves it new, as torch's skipped step leaves no buffer. Decided on the device.
        if bucket.maybe_fresh:
            if amp["found_inf"] is None:
                fresh.zero_()
                bucket.maybe_fresh = False
            else:
                fresh.mul_(amp["found_inf"].to(fresh.device))

    def _step_op(self, group: dict, params: list, grads: list, operands: list, amp: dict) -> None:
        has_momentum = group["momentum"] != 0
        lr = group["lr"]
        torch.ops.fusedopt.sgd_(
            params, grads, [ops[0] for ops, _ in operands] if has_momentum else [],
            [fresh for _, fresh in operands],
            0.0 if isinstance(lr, torch.Tensor) else lr, lr if isinstance(lr, torch.Tensor) else None,
            group["momentum"], group["dampening"], group["weight_decay"], group["nesterov"], group["maximize"],
            amp["grad_scale"], amp["found_inf"], amp["clip_coef"],
        )  # fmt: skip

    def _torch_functional(self, group: dict, bucket: Bucket, grads: StepGrads, amp: dict) -> None:
        """torch.optim.SGD's own for-loop step, for sparse grads and integer params.

        GradScaler's skip is read on the host here, as torch's own unfused path does.
        """
        if skipped(amp["found_inf"]):
            return
        mine = [unscale_and_clip(g, amp["grad_scale"], amp["clip_coef"]) for g in bucket.grads(grads)]
        params = bucket.columns[0]
        has_momentum = group["momentum"] != 0
        buffers = [self.state[p].get("momentum_buffer") for p in params] if has_momentum else []
        _torch_sgd.sgd(
            params,
            mine,
            buffers,
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            has_sparse_grad=any(g.is_sparse for g in mine),
            foreach=False,
            fused=False,
        )
        for p, b in zip(params, buffers, strict=False):
            self.state[p]["momentum_buffer"] = b


def _nonzero(x: float | torch.Tensor) -> bool:
    return isinstance(x, torch.Tensor) or x != 0


@torch.library.custom_op("fusedopt::sgd_", mutates_args=("params", "momentum_buffers"))
def sgd_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    fresh: list[int],
    lr: float,
    lr_tensor: torch.Tensor | None,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
    clip_coef: torch.Tensor | None,
) -> None:
    """The SGD step as an op ``torch.compile`` sees (``FusedSGD.step`` while compiling);
    ``momentum_buffers`` is empty without momentum, ``fresh[i]`` marks a buffer created now."""
    group = dict(
        lr=lr if lr_tensor is None else lr_tensor, momentum=momentum, dampening=dampening,
        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
    )  # fmt: skip
    amp = dict(grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef)
    step_grads, buckets = op_buckets([params, momentum_buffers or params], grads, fresh)
    for bucket in buckets:
        flags = to_device(torch.tensor(bucket.extra, dtype=torch.float32), bucket.device)
        sgd_launch(group, bucket, step_grads, flags, amp)


@sgd_.register_fake
def _(*args) -> None:
    return None
