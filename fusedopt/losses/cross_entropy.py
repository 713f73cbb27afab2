"""Fused cross-entropy: ``torch.nn.functional.cross_entropy`` whose forward also writes the
gradient of the logits, so the backward moves no bytes when ``grad_output`` is 1.

Layers: ``fusedopt.kernels.cross_entropy`` (``@triton.jit``) → launchers in
``fusedopt.losses._cross_entropy_launch`` (checks, allocation, grid; the three launches of a forward
are listed there) → :class:`CrossEntropyFunction` → :func:`cross_entropy`.

Under ``torch.compile`` the launchers run as the custom ops ``fusedopt::cross_entropy``
(forward) and ``fusedopt::cross_entropy_backward`` (``none``), registered in
``fusedopt.losses._cross_entropy_ops``, which dynamo records instead of breaking the graph; eager calls
the launchers directly (no dispatcher). The compiled backward of ``mean``/``sum`` is ``stored
gradient * grad_output`` as a new tensor (8 B per element, where eager moves none for a
``grad_output`` of 1).

Backward (``mean``/``sum``): one launch that loads ``grad_output`` and returns at once when it
is 1; otherwise it scales the stored gradient in place. ``reduction="none"`` recomputes
instead: the forward reads the logits once and keeps each row's log-sum-exp, the backward
reads the logits again and writes the gradient times each row's ``grad_output`` (12 B per
element in all, against 20 B for storing the gradient in the forward and scaling its rows).

Bytes moved per logit element, fp32, ``reduction="mean"``, input requires grad (the per-row
and scalar traffic is negligible for any useful ``C``):

=====================  ==============================================  ===================  =====
path                   forward                                         backward             total
=====================  ==============================================  ===================  =====
eager torch            log_softmax reads z (4), writes log p (4);      nll backward writes  24
                       nll reads N values                              a zero (N, C) grad
                                                                       (4); log_softmax
                                                                       backward reads it
                                                                       and log p (8), writes
                                                                       dz (4)
torch.compile          one reduction kernel reads z (4, 8 if the max   reads z (4), writes  12-16
(inductor)             and the sum are two loops), keeps max/lse       dz (4)
                       per row
fusedopt               reads z twice (8; the second read often hits    0 when grad_output   12
                       L2), writes dz (4)                              is 1 (else reads and
                                                                       writes dz: 8)
fusedopt, ``none``     reads z (4), keeps lse per row                  reads z (4), writes  12
                                                                       dz (4)
=====================  ==============================================  ===================  =====

Eager numbers are floors: for wide rows (C > 1024) torch's CUDA softmax kernels read their
input two or three times, and label smoothing adds a weighted sum over log p in both
directions (8+ B more). Memory held from forward to backward: eager keeps log p (N×C; fp32
under autocast), torch.compile and fusedopt's ``none`` keep the logits; fusedopt (``mean``/
``sum``) keeps the gradient (N×C, input dtype) and nothing else: the logits are freed as soon
as the caller drops them.

A backward that autograd records (``create_graph=True``: double backward, Hessian-vector
products, MAML, gradient penalties) differentiates torch's composition (``F.cross_entropy``)
instead of returning the stored gradient, so second derivatives are torch's. ``none`` saves the
logits. ``mean``/``sum`` keep only a weak reference to them (to the tensor that owns their
memory, for a view such as ``logits.view(-1, C)``): the caller's logits, alive and unchanged
at the backward, are differentiated (``logits = model(x); loss = cross_entropy(logits, y)``);
logits the caller no longer holds raise a clear error (use ``F.cross_entropy`` there) rather
than keeping N×C alive for every training step.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch.nn import _reduction

from fusedopt._multi_tensor import TL_DTYPE, compute_dtype, runs_triton
from fusedopt.losses._common import differentiable_grads, scaled_copy
from fusedopt.losses._cross_entropy_launch import _forward, _scale_grad
from fusedopt.losses._cross_entropy_ops import _backward_none, _forward_traced

REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}  # torch's Reduction enum
AUTOCAST_TO_FP32 = (torch.float16, torch.bfloat16, torch.float32)  # what autocast's fp32 ops cast


def torch_cross_entropy(
    input, target, weight, ignore_index, reduction, label_smoothing, z_loss=0.0, softcap=0.0
):
    """:func:`cross_entropy_composition` as the fused op computes it: the logits (and weight)
    upcast to the kernels' arithmetic dtype (fp32, fp64 for fp64; what autocast casts them to as
    well): the composition a backward with ``create_graph=True`` differentiates."""
    math = compute_dtype(input.dtype)
    weight = weight.to(math) if weight is not None else None
    with torch.autocast(input.device.type, enabled=False):
        return cross_entropy_composition(
            input.to(math), target, weight, ignore_index, reduction, label_smoothing, z_loss=z_loss,
            softcap=softcap,
        )  # fmt: skip


def cross_entropy_composition(
    input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, *, z_loss=0.0,
    softcap=None,
):  # fmt: skip
    """The fused cross-entropy's options in plain torch: with a ``softcap`` ``c`` (None or 0:
    none) the logits become ``c · tanh(input / c)`` (Gemma 2's soft-capping), then
    :func:`z_loss_composition` with a ``z_loss``, else ``F.cross_entropy``. The fallback on
    devices the kernels do not run on, the tests' oracle and (through
    :func:`torch_cross_entropy`) what a backward with ``create_graph=True`` differentiates."""
    if softcap:
        input = softcap * torch.tanh(input / softcap)
    if z_loss > 0.0:
        return z_loss_composition(input, target, weight, ignore_index, reduction, label_smoothing, z_loss)
    return F.cross_entropy(
        input, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing,
    )  # fmt: skip


def z_loss_composition(
    input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0
):
    """Cross-entropy with a z-loss in plain torch: each target element that is not
    ``ignore_index`` adds ``z_loss · lse²`` (``lse`` the log-sum-exp of its logits) to its loss
    (``reduction="none"``, what torch returns), then the reduction as torch's: ``sum``, or
    ``mean`` divided by the sum of the kept targets' class weights (their count without)."""
    per = F.cross_entropy(
        input,
        target,
        weight=weight,
        ignore_index=ignore_index,
        reduction="none",
        label_smoothing=label_smoothing,
    )
    keep = target != ignore_index
    lse = torch.logsumexp(input, dim=1 if input.dim() > 1 else 0)
    per = per + torch.where(keep, z_loss * lse * lse, 0)
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    counted = (
        keep.to(per.dtype) if weight is None else torch.where(keep, weight[torch.where(keep, target, 0)], 0)
    )
    return per.sum() / counted.sum()


