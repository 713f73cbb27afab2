"""Distributed tensors: DTensor params (FSDP2, tensor parallel) and norms across ranks.

A DTensor param is stepped as its local shard: the kernels see ``local(t)`` (the shard a rank
owns, a plain tensor), so the local shards of every param of every group share one launch per
(device, dtype), whatever their meshes and placements. The state of a DTensor param is created
from the DTensor (``zeros_like`` keeps its mesh and placements), so ``state_dict`` and
``torch.distributed.checkpoint`` see DTensors, as with torch's optimizers.

A gradient norm of DTensor grads is taken locally, per *domain* (a mesh and the mesh
dimensions the grads are sharded over; replicated dimensions hold whole copies and are not
summed), then reduced across ranks with one all-reduce per process group and step: the local
``sum |g|^p`` (``max |g|`` for the infinity norm) of every domain over that group go in one
collective. Plain tensors (DDP, one process) are their own domain and are never reduced.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
import torch.distributed as dist


def _dtensor_type() -> type | None:
    """DTensor's class, if anything imported it (a DTensor cannot exist otherwise): importing
    ``torch.distributed.tensor`` ourselves would cost every user 0.4 s."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_dtensor(t: Any) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor the kernels read and write: a DTensor's local shard, else ``t`` itself."""
    return t._local_tensor if is_dtensor(t) else t


def any_dtensor(tensors) -> bool:
    cls = _dtensor_type()
    return cls is not None and any(isinstance(t, cls) for t in tensors)


def _partial(placements) -> bool:
    return any(x.is_partial() for x in placements)


def check_param(p: torch.Tensor, g: torch.Tensor) -> None:
    """Refuse (before anything changes) a grad the step cannot pair with its param's shard."""
    if not (is_dtensor(p) or is_dtensor(g)):
        return
    if not (is_dtensor(p) and is_dtensor(g)):
        which = "param" if is_dtensor(p) else "grad"
        raise RuntimeError(f"a DTensor {which} needs a DTensor {'grad' if which == 'param' else 'param'}")
    if g.device_mesh != p.device_mesh or tuple(g.placements) != tuple(p.placements):
        raise RuntimeError(
            "the grad of a DTensor param must have the param's mesh and placements, got "
            f"{g.placements} on {g.device_mesh} for a param with {p.placements} on {p.device_mesh}"
        )
    if _partial(p.placements):
        raise NotImplementedError(f"DTensor params with Partial placements cannot be stepped: {p.placements}")


Domain = tuple | None  # (mesh, sharded mesh dims) or None: a whole tensor on every rank


def domain(g: torch.Tensor) -> Domain:
    """Where the squares of this grad's shards must be summed: None for a plain tensor or one
    replicated on every mesh dimension, else its mesh and the dimensions it is sharded over."""
    if not is_dtensor(g):
        return None
    if _partial(g.placements):
        raise NotImplementedError(f"a norm of DTensor grads with Partial placements: {g.placements}")
    dims = tuple(d for d, x in enumerate(g.placements) if not x.is_replicate())  # Shard, _StridedShard
    return (g.device_mesh, dims) if dims else None


def reduce_norms(norms: dict[Domain, torch.Tensor], norm_type: float) -> list[torch.Tensor]:
    """Each domain's local norm made global: ``(all_reduce_sum(n**p))**(1/p)`` over the process
    groups of its sharded dims (max for the infinity norm; a NaN anywhere stays NaN). One
    collective per process group, carrying every domain that reduces over it."""
    p = float(norm_type)
    inf = p == math.inf
    values = {d: (n if inf or d is None else n**p) for d, n in norms.items()}
    rounds = max((len(d[1]) for d in values if d is not None), default=0)
    for r in range(rounds):
        by_group: dict[int, tuple[Any, list]] = {}
        for d in values:
            if d is not None and r < len(d[1]):
                group = d[0].get_group(d[1][r])
                by_group.setdefault(id(group), (group, []))[1].append(d)
        for group, members in by_group.values():
            stacked = torch.stack([values[d] for d in members])
            if inf:  # MAX drops NaN on some backends: carry the NaN as a flag beside the value
                flags = stacked.isnan()
                stacked = torch.cat([stacked.masked_fill(flags, math.inf), flags.to(stacked.dtype)])
                dist.all_reduce(stacked, op=dist.ReduceOp.MAX, group=group)
                k = len(members)
                stacked = torch.where(stacked[k:] > 0, math.nan, stacked[:k])
            else:
                dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)
            for d, v in zip(members, stacked.unbind(), strict=True):
                values[d] = v
    return [v if inf or d is None else v ** (1.0 / p) for d, v in values.items()]


def as_result(total: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    """A total norm as torch's ``clip_grad_norm_`` returns it: for DTensor grads a DTensor
    replicated on the first one's mesh, else the tensor itself."""
    first = next((g for g in grads if is_dtensor(g)), None)
    if first is None:
        return total
    from torch.distributed.tensor import DTensor, Replicate

    mesh = first.device_mesh
    return DTensor.from_local(total, mesh, [Replicate()] * mesh.ndim, run_check=False)
