"""torch.nn.functional-shaped fused ops: same names, signatures, results and errors.

Each op computes its value and, when autograd will need it, the gradient of its input in the
same pass (see ``fusedopt.losses`` for the bytes moved). Tensors the kernels cannot take — a
device Triton does not run on (CPU without ``TRITON_INTERPRET=1``), integer or complex
dtypes, a ``weight`` that requires grad, tensor subclasses — go to torch's own op, the
reference these ops are tested against.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.nn import _reduction
from torch.overrides import has_torch_function_variadic

from fusedopt._multi_tensor import TL_DTYPE, runs_triton
from fusedopt.kernels import losses as kernels
from fusedopt.losses.cross_entropy import cross_entropy as _fused_cross_entropy
from fusedopt.losses.linear_cross_entropy import linear_cross_entropy
from fusedopt.losses.linear_distillation import linear_distillation_loss
from fusedopt.losses.linear_log_probs import linear_log_probs
from fusedopt.losses.pointwise import MeanFunction, PointwiseLossFunction

__all__ = [
    "cross_entropy",
    "huber_loss",
    "l1_loss",
    "linear_cross_entropy",
    "linear_distillation_loss",
    "linear_log_probs",
    "mean",
    "mse_loss",
    "smooth_l1_loss",
]


def _fusable(*tensors: torch.Tensor | None) -> bool:
    present = [t for t in tensors if t is not None]
    return (
        not has_torch_function_variadic(*present)
        and all(runs_triton(t.device) and t.dtype in TL_DTYPE for t in present)
        and len({t.device for t in present}) == 1
    )


def mean(
    input: torch.Tensor, dim=None, keepdim: bool = False, *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``torch.mean`` in one deterministic pass; its backward writes no memory.

    ``dtype`` as torch computes it: the mean of the input's values in fp32 (fp64 for fp64
    inputs or a fp64 ``dtype``), rounded once to ``dtype`` (fp64 to bf16 by way of fp32); the
    gradient is ``grad_output / K`` in ``dtype``, cast to the input's dtype."""
    out_dtype = dtype if dtype is not None else input.dtype
    if not _fusable(input) or out_dtype not in TL_DTYPE:
        return torch.mean(input, dim=dim, keepdim=keepdim, dtype=dtype)
    nd = input.dim()
    if dim is None or (isinstance(dim, tuple | list) and len(dim) == 0):  # torch: () reduces all
        dims = list(range(nd))
    else:
        dims = [dim] if isinstance(dim, int) else list(dim)
        dims = [d % max(nd, 1) if -max(nd, 1) <= d < max(nd, 1) else d for d in dims]
        if any(not 0 <= d < max(nd, 1) for d in dims) or len(set(dims)) != len(dims):
            return torch.mean(input, dim=dim, keepdim=keepdim, dtype=dtype)  # torch's error
        dims = [d for d in dims if d < nd]
    kept = [d for d in range(nd) if d not in dims]
    x = input.permute(kept + dims) if nd else input
    m = 1
    for d in kept:
        m *= input.shape[d]
    k = input.numel() // m if m else 0
    if keepdim:
        shape = torch.Size(1 if d in dims else input.shape[d] for d in range(nd))
    else:
        shape = torch.Size(input.shape[d] for d in kept)
    return MeanFunction.apply(x.reshape(m, k).contiguous(), shape, out_dtype)


