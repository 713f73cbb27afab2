"""Global gradient norms over many tensors: the reduction behind ``clip_grad_norm_`` and the
optimizers' ``max_grad_norm`` / ``fusedopt.GradScaler`` inf check.

The total norm is one multi-tensor reduction pass per device and grad dtype
(``fusedopt.kernels.clip``: a partial per block, then one program adds the partials in a
fixed order: deterministic, no atomics), plus one finishing launch; the clip is one in-place
multi-tensor pass. Nothing is read on the host. ``fusedopt.clip`` (the public face) and the
optimizer core both build on this module.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from fusedopt._dist import Domain, domain, local, reduce_norms
from fusedopt._multi_tensor import TL_DTYPE, TensorTable, _dense, compute_dtype, runs_triton
from fusedopt.kernels import clip as kernels

_FINISH_BLOCK = 1024


def norm_order(norm_type: float) -> tuple[int, float] | None:
    """The kernels' ``(ORD, P)`` for a norm type, or None for those left to torch (p <= 0)."""
    p = float(norm_type)
    if p == math.inf:
        return kernels.ORD_INF.value, 1.0
    if p == 2.0:
        return kernels.ORD_TWO.value, 2.0
    if p == 1.0:
        return kernels.ORD_ONE.value, 1.0
    if 0.0 < p < math.inf:
        return kernels.ORD_P.value, p
    return None


@dataclass
class NormSource:
    """Grads of one device and dtype laid out by ``table`` (blocks), their addresses in column 0
    of ``grads`` (int64 [T, width])."""

    table: TensorTable
    grads: torch.Tensor
    width: int
    aligned: bool
    dtype: torch.dtype