class _CrossEntropy(torch.autograd.Function):
    """Forward and backward of :class:`CrossEntropyFunction`, with the arguments as
    :func:`_cross_entropy` leaves them and ``out_dtype`` last. While torch.compile traces, the
    kernels run as ``torch.ops.fusedopt`` ops and the backward of ``mean``/``sum`` returns
    ``stored * grad_output`` as a new tensor, every time (a compiled backward cannot keep the
    first-backward state). A backward that autograd records (``create_graph=True``)
    differentiates :func:`torch_cross_entropy` on the saved logits instead."""

    @staticmethod
    def forward(
        ctx, input, target, weight, ignore_index, reduction, label_smoothing, out_dtype, z_loss, softcap
    ):
        forward = _forward_traced if torch.compiler.is_compiling() else _forward
        out = forward(
            input, target, weight, ignore_index, reduction, label_smoothing, True, out_dtype, z_loss, softcap
        )
        ctx.reduction, ctx.ignore_index, ctx.label_smoothing = reduction, ignore_index, label_smoothing
        ctx.z_loss, ctx.softcap = z_loss, softcap
        if reduction == "none":
            ctx.save_for_backward(input, out.rows, out.target, weight, out.stats, out.lse)
        else:  # the logits only for a backward with create_graph: weakly (see the module)
            ctx.save_for_backward(target, weight)
            ctx.logits = None if torch.compiler.is_compiling() else _weak_logits(input)
            ctx.grad = out.grad
            ctx.applied = torch.empty((), dtype=out.stats.dtype, device=input.device)
            ctx.first = True
        return out.loss

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():  # create_graph=True: a backward autograd records
            if ctx.reduction == "none":
                input, _, target, weight, _, _ = ctx.saved_tensors
                target = target.reshape(grad_output.shape)  # kept flat
            else:
                target, weight = ctx.saved_tensors
                input = _held_logits(ctx.logits)
            (grad,) = differentiable_grads(
                lambda input: torch_cross_entropy(
                    input, target, weight, ctx.ignore_index, ctx.reduction, ctx.label_smoothing, ctx.z_loss,
                    ctx.softcap,
                ),
                (input,),
                (True,),
                grad_output,
            )  # fmt: skip
        elif ctx.reduction == "none":
            grad = _backward_none(
                *ctx.saved_tensors, grad_output, ctx.ignore_index, ctx.label_smoothing, ctx.z_loss, ctx.softcap
            )  # fmt: skip
        elif torch.compiler.is_compiling():
            grad = scaled_copy(ctx.grad, grad_output)
        else:
            grad = _scale_grad(ctx.grad, grad_output, ctx.applied, ctx.first)
            ctx.first = False
        return grad, None, None, None, None, None, None, None, None


