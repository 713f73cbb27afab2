"""The fused cross-entropy under ``torch.compile``: its launchers as the custom ops
``fusedopt::cross_entropy`` (the forward; fake: :func:`_forward_fake`) and
``fusedopt::cross_entropy_backward`` (the gradient of ``reduction="none"``, through
``fusedopt.losses._common.compilable``), and :func:`_forward_traced`, the forward while dynamo traces.
Eager calls the launchers of ``fusedopt.losses._cross_entropy_launch`` directly (no dispatcher).
"""

from __future__ import annotations

import torch

from fusedopt._multi_tensor import compute_dtype
from fusedopt.losses._common import compilable
from fusedopt.losses._cross_entropy_launch import (
    _check,
    _empty_grad,
    _Forward,
    _forward,
    _guard,
    _launch_rows,
    _rows,
)


def _forward_fake(
    input, target, weight, ignore_index, reduction, label_smoothing, need_grad, out_dtype, z_loss, softcap
):
    n, spatial, num_classes = _check(input, target, weight, label_smoothing, out_dtype)
    compute, none = compute_dtype(input.dtype), reduction == "none"
    loss = input.new_empty(target.shape if none and input.dim() > 1 else (), dtype=out_dtype)
    grad = _empty_grad(input, n, spatial, num_classes)[0] if need_grad and not none else input.new_empty(0)
    lse = input.new_empty(n * spatial if need_grad and none else 0, dtype=compute)
    return loss, grad, input.new_empty(3, dtype=compute), lse


@torch.library.custom_op("fusedopt::cross_entropy", mutates_args=())
def _forward_op(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    need_grad: bool,
    out_dtype: torch.dtype,
    z_loss: float,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_forward` as the op torch.compile records: ``(loss, grad, stats, lse)``, empty
    tensors for a gradient or log-sum-exp not computed (an op returns no None)."""
    out = _forward(
        input, target, weight, ignore_index, reduction, label_smoothing, need_grad, out_dtype, z_loss, softcap
    )
    grad = out.grad if out.grad is not None else input.new_empty(0)
    return out.loss, grad, out.stats, out.lse if out.lse is not None else out.stats.new_empty(0)


_forward_op.register_fake(_forward_fake)


def _forward_traced(
    input, target, weight, ignore_index, reduction, label_smoothing, need_grad, out_dtype, z_loss=0.0,
    softcap=0.0,
) -> _Forward:  # fmt: skip
    """:func:`_forward` while torch.compile traces: the kernels run in the op
    ``fusedopt::cross_entropy``; the views of the inputs (an op's outputs cannot alias its
    inputs) are taken outside it."""
    n, spatial, num_classes = _check(input, target, weight, label_smoothing, out_dtype)  # torch's errors
    loss, grad, stats, lse = _forward_op(
        input, target, weight, ignore_index, reduction, label_smoothing, need_grad, out_dtype, z_loss, softcap
    )
    return _Forward(loss, grad, _rows(input, n, spatial, num_classes), target.reshape(-1), stats, lse)


@compilable("cross_entropy_backward", lambda input, rows, *args: _empty_grad(input, *rows.shape)[0])
def _backward_none(
    input: torch.Tensor,
    rows: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    stats: torch.Tensor,
    lse: torch.Tensor,
    grad_output: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
) -> torch.Tensor:
    """The gradient of ``reduction="none"``, recomputed from the logits ``rows`` (N, S, C) and
    each row's log-sum-exp, times each row's ``grad_output``; the input's shape."""
    n, spatial, num_classes = rows.shape
    grad, grad_rows = _empty_grad(input, n, spatial, num_classes)
    with _guard(input.device):
        _launch_rows(
            rows,
            target,
            weight,
            stats,
            ignore_index,
            label_smoothing,
            lse=lse,
            grad_rows=grad_rows,
            grad_output=grad_output.reshape(-1),
            z_loss=z_loss,
            softcap=softcap,
        )
    return grad
