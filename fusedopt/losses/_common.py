"""What every fused loss shares: the grid rule, the custom-op registration ``torch.compile``
sees, and the two backward forms of a reduced loss that are not the eager in-place scaling
(the new-tensor scaling while compiling, the differentiable composition under
``create_graph=True``)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch

# CUDA's limit on grid axis 0 (axes 1 and 2: 65,535). The kernels here loop over their work
# items (program p takes items p, p + grid, ...), so the grid is capped, never the input.
MAX_PROGRAMS = 2**31 - 1


def grid(items: int) -> tuple[int]:
    """The 1-D grid for ``items`` work items: one program each, at most :data:`MAX_PROGRAMS`."""
    return (min(items, MAX_PROGRAMS),)


def checked_grid(programs: int) -> tuple[int]:
    """The 1-D grid of a kernel that takes one work item per program, whose size rule bounds
    ``programs`` far below CUDA's limit for any tensor that fits in memory; a clear error, not a
    failed launch, if it ever did not."""
    if programs > MAX_PROGRAMS:
        raise RuntimeError(
            f"fusedopt: a launch of {programs} programs exceeds CUDA's grid limit ({MAX_PROGRAMS})"
        )
    return (programs,)


def compilable(name: str, fake: Callable, schema: str | None = None) -> Callable[[Callable], Callable]:
    """Register a launcher as the custom op ``torch.ops.fusedopt.<name>``, for torch.compile.

    The launcher returns new tensors and writes none of its arguments; ``fake`` returns empty
    tensors of the outputs' shapes, dtypes and strides; ``schema`` (default: from the type
    hints of the positional parameters) may leave out trailing arguments with defaults that only
    eager calls pass. Keyword-only parameters are eager-only too (objects an op cannot take,
    such as a process group): a call that gives one a value other than None runs the launcher,
    also while compiling.
    The function returned calls the launcher itself in eager (the dispatcher would add ~10-15 µs
    per call) and the op while torch.compile traces (dynamo cannot trace ``data_ptr`` launches);
    ``.op`` is the op.
    """

    def register(launcher: Callable) -> Callable:
        op = torch.library.custom_op(
            f"fusedopt::{name}", launcher, mutates_args=(), schema=schema or _positional_schema(launcher)
        )
        op.register_fake(fake)

        @functools.wraps(launcher)
        def call(*args, **eager_only):
            if torch.compiler.is_compiling() and all(v is None for v in eager_only.values()):
                return op(*args)
            return launcher(*args, **eager_only)

        call.op = op
        return call

    return register


def _positional_schema(launcher: Callable) -> str:
    """The op schema of ``launcher``'s positional parameters (its keyword-only ones left out)."""
    signature = inspect.signature(launcher)
    kept = [p for p in signature.parameters.values() if p.kind is not p.KEYWORD_ONLY]

    def prototype():
        pass

    prototype.__signature__ = signature.replace(parameters=kept)
    return torch.library.infer_schema(prototype, mutates_args=())


def scaled_copy(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """``grad * grad_output`` as a new tensor in ``grad``'s dtype: the backward of a reduced
    loss while torch.compile traces. The compiled backward may run more than once
    (``retain_graph=True``), so it must not scale the forward's buffer in place as eager does;
    plain torch ops let inductor fuse the product (one pass: 8 B per fp32 element)."""
    return (grad * grad_output).to(grad.dtype)


def differentiable_grads(
    loss: Callable[..., torch.Tensor],
    inputs: tuple[torch.Tensor | None, ...],
    needs: tuple[bool, ...],
    grad_output: torch.Tensor,
) -> tuple[torch.Tensor | None, ...]:
    """The gradients of ``loss(*inputs)`` (a plain torch composition) for the inputs in
    ``needs``, with ``create_graph``: the backward of a fused loss when autograd records it
    (``create_graph=True``), so that second derivatives are torch's. ``inputs`` are the saved
    tensors, still attached to the caller's graph. The composition computes in fp32 (fp64 for
    fp64) as the kernels do, so ``grad_output`` is cast to its loss's dtype (differentiably)."""
    wanted = [t for t, need in zip(inputs, needs, strict=True) if need]
    with torch.enable_grad():
        out = loss(*inputs)
        grads = iter(
            torch.autograd.grad(out, wanted, grad_output.to(out.dtype), create_graph=True, allow_unused=True)
        )
    return tuple(next(grads) if need else None for need in needs)