def _weak_logits(input: torch.Tensor) -> tuple:
    """A weak reference to the tensor that owns ``input``'s memory (its base, for a view), with
    its version and how to view ``input`` in it again."""
    base = input if input._base is None else input._base
    return weakref.ref(base), base._version, (input.shape, input.stride(), input.storage_offset())


def _held_logits(held: tuple | None) -> torch.Tensor:
    """The logits of a ``mean``/``sum`` forward for a backward with ``create_graph``: the
    caller's tensor if it is still alive and unchanged, else a clear error."""
    base = None
    if held is not None:
        ref, version, view = held
        base = ref()
        if base is not None and base._version != version:
            base = None
    if base is None:
        raise RuntimeError(
            "fusedopt cross_entropy (reduction 'mean' or 'sum') keeps the gradient it computed in "
            "the forward, not the logits: a backward with create_graph=True (a second derivative) "
            "needs the logits alive and unchanged until then. Keep a reference to them "
            "(logits = model(x); loss = cross_entropy(logits, target)), or use "
            "torch.nn.functional.cross_entropy."
        )
    shape, stride, offset = view
    if base.shape == shape and base.stride() == stride and base.storage_offset() == offset:
        return base
    return base.as_strided(shape, stride, offset)


def arguments(weight, ignore_index, reduction, label_smoothing) -> tuple[str, int, float]:
    """torch's handling of cross-entropy's scalar arguments: ``(reduction, ignore_index,
    label_smoothing)`` normalized (reduction a name; smoothing 0 unless > 0, as torch: negative
    or NaN is none, > 1 raises in the launcher's check), and the error torch gives for a class
    ``weight`` that requires grad."""
    reduction = REDUCTIONS[_reduction.get_enum(reduction)]  # torch's check and message
    if torch.is_grad_enabled() and weight is not None and weight.requires_grad:
        raise RuntimeError(
            "fusedopt.cross_entropy is not differentiable with respect to argument 'weight'. "
            "This input cannot have requires_grad True."
        )
    return reduction, int(ignore_index), float(label_smoothing) if label_smoothing > 0.0 else 0.0


def check_z_loss(z_loss) -> float:
    """``z_loss`` as a float: a finite number >= 0 (0: none), else a ValueError."""
    if isinstance(z_loss, bool) or not isinstance(z_loss, int | float) or not 0.0 <= z_loss < float("inf"):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    return float(z_loss)


