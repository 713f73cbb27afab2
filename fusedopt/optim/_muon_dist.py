"""Muon's Newton–Schulz for DTensor params (FSDP2): each matrix orthogonalized whole, by one rank.

A rank holds only its rows of an FSDP2 param (``Shard(0)``), but Newton–Schulz needs the whole
matrix. Every sharded matrix gets one *owner* in its shard group (:func:`owners`, balanced by
:func:`newton_schulz_cost`; every rank computes the same assignment from the shapes alone). Per
process group and step:

1. one ``all_to_all_single`` brings each rank's rows of every update to the matrix's owner, in
   bf16 (Newton–Schulz rounds its input to bf16 first; rounding is elementwise, so the rows
   rounded apart are the whole matrix rounded);
2. every rank orthogonalizes the matrices it owns (one ``orthogonalize`` call for all of them,
   so matrices of one shape still run batched);
3. one ``all_to_all_single`` sends each rank its rows of every result.

That is two collectives per process group per step, whatever the number of params. The split
sizes follow from the shapes and placements (``torch.chunk``'s rows per rank, as DTensor shards),
so no sizes are exchanged. A param replicated on every mesh dim is orthogonalized where it is,
with no communication. Every rank must step the same params (FSDP2 gives every rank a grad,
empty shards included), or the ranks' collectives would not match.

Supported placements: ``Replicate()`` on every mesh dim, or ``Shard(0)`` on one mesh dim and
``Replicate()`` on the others (FSDP2 on a 1-D mesh; HSDP's ``(Replicate(), Shard(0))``, where
each replica group exchanges within its own shard group and orthogonalizes redundantly). Other
placements (``Shard(1)``, tensor parallel's ``_StridedShard``, ``Partial``) are refused by
:func:`shard_dim`.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

import torch
import torch.distributed as dist

from fusedopt._dist import is_dtensor


def newton_schulz_cost(shape: tuple[int, int]) -> int:
    """Multiply-adds of one Newton–Schulz step on a matrix of ``shape``: ``s²(2l + s)``, ``s``
    its smaller and ``l`` its larger dim (``ns_steps`` times that for the whole chain, a factor
    common to a group's matrices that does not change :func:`owners`)."""
    s, l = sorted(shape)  # noqa: E741
    return s * s * (2 * l + s)


def owners(costs: list[float], world: int) -> list[int]:
    """The rank (``0 .. world - 1``) that orthogonalizes each matrix: the largest cost first,
    each onto the rank with the least cost so far (ties: the first matrix, the lowest rank).
    Deterministic: every rank computes the same answer from the same costs."""
    loads = [(0, rank) for rank in range(world)]  # a heap of (load, rank)
    out = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(loads)
        out[i] = rank
        heapq.heappush(loads, (load + costs[i], rank))
    return out


def shard_dim(p: torch.Tensor) -> int | None:
    """The mesh dim a DTensor param's rows are sharded over (``Shard(0)``), or None when it is
    whole on this rank (replicated on every mesh dim, or a plain tensor);
    ``NotImplementedError`` for any other placements."""
    if not is_dtensor(p):
        return None
    from torch.distributed.tensor import Replicate, Shard

    dims = [d for d, x in enumerate(p.placements) if type(x) is not Replicate]
    if len(dims) > 1 or any(type(p.placements[d]) is not Shard or p.placements[d].dim != 0 for d in dims):
        raise NotImplementedError(
            f"FusedMuon: a Muon group's DTensor param has placements {tuple(p.placements)}; supported are "
            "Shard(0) on one mesh dim (FSDP2, HSDP) and Replicate() on the others"
        )
    mesh = p.device_mesh
    if mesh.get_coordinate() is None:
        raise NotImplementedError("FusedMuon: a Muon group's DTensor param is on a mesh without this rank")
    if dims and dist.get_rank(mesh.get_group(dims[0])) != mesh.get_local_rank(dims[0]):
        # FSDP2 assumes it too: the shard a rank holds is its rank in the group
        raise NotImplementedError("FusedMuon: a mesh whose group ranks are not its coordinates")
    return dims[0] if dims else None


def orthogonalize_sharded(
    params: list[torch.Tensor],
    updates: list[torch.Tensor],
    orthogonalize: Callable[[list[torch.Tensor]], list[torch.Tensor]],
) -> list[torch.Tensor]:
    """``orthogonalize`` of each param's whole update matrix, each rank getting its rows.

    Args:
        params: DTensor params (placements as :func:`shard_dim` accepts) or plain tensors
            (whole on every rank), any number of dims: each is orthogonalized as the matrix
            ``[shape[0], -1]``.
        updates: for each param, this rank's rows of that matrix's update: a plain 2-D tensor
            ``[local rows, cols]``, the ``[rows, -1]`` view of ``params[i].to_local()``'s shape
            (the caller makes the view).
        orthogonalize: whole 2-D matrices in, their orthogonalized matrices out (Newton–Schulz:
            ``lambda ms: newton_schulz(ms, coefficients, steps, eps)``), called once; it gets
            the matrices of sharded params in bf16.

    Returns:
        For each param, this rank's rows of the orthogonalized matrix (the shape of
        ``updates[i]``): in bf16 for a sharded param (the results travel back in bf16,
        Newton–Schulz's own dtype), as ``orthogonalize`` returns them for a whole one.
    """
    dims = [shard_dim(p) for p in params]  # refuse before any communication
    here = [i for i, d in enumerate(dims) if d is None]  # whole on this rank already
    by_group: dict[dist.ProcessGroup, list[int]] = {}  # the params sharded over each group
    for i, (p, d) in enumerate(zip(params, dims, strict=True)):
        if d is not None:
            by_group.setdefault(p.device_mesh.get_group(d), []).append(i)
    exchanges = []
    for group, members in by_group.items():
        shapes = [(params[i].shape[0], updates[i].shape[1]) for i in members]
        exchanges.append((_Exchange(group, shapes, updates[members[0]].device), members))
    matrices = [updates[i] for i in here]
    for exchange, members in exchanges:
        matrices += exchange.gather([updates[i] for i in members])
    results = iter(orthogonalize(matrices))
    out: list[torch.Tensor | None] = [None] * len(params)
    for i in here:
        out[i] = next(results)
    for exchange, members in exchanges:
        owned = [next(results) for _ in exchange.owned_by[exchange.rank]]
        for i, o in zip(members, exchange.scatter(owned), strict=True):
            out[i] = o
    return out


class _Exchange:
    """The sharded matrices of one process group: which rank owns each, which rows each rank
    holds (``rows[k][r]`` of matrix ``k`` on group rank ``r``), and the two all-to-alls.

    A buffer a rank sends or receives is ordered by the other rank, then by matrix."""

    def __init__(self, group: dist.ProcessGroup, shapes: list[tuple[int, int]], device: torch.device):
        self.group, self.device = group, device
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.rows = [_rows(rows, self.world) for rows, _ in shapes]
        self.cols = [cols for _, cols in shapes]
        owner = owners([newton_schulz_cost(s) for s in shapes], self.world)
        self.owned_by = [[k for k in range(len(shapes)) if owner[k] == r] for r in range(self.world)]
        # elements this rank sends each owner (its rows of their matrices), and gets from each
        # rank (their rows of its matrices); the return trip swaps the two
        self.to_owners = [sum(self._size(k, self.rank) for k in self.owned_by[r]) for r in range(self.world)]
        self.from_ranks = [sum(self._size(k, r) for k in self.owned_by[self.rank]) for r in range(self.world)]

    def _size(self, k: int, rank: int) -> int:
        return self.rows[k][rank] * self.cols[k]

    def gather(self, shards: list[torch.Tensor]) -> list[torch.Tensor]:
        """This rank's rows of every matrix (``[rows[k][rank], cols[k]]``) in; the whole bf16
        matrices it owns (``owned_by[rank]`` order) out."""
        mine = self.owned_by[self.rank]
        if any(s.shape[0] != rows[self.rank] for s, rows in zip(shards, self.rows, strict=True)):
            raise RuntimeError(
                "FusedMuon: a DTensor param's local rows are not torch.chunk's (DTensor's Shard)"
            )
        sent = [shards[k].bfloat16().reshape(-1) for r in range(self.world) for k in self.owned_by[r]]
        pieces = self._all_to_all(sent, self.to_owners, self.from_ranks).split(
            [self._size(k, r) for r in range(self.world) for k in mine]
        )
        return [
            torch.cat(
                [pieces[r * len(mine) + j].view(self.rows[k][r], self.cols[k]) for r in range(self.world)]
            )
            for j, k in enumerate(mine)
        ]

    def scatter(self, results: list[torch.Tensor]) -> list[torch.Tensor]:
        """The results of the matrices this rank owns in (``owned_by[rank]`` order); this
        rank's rows of every matrix's result out (``[rows[k][rank], cols[k]]``)."""
        mine = self.owned_by[self.rank]
        sent = []
        for r in range(self.world):
            for k, o in zip(mine, results, strict=True):
                start = sum(self.rows[k][:r])
                sent.append(o[start : start + self.rows[k][r]].bfloat16().reshape(-1))
        order = [k for r in range(self.world) for k in self.owned_by[r]]
        pieces = self._all_to_all(sent, self.from_ranks, self.to_owners).split(
            [self._size(k, self.rank) for k in order]
        )
        out: list[torch.Tensor | None] = [None] * len(self.rows)
        for k, piece in zip(order, pieces, strict=True):
            out[k] = piece.view(self.rows[k][self.rank], self.cols[k])
        return out

    def _all_to_all(
        self, sent: list[torch.Tensor], split_in: list[int], split_out: list[int]
    ) -> torch.Tensor:
        """One ``all_to_all_single`` of bf16 elements: ``split_in[r]`` of ``sent`` (concatenated)
        to rank ``r``, ``split_out[r]`` from it."""
        flat = torch.cat(sent) if sent else torch.empty(0, dtype=torch.bfloat16, device=self.device)
        out = torch.empty(sum(split_out), dtype=torch.bfloat16, device=self.device)
        dist.all_to_all_single(out, flat, split_out, split_in, group=self.group)
        return out


def _rows(n: int, world: int) -> list[int]:
    """Rows of each rank's shard of ``n`` rows over ``world`` ranks (``torch.chunk``'s, as
    DTensor's ``Shard``: trailing shards may be short or empty)."""
    chunk = -(-n // world)
    return [max(0, min(n, (r + 1) * chunk) - r * chunk) for r in range(world)]