def _guard(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _result_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    return functools.reduce(torch.promote_types, dtypes)


def total_norm(
    sources: list[NormSource],
    leftovers: list[torch.Tensor],
    norm_type: float,
    grad_scale: torch.Tensor | None = None,
    exact: bool = False,
) -> torch.Tensor:
    """The ``norm_type`` norm of all grads (of ``grads / grad_scale`` when given), as a 0-d
    tensor on the first grad's device in the grads' promoted dtype, as torch returns it, or
    with ``exact`` in the arithmetic dtype (fp32, fp64 if any grad is fp64: ``max_grad_norm``'s
    clip coefficient is not rounded to bf16/fp16).

    ``leftovers`` are grads the kernels cannot walk (not dense, or on a device without Triton):
    their norms are taken with torch and combined as torch combines per-tensor norms.
    """
    ord_, p = norm_order(norm_type)
    result_dtype = _result_dtype([s.dtype for s in sources] + [g.dtype for g in leftovers])
    if exact:
        result_dtype = compute_dtype(result_dtype)
    by_device: dict[torch.device, list[NormSource]] = {}
    for s in sources:
        by_device.setdefault(s.table.device, []).append(s)
    single = len(by_device) == 1 and not leftovers
    norms = []
    for device, group in by_device.items():
        ct = torch.float64 if any(s.dtype == torch.float64 for s in group) else torch.float32
        partials = torch.empty(sum(s.table.num_blocks for s in group), dtype=ct, device=device)
        out = torch.empty((), dtype=result_dtype if single else ct, device=device)
        offset = 0
        with _guard(device):
            for s in group:
                n = s.table.num_blocks
                if n:
                    kernels.norm_partials_kernel[(n,)](
                        s.grads,
                        s.table.meta,
                        s.table.owner,
                        partials[offset:],
                        partials if grad_scale is None else grad_scale,
                        G=s.width,
                        DTYPE=TL_DTYPE[s.dtype],
                        COMPUTE=TL_DTYPE[compute_dtype(s.dtype)],
                        BLOCK=s.table.block,
                        ORD=ord_,
                        P=p,
                        HAS_GRAD_SCALE=grad_scale is not None,
                        ALIGNED=s.aligned,
                        num_warps=s.table.num_warps,
                    )
                offset += n
            kernels.norm_finish_kernel[(1,)](
                partials, out, offset, OUT_DTYPE=TL_DTYPE[out.dtype], COMPUTE=TL_DTYPE[ct],
                BLOCK=_FINISH_BLOCK, ORD=ord_, P=p,
            )  # fmt: skip
        norms.append(out)
    if single:
        return norms[0]
    for g in leftovers:  # exact: in the arithmetic dtype (bf16 grads' norm not rounded to bf16)
        x = g.to(compute_dtype(g.dtype)) if exact or grad_scale is not None else g
        x = x if grad_scale is None else x / grad_scale.to(g.device)
        norms.append(torch.linalg.vector_norm(x, norm_type))
    first = norms[0].device
    stacked = torch.stack(
        [n.to(first, torch.float64 if n.dtype == torch.float64 else torch.float32) for n in norms]
    )
    return torch.linalg.vector_norm(stacked, norm_type).to(result_dtype)


Parts = dict[Domain, tuple[list[NormSource], list[torch.Tensor]]]


def global_norm(parts: Parts, norm_type: float, grad_scale: torch.Tensor | None = None, exact: bool = False):
    """:func:`total_norm` of grads split by domain (:mod:`fusedopt._dist`): each domain's local
    norm, made global across ranks, then combined as torch combines per-tensor norms. Grads
    all plain (no DTensor) take :func:`total_norm` directly."""
    if list(parts) == [None]:
        return total_norm(*parts[None], norm_type, grad_scale, exact)
    dtypes = [t.dtype for sources, leftovers in parts.values() for t in (*sources, *leftovers)]
    result_dtype = _result_dtype(dtypes)
    local_norms = {d: total_norm(*part, norm_type, grad_scale, exact=True) for d, part in parts.items()}
    norms = reduce_norms(local_norms, norm_type)
    total = norms[0]
    if len(norms) > 1:
        total = torch.linalg.vector_norm(
            torch.stack([n.to(total.device, total.dtype) for n in norms]), norm_type
        )
    return total.to(compute_dtype(result_dtype) if exact else result_dtype)


def split(grads: list[torch.Tensor], domains: list[Domain] | None = None) -> Parts:
    """Grads (DTensors or not) as the norm sources of their local shards, by domain
    (``domains``: those of grads already made local, else each grad's own)."""
    by_domain: dict[Domain, list[torch.Tensor]] = {}
    for i, g in enumerate(grads):
        by_domain.setdefault(domain(g) if domains is None else domains[i], []).append(local(g))
    return {d: sources_of(mine) for d, mine in by_domain.items()} or {None: ([], [])}


def clip_coefficient(total: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``min(max_norm / (total + 1e-6), 1)`` on the device, with torch's ops in torch's order."""
    return torch.clamp(max_norm / (total + 1e-6), max=1.0)


def scale_(sources: list[NormSource], leftovers: list[torch.Tensor], coef: torch.Tensor) -> None:
    """``g *= coef`` for every grad: one launch per source, torch's mul for the leftovers."""
    for s in sources:
        if s.table.num_blocks:
            with _guard(s.table.device):
                kernels.scale_kernel[(s.table.num_blocks,)](
                    s.grads, s.table.meta, s.table.owner, coef.to(s.table.device),
                    G=s.width, DTYPE=TL_DTYPE[s.dtype], COMPUTE=TL_DTYPE[compute_dtype(s.dtype)],
                    BLOCK=s.table.block, ALIGNED=s.aligned, num_warps=s.table.num_warps,
                )  # fmt: skip
    for g in leftovers:
        g.mul_(coef.to(g.device))


# Tables for clip_grad_norm_, keyed by the grads' addresses and sizes (a training loop passes
# the same grads every step; the key is all a table depends on).
_TABLES: OrderedDict[tuple, NormSource] = OrderedDict()
_TABLES_KEPT = 8


def sources_of(grads: list[torch.Tensor]) -> tuple[list[NormSource], list[torch.Tensor]]:
    groups: dict[tuple, list[torch.Tensor]] = {}
    leftovers = []
    for g in grads:
        if runs_triton(g.device) and g.dtype in TL_DTYPE and _dense(tuple(g.shape), g.stride()):
            groups.setdefault((g.device, g.dtype), []).append(g)
        else:
            leftovers.append(g)
    sources = []
    for (device, dtype), group in groups.items():
        key = (device, dtype, tuple((g.data_ptr(), g.numel()) for g in group))
        source = _TABLES.get(key)
        if source is None:
            table = TensorTable([group], device)
            source = NormSource(table, table.ptrs, 1, table.aligned, dtype)
            _TABLES[key] = source
            if len(_TABLES) > _TABLES_KEPT:
                _TABLES.popitem(last=False)
        else:
            _TABLES.move_to_end(key)
        sources.append(source)
    return sources, leftovers


@torch.library.custom_op("fusedopt::grad_norm", mutates_args=())
def _grad_norm_op(
    grads: list[torch.Tensor], norm_type: float, grad_scale: torch.Tensor | None, exact: bool
) -> torch.Tensor:
    return total_norm(*sources_of(grads), norm_type, grad_scale, exact).clone()


@_grad_norm_op.register_fake
def _(grads, norm_type, grad_scale, exact):
    dtype = _result_dtype(g.dtype for g in grads)
    return grads[0].new_empty((), dtype=compute_dtype(dtype) if exact else dtype)


@torch.library.custom_op("fusedopt::scale_grads_", mutates_args=("grads",))
def _scale_op(grads: list[torch.Tensor], coef: torch.Tensor) -> None:
    scale_(*sources_of(grads), coef)


@_scale_op.register_fake
def _(grads, coef) -> None:
    return None


def traced_norm(
    grads: list[torch.Tensor], norm_type: float, grad_scale: torch.Tensor | None, exact: bool = False
) -> torch.Tensor:
    """:func:`total_norm` of ``grads`` as one op ``torch.compile`` can trace."""
    return torch.ops.fusedopt.grad_norm(grads, norm_type, grad_scale, exact)
