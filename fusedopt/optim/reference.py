"""The algorithms in plain torch: the CPU fallback and the test oracle of the kernels.

Each function steps a list of tensors of one dtype in place, computing in fp32 (fp64 for
fp64 tensors) with torch's own ops in torch's order, and storing the results in the tensors'
dtype. For fp32 it is torch.optim's for-loop implementation; for bf16/fp16 it is "torch's
algorithm in fp32, rounded to the dtype after each step".
"""

from __future__ import annotations

import torch

from fusedopt._multi_tensor import compute_dtype, shares_dense_layout


def skipped(found_inf: torch.Tensor | None) -> bool:
    """Whether GradScaler found an inf: a host read, for steps that run on the host's side."""
    return found_inf is not None and bool(found_inf.item())


def unscale_and_clip(
    g: torch.Tensor, grad_scale: torch.Tensor | None, clip_coef: torch.Tensor | None
) -> torch.Tensor:
    """``g / grad_scale * clip_coef`` (each factor where given), as the step kernels read a grad."""
    if grad_scale is not None:
        g = g / grad_scale.to(g.device)
    if clip_coef is not None:
        g = g * clip_coef.to(g.device)
    return g


def dense_cpu_fused_ok(bucket, grads: list[torch.Tensor]) -> bool:
    """Whether torch's fused CPU step is right for these tensors: fp32/fp64 (torch 2.13's fused
    CPU SGD leaves most bf16 params unchanged), dense, and grads laid out as their params (it
    corrupts other layouts; see TRITON_NOTES)."""
    ok = bucket.memo.get("cpu_fused")  # a bucket's layouts are fixed (its plan key has the strides)
    if ok is None:
        ok = bucket.memo["cpu_fused"] = (
            bucket.device.type == "cpu"
            and bucket.dtype in (torch.float32, torch.float64)
            and all(shares_dense_layout([*ops, g]) for *ops, g in zip(*bucket.columns, grads, strict=True))
        )
    return ok


def eager_grads(grads: list[torch.Tensor], amp, fused: bool) -> list[torch.Tensor] | None:
    """The grads a non-Triton step uses: None when GradScaler found an inf (a host read: these
    steps run on the CPU or are torch's own sparse ones), else unscaled and clipped copies
    (torch's fused step unscales by itself: only the clip is applied then; bf16/fp16 grads come
    back in fp32)."""
    if not fused and skipped(amp.found_inf):
        return None
    scale = None if fused else amp.grad_scale
    if scale is None and amp.clip_coef is None:
        return grads
    # Unscaled and clipped in the arithmetic dtype (bf16/fp16 in fp32, as the references compute).
    return [
        unscale_and_clip(g.to(compute_dtype(g.dtype)) if g.is_floating_point() else g, scale, amp.clip_coef)
        for g in grads
    ]


def _grad(
    g: torch.Tensor,
    ct: torch.dtype,
    maximize: bool,
    grad_scale: torch.Tensor | None,
    clip_coef: torch.Tensor | None,
) -> torch.Tensor:
    d = unscale_and_clip(g.to(ct), grad_scale, clip_coef)
    return -d if maximize else d


def _tensors(params, grads, maximize: bool, grad_scale, found_inf, clip_coef):
    """What every reference step loops over: ``(i, param, compute dtype, param copy in it, the
    grad the step uses in it)``; nothing when GradScaler found an inf."""
    if skipped(found_inf):
        return
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        ct = compute_dtype(p.dtype)
        yield i, p, ct, p.to(ct, copy=True), _grad(g, ct, maximize, grad_scale, clip_coef)