def check_softcap(softcap) -> float:
    """``softcap`` as a float: None (no cap: 0.0) or a finite number > 0, else a ValueError."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, int | float) or not 0.0 < softcap < float("inf"):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
    return float(softcap)


def _cross_entropy(
    input, target, weight, ignore_index, reduction, label_smoothing, z_loss=0.0, softcap=0.0
) -> torch.Tensor:
    """torch's handling of the arguments, then the autograd Function when autograd records
    (grad mode on and ``input.requires_grad``), else the forward alone (no gradient buffer).

    A function rather than an override of ``apply``: dynamo calls an autograd Function's own
    ``apply`` and never an override."""
    reduction, ignore_index, label_smoothing = arguments(weight, ignore_index, reduction, label_smoothing)
    # Under autocast torch computes cross-entropy in fp32 (it casts fp16/bf16 logits and class
    # weights to fp32) and returns an fp32 loss; the math here is fp32 anyway, so only the loss's
    # dtype changes (the gradient keeps the logits') and the kernels read the logits as they are.
    out_dtype = input.dtype
    if torch.is_autocast_enabled(input.device.type):
        if input.dtype in AUTOCAST_TO_FP32:
            out_dtype = torch.float32
        if weight is not None and weight.dtype in AUTOCAST_TO_FP32:
            weight = weight.float()
    args = (input, target, weight, ignore_index, reduction, label_smoothing)
    if torch.is_grad_enabled() and input.requires_grad:
        return _CrossEntropy.apply(*args, out_dtype, z_loss, softcap)
    forward = _forward_traced if torch.compiler.is_compiling() else _forward
    return forward(*args, False, out_dtype, z_loss, softcap).loss


class CrossEntropyFunction(_CrossEntropy):
    """``torch.nn.functional.cross_entropy`` for class-index targets, on Triton kernels.

    ``apply(input, target, weight=None, ignore_index=-100, reduction="mean",
    label_smoothing=0.0)`` returns what torch returns (value, dtype, shape): input (C,), (N, C)
    or (N, C, d1, ...) (classes in dim 1, any strides), target (), (N,) or (N, d1, ...) of
    int64 or uint8, weight (C,) or None.

    The gradient is computed by the forward kernel only when autograd records (grad mode on
    and ``input.requires_grad``); :meth:`apply` decides this, because inside ``forward`` grad
    mode is always off. Otherwise no gradient buffer is allocated.

    Backward for ``mean``/``sum``: the stored gradient times ``grad_output``, no host sync; no
    work when ``grad_output`` is 1. A second backward of the same graph (``retain_graph=True``)
    returns a new tensor ``stored * grad_output / applied``, where ``applied`` (a device
    scalar) is the first backward's ``grad_output``: correct unless that was 0 or non-finite
    (then the stored gradient is lost and the result is NaN). ``none`` recomputes from the
    logits and each row's log-sum-exp, any number of times.

    Under ``torch.compile`` call :func:`cross_entropy` (or the ``fusedopt.functional`` and
    ``fusedopt.nn`` faces): dynamo traces an autograd Function's own ``apply``, never this one.
    """

    @classmethod
    def apply(cls, input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
        return _cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing)


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Cross-entropy between logits and class-index targets, as
    ``torch.nn.functional.cross_entropy`` (same value, dtype, shape and errors).

    Args:
        input: logits (C,), (N, C) or (N, C, d1, ...); classes in dim 1; fp32, fp64, fp16, bf16.
        target: class indices (), (N,) or (N, d1, ...), int64 or uint8. Class-probability
            targets raise ``NotImplementedError``.
        weight: (C,) class weights, the input's dtype, or None.
        ignore_index: target value whose rows contribute neither loss nor gradient.
        reduction: ``"none"`` (loss per target element), ``"mean"`` (divided by the sum of the
            weights of the targets not ignored) or ``"sum"``.
        label_smoothing: ε in ``(1 - ε) onehot + ε / C``; torch applies it only when ε > 0.
        z_loss: keyword-only, >= 0: each target element not ignored adds ``z_loss · lse²``
            (``lse`` the log-sum-exp of its logits; PaLM's z-loss) to its loss, reduced like the
            loss (``mean``: divided by the same sum of weights); :func:`z_loss_composition`.
        softcap: keyword-only, None or > 0: every logit ``z`` becomes ``softcap · tanh(z /
            softcap)`` before the softmax (Gemma 2's soft-capping; the z-loss's lse is that of
            the capped logits); :func:`cross_entropy_composition`.

    Targets outside ``[0, C)`` that are not ``ignore_index`` raise torch's ``IndexError`` (CPU)
    or trigger a device-side assert (CUDA, as torch's; no host sync). Non-finite logits give
    torch's results: a row with a NaN or +inf logit (or only -inf ones) has a NaN loss and NaN
    gradients. ``create_graph=True`` gives torch's second derivatives (see the module
    docstring). Tensors on devices the Triton kernels do not run on (CPU without
    ``TRITON_INTERPRET=1``), and dtypes they do not support, go to torch's own implementation.
    """
    z_loss, softcap = check_z_loss(z_loss), check_softcap(softcap)
    if not runs_triton(input.device) or input.dtype not in TL_DTYPE:
        if z_loss > 0.0 or softcap > 0.0:  # (else torch's own handling of them)
            reduction, ignore_index, label_smoothing = arguments(
                weight, ignore_index, reduction, label_smoothing
            )
        return cross_entropy_composition(
            input, target, weight, ignore_index, reduction, label_smoothing, z_loss=z_loss, softcap=softcap
        )
    return _cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap)
