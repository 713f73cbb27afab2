"""Fused gradient clipping: ``clip_grad_norm_`` with torch.nn.utils' signature and results.

The norm and the clip are the multi-tensor passes of :mod:`fusedopt._norm`: the launch count
does not grow with the number of tensors, and nothing is read on the host unless
``error_if_nonfinite=True`` asks for it (torch reads it too).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from fusedopt._dist import any_dtensor, as_result
from fusedopt._multi_tensor import runs_triton
from fusedopt._norm import clip_coefficient, global_norm, norm_order, scale_, split, traced_norm


def clip_grad_norm_(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> torch.Tensor:
    r"""Clip the gradient norm of an iterable of parameters, as :func:`torch.nn.utils.clip_grad_norm_`.

    The norm is computed over the norms of all gradients together, as if they were
    concatenated into a single vector; gradients are modified in place:
    :math:`g \leftarrow g \cdot \min(1, \text{max\_norm} / (\lVert g \rVert + 10^{-6}))`.

    Args:
        parameters: a Tensor or an iterable of Tensors whose gradients will be normalized.
        max_norm: max norm of the gradients.
        norm_type: type of the used p-norm; ``inf`` for the infinity norm. Orders ``p > 0`` run
            the fused kernels; others (0, negative, ``-inf``) run torch's implementation.
        error_if_nonfinite: if True, raise an error if the total norm is nan, inf or -inf (this
            reads the norm on the host, as torch does).
        foreach: ``None`` (default) runs the fused kernels (torch's implementation where they do
            not apply: a CPU tensor without ``TRITON_INTERPRET=1``, sparse, complex or integer
            grads);
            ``True``/``False`` run torch's own foreach / per-tensor implementation.

    DTensor gradients (FSDP2, tensor parallel) give the norm of the whole gradients: local
    partial sums, then one all-reduce per process group (see :mod:`fusedopt._dist`).

    Returns:
        Total norm of the gradients (viewed as a single vector), a 0-d tensor on the first
        gradient's device in the gradients' promoted dtype; for DTensor gradients a DTensor
        replicated on the first one's mesh, as torch returns it.
    """
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    fused = (
        foreach is None
        and norm_order(norm_type) is not None
        and any(runs_triton(g.device) for g in grads)
        and not any(g.is_sparse or g.is_complex() for g in grads)
        # torch refuses the infinity norm of an empty tensor (no identity): let it say so.
        and not (float(norm_type) == math.inf and any(g.numel() == 0 for g in grads))
    )
    if not fused:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite, foreach)
    compiling = torch.compiler.is_compiling()
    if compiling and any_dtensor(grads):  # the traced ops take plain tensors
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite, foreach)
    if compiling:
        total = traced_norm(grads, float(norm_type), None)
    else:
        parts = split(grads)
        total = global_norm(parts, norm_type)
    if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
        raise RuntimeError(
            f"The total norm of order {float(norm_type)} for gradients from "
            "`parameters` is non-finite, so it cannot be clipped. To disable "
            "this error and scale the gradients by the non-finite norm anyway, "
            "set `error_if_nonfinite=False`"
        )
    coef = clip_coefficient(total, float(max_norm))
    if compiling:
        torch.ops.fusedopt.scale_grads_(grads, coef)
        return total
    for sources, leftovers in parts.values():
        scale_(sources, leftovers, coef)
    return as_result(total, grads)