def _result_type(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    """``torch.result_type(a, b)`` of two floating-point tensors, in a form dynamo can trace: a
    0-d tensor of the same category as a dimensioned one does not take part."""
    if (a.dim() == 0) == (b.dim() == 0):
        return torch.promote_types(a.dtype, b.dtype)
    return a.dtype if b.dim() == 0 else b.dtype


AUTOCAST_TO_FP32 = (torch.float16, torch.bfloat16, torch.float32)  # what autocast's fp32 ops cast


def _autocast_dtypes(input, target, weight) -> tuple[torch.dtype, torch.dtype] | None:
    """Under autocast torch runs the four losses in fp32 (they are on autocast's fp32 list on
    CPU and CUDA): fp16/bf16/fp32 operands are cast to fp32, fp64 ones kept. Return ``(storage
    dtype, loss dtype)`` for the kernels when autocast is on and every operand is cast: the
    operands' own dtype when input and target share it (the kernels upcast on load, no copy),
    else fp32; the loss fp32. None otherwise (no autocast, or an fp64 operand: the operands are
    cast as autocast casts them and the usual rule applies)."""
    if not torch.is_autocast_enabled(input.device.type):
        return None
    present = [t for t in (input, target, weight) if t is not None]
    if any(t.dtype not in AUTOCAST_TO_FP32 for t in present):
        return None
    return (input.dtype if input.dtype == target.dtype else torch.float32), torch.float32


def _pointwise(
    input, target, weight, reduction, loss, param, torch_op, *, same_dtype_as_input=False, **kwargs
):
    """Run a pointwise loss through the kernels when they can take it, else through torch.

    ``kwargs`` are the torch op's own extra arguments; weighted MSE/L1 means divide by the sum of
    the weights (torch's definition), the weighted Huber mean by N. Under autocast the loss is
    fp32, as torch's (:func:`_autocast_dtypes`); weighted MSE / L1 under autocast run torch's op.
    """
    if weight is not None:
        kwargs["weight"] = weight
    if (
        reduction not in ("none", "mean", "sum")  # torch's deprecation path or its error
        or not _fusable(input, target, weight)
        or (weight is not None and weight.requires_grad)
        # torch's weighted MSE / L1 are compositions of ops autocast keeps in the inputs' dtype
        # (not the fp32 loss ops): its own op gives its dtypes (and its fp16 overflow)
        or (
            weight is not None
            and torch_op is not F.huber_loss
            and torch.is_autocast_enabled(input.device.type)
        )
    ):
        return torch_op(input, target, reduction=reduction, **kwargs)
    if target.size() != input.size():
        warnings.warn(
            f"Using a target size ({target.size()}) that is different to the input size ({input.size()}). "
            "This will likely lead to incorrect results due to broadcasting. "
            "Please ensure they have the same size.",
            stacklevel=3,
        )
    if weight is not None and weight.size() != input.size():
        raise ValueError("Weights and input must have the same size.")
    autocast = _autocast_dtypes(input, target, weight)
    if autocast is not None:
        dtype, out_dtype = autocast
        weight_dtype = torch.float32
    else:
        if torch.is_autocast_enabled(input.device.type):  # fp64 among the operands: cast the others
            input, target, weight = (
                t.float() if t is not None and t.dtype in AUTOCAST_TO_FP32 else t
                for t in (input, target, weight)
            )
        dtype = input.dtype if same_dtype_as_input else _result_type(input, target)
        if weight is not None:
            dtype = torch.promote_types(dtype, weight.dtype)
        out_dtype = weight_dtype = dtype
    x, y = torch.broadcast_tensors(input.to(dtype), target.to(dtype))  # autograd sums back
    x, y = x.contiguous(), y.contiguous()
    w = None if weight is None else torch.broadcast_to(weight.to(weight_dtype), x.shape).contiguous()
    want_grad = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
    mean_by_weight = w is not None and torch_op in (F.mse_loss, F.l1_loss)
    return PointwiseLossFunction.apply(
        x, y, w, int(loss), float(param), reduction, want_grad, mean_by_weight, out_dtype
    )


def _legacy(size_average, reduce, reduction: str) -> str:
    if size_average is not None or reduce is not None:
        return _reduction.legacy_get_string(size_average, reduce)
    return reduction


def mse_loss(
    input, target, size_average=None, reduce=None, reduction: str = "mean", weight=None
) -> torch.Tensor:
    """``torch.nn.functional.mse_loss``; the gradient is written while the loss is reduced."""
    reduction = _legacy(size_average, reduce, reduction)
    return _pointwise(input, target, weight, reduction, kernels.MSE, 0.0, F.mse_loss)


def l1_loss(
    input, target, size_average=None, reduce=None, reduction: str = "mean", weight=None
) -> torch.Tensor:
    """``torch.nn.functional.l1_loss``; the gradient is written while the loss is reduced."""
    reduction = _legacy(size_average, reduce, reduction)
    return _pointwise(input, target, weight, reduction, kernels.L1, 0.0, F.l1_loss)


def smooth_l1_loss(
    input, target, size_average=None, reduce=None, reduction: str = "mean", beta: float = 1.0
) -> torch.Tensor:
    """``torch.nn.functional.smooth_l1_loss``; the gradient is written while the loss is reduced."""
    reduction = _legacy(size_average, reduce, reduction)
    if not beta >= 0:  # negative or NaN
        return F.smooth_l1_loss(input, target, reduction=reduction, beta=beta)  # torch's error
    if beta == 0:  # torch: smooth L1 with beta 0 is L1
        return _pointwise(input, target, None, reduction, kernels.L1, 0.0, F.smooth_l1_loss, beta=beta)
    return _pointwise(input, target, None, reduction, kernels.SMOOTH_L1, beta, F.smooth_l1_loss, beta=beta)


def huber_loss(input, target, reduction: str = "mean", delta: float = 1.0, weight=None) -> torch.Tensor:
    """``torch.nn.functional.huber_loss``; the gradient is written while the loss is reduced."""
    if not delta > 0:  # zero, negative or NaN
        return F.huber_loss(input, target, reduction=reduction, delta=delta)  # torch's error
    return _pointwise(
        input,
        target,
        weight,
        reduction,
        kernels.HUBER,
        delta,
        F.huber_loss,
        same_dtype_as_input=True,
        delta=delta,
    )


def cross_entropy(
    input,
    target,
    weight=None,
    size_average=None,
    ignore_index: int = -100,
    reduce=None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """``torch.nn.functional.cross_entropy`` with the logits' gradient written in the forward
    pass; keyword-only ``z_loss`` adds ``z_loss · lse²`` per target not ignored, reduced like
    the loss, and ``softcap`` caps every logit at ``softcap · tanh(z / softcap)`` first
    (:func:`fusedopt.losses.cross_entropy.cross_entropy`)."""
    reduction = _legacy(size_average, reduce, reduction)
    return _fused_cross_entropy(
        input,
        target,
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
    )