def sgd_reference(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    fresh: list[int],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    clip_coef: torch.Tensor | None = None,
) -> None:
    """SGD step. ``fresh[i]`` marks a momentum buffer created this step (it takes the grad)."""
    for i, p, ct, x, d in _tensors(params, grads, maximize, grad_scale, found_inf, clip_coef):
        if weight_decay != 0:
            d = d.add(x, alpha=weight_decay)
        if momentum != 0:
            if fresh[i]:
                b = d.clone()
            else:
                b = momentum_buffers[i].to(ct, copy=True).mul_(momentum).add_(d, alpha=1 - dampening)
            momentum_buffers[i].copy_(b)
            d = d.add(b, alpha=momentum) if nesterov else b
        p.copy_(x.add_(d, alpha=-lr))


def adam_reference(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor] | None,
    bias_corrections: list[tuple[float, float]],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    clip_coef: torch.Tensor | None = None,
) -> None:
    """Adam/AdamW step; ``bias_corrections[i] = (1 - beta1**t, sqrt(1 - beta2**t))`` for tensor i."""
    for i, p, ct, x, d in _tensors(params, grads, maximize, grad_scale, found_inf, clip_coef):
        bias_correction1, bias_correction2_sqrt = bias_corrections[i]
        m = exp_avgs[i].to(ct, copy=True)
        v = exp_avg_sqs[i].to(ct, copy=True)
        if weight_decay != 0:
            if decoupled_weight_decay:
                x.mul_(1 - lr * weight_decay)
            else:
                d = d.add(x, alpha=weight_decay)
        m.lerp_(d, 1 - beta1)
        v.mul_(beta2).addcmul_(d, d, value=1 - beta2)
        if max_exp_avg_sqs is not None:
            vm = torch.maximum(max_exp_avg_sqs[i].to(ct), v)
            max_exp_avg_sqs[i].copy_(vm)
            denom = (vm.sqrt() / bias_correction2_sqrt).add_(eps)
        else:
            denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        x.addcdiv_(m, denom, value=-(lr / bias_correction1))
        p.copy_(x)
        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)


def rmsprop_reference(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    square_avgs: list[torch.Tensor],
    grad_avgs: list[torch.Tensor] | None,
    momentum_buffers: list[torch.Tensor] | None,
    *,
    lr: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    maximize: bool,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    clip_coef: torch.Tensor | None = None,
) -> None:
    """RMSprop step; ``grad_avgs`` given: centered, ``momentum_buffers`` given: momentum > 0."""
    for i, p, ct, x, d in _tensors(params, grads, maximize, grad_scale, found_inf, clip_coef):
        v = square_avgs[i].to(ct, copy=True)
        if weight_decay != 0:
            d = d.add(x, alpha=weight_decay)
        v.mul_(alpha).addcmul_(d, d, value=1 - alpha)
        if grad_avgs is not None:
            ga = grad_avgs[i].to(ct, copy=True).lerp_(d, 1 - alpha)
            grad_avgs[i].copy_(ga)
            avg = v.addcmul(ga, ga, value=-1).sqrt_()
        else:
            avg = v.sqrt()
        avg.add_(eps)
        if momentum_buffers is not None:
            b = momentum_buffers[i].to(ct, copy=True).mul_(momentum).addcdiv_(d, avg)
            momentum_buffers[i].copy_(b)
            x.add_(b, alpha=-lr)
        else:
            x.addcdiv_(d, avg, value=-lr)
        p.copy_(x)
        square_avgs[i].copy_(v)


def adagrad_reference(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    state_sums: list[torch.Tensor],
    clrs: list[float],
    *,
    weight_decay: float,
    eps: float,
    maximize: bool,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    clip_coef: torch.Tensor | None = None,
) -> None:
    """Adagrad step (dense grads); ``clrs[i] = lr / (1 + (t - 1) * lr_decay)`` for tensor i."""
    for i, p, ct, x, d in _tensors(params, grads, maximize, grad_scale, found_inf, clip_coef):
        s = state_sums[i].to(ct, copy=True)
        if weight_decay != 0:
            d = d.add(x, alpha=weight_decay)
        s.addcmul_(d, d, value=1)
        x.addcdiv_(d, s.sqrt().add_(eps), value=-clrs[i])
        p.copy_(x)
        state_sums[i].copy_(s)
