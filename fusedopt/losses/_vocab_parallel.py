"""Vocabulary-parallel heads: the pieces a chunked loss needs when its head weight is sharded
over the classes (tensor parallel), so that each rank computes on its own slice of the
vocabulary and the ranks exchange per-row statistics, never logits or weights.

The layout taken: the head weight ``W`` [V, H] a DTensor placed ``(Shard(0),)`` on a 1-D
mesh (``torch.chunk``'s rows: uneven and empty shards allowed); the bias, if any, placed as
the weight; every other tensor (the input, the targets, the class weights) either a DTensor
``(Replicate(),)`` on that mesh or a plain tensor holding the same values on every rank.

The API, for the linear cross-entropy and the other chunked ops (log-probs and entropy,
distillation):

* :func:`vocab_shard` ``(weight, replicated=(...), sharded=(...))``: a :class:`VocabShard`
  (mesh, process group, this rank's first class ``offset``, the whole vocabulary
  ``classes``) when the operands have that layout, else None (the caller runs its
  composition, which DTensor can run on any layout);
* :func:`to_local` ``(t)``: the tensor the kernels read (a DTensor's local tensor, through
  ``DTensor.to_local``, so that autograd returns the gradient as a DTensor placed as ``t``:
  the weight's ``Shard(0)``, the input's ``Replicate()``); plain tensors as they are;
* :func:`combine_rows` ``(state, shard, rows)``: per-row statistics ``[K, N]`` accumulated
  over the local classes made global, in **one** ``all_gather_single`` of ``K N``
  elements per rank; ``rows`` says how each statistic combines: :data:`MAX` (a running max),
  :data:`SUM` (a plain sum: a target logit, ``Σ w z``), or an int ``j`` (a sum of
  ``exp(z - m_j)`` terms relative to the max of row ``j``, such as ``Σ exp(z - m)`` or the
  entropy's ``Σ exp(z - m) z``: rescaled by ``exp(m_j,r - M_j)`` before the sum). The result
  is the same, bit for bit, on every rank (rank order); or a pair ``(j, i)``: a sum of
  ``exp(z - m_j) (m_j - z)`` terms (the entropy's, every term >= 0), row ``i`` its slice's
  ``Σ exp(z - m_j)``: to the max ``M_j``, ``(u + (M_j - m_j) s_i) exp(m_j - M_j)``, every term
  still >= 0. The merge alone, without the
  collective: :func:`merge_rows` ``(states [S, K, N], rows)``. A distillation loss keeps two
  maxima (student, teacher) and their sums in one state: ``(MAX, 0, MAX, 2, ...)``;
* :func:`all_reduce_` ``(t, shard)``: a gradient that is a partial sum over the vocabulary
  (the input's: ``Σ_v dZ[:, v] W[v]``) summed across the ranks in place, one ``all_reduce``;
* :func:`like_input` ``(out, input, shard)``: a result identical on every rank, as a DTensor
  ``(Replicate(),)`` when the input is one (what DTensor's composition returns), else as is.

A loss in the vocabulary order (``fusedopt.losses._linear_cross_entropy_launch._blocks``)
runs pass 1 over its local classes with global class indices (``col0 = offset + v0``, ``K =
classes``) without finishing any row, :func:`combine_rows` once, finishes the rows from the
combined state, runs pass 2 (the gradient of its local logits) and :func:`all_reduce_` the
input's gradient once: two collectives per call whatever the number of tokens or blocks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from fusedopt._dist import is_dtensor

MAX = "max"  # combine_rows: a running max over the classes
SUM = "sum"  # combine_rows: a plain sum over the classes


class VocabShard(NamedTuple):
    """This rank's slice of the classes: ``classes[offset : offset + local rows]``."""

    mesh: object  # the 1-D DeviceMesh
    group: object  # its process group
    offset: int  # the global index of this rank's first class
    classes: int  # V: the whole vocabulary


def _placed(t: torch.Tensor | None, mesh, placement) -> bool:
    """``t`` is None, or a DTensor on ``mesh`` with exactly ``(placement,)`` (not a subclass
    such as ``_StridedShard``)."""
    if t is None or not is_dtensor(t):
        return t is None
    placements = tuple(t.placements)
    return t.device_mesh == mesh and placements == (placement,) and type(placements[0]) is type(placement)


def vocab_shard(
    weight: torch.Tensor,
    replicated: tuple[torch.Tensor | None, ...] = (),
    sharded: tuple[torch.Tensor | None, ...] = (),
) -> VocabShard | None:
    """The vocabulary slice ``weight`` holds, or None when the operands are not laid out as
    the module docstring says: ``weight`` a DTensor ``(Shard(0),)`` on a 1-D mesh; each of
    ``replicated`` None, a plain tensor, or a DTensor ``(Replicate(),)`` on that mesh; each of
    ``sharded`` None or a DTensor placed as ``weight``."""
    if not is_dtensor(weight) or weight.device_mesh.ndim != 1:
        return None
    from torch.distributed.tensor import Replicate, Shard

    mesh = weight.device_mesh
    if not _placed(weight, mesh, Shard(0)) or not all(_placed(t, mesh, Shard(0)) for t in sharded):
        return None
    if not all(not is_dtensor(t) or _placed(t, mesh, Replicate()) for t in replicated):
        return None
    vocab, world, rank = weight.shape[0], mesh.size(0), mesh.get_local_rank(0)
    rows = -(-vocab // world)  # torch.chunk's: ceil(V / world) rows a rank, the last ones fewer
    offset = min(rank * rows, vocab)
    if weight.to_local().shape[0] != min(rows, vocab - offset):
        raise RuntimeError(
            f"vocabulary-parallel head: rank {rank} holds {weight.to_local().shape[0]} of {vocab} classes, "
            f"not torch.chunk's {min(rows, vocab - offset)}"
        )
    return VocabShard(mesh, mesh.get_group(0), offset, vocab)


def to_local(t: torch.Tensor | None) -> torch.Tensor | None:
    """A DTensor's local tensor (differentiable: its gradient comes back as a DTensor placed
    as ``t``); a plain tensor or None as it is."""
    return t.to_local() if is_dtensor(t) else t


Row = str | int | tuple[int, int]  # how a statistic merges (combine_rows)


def combine_rows(state: torch.Tensor, shard: VocabShard, rows: tuple[Row, ...]) -> torch.Tensor:
    """Per-row statistics of the local classes ``state`` [K, N] → those of all the classes,
    [K, N], in one ``all_gather_single`` (``K N`` elements from each rank), merged by
    :func:`merge_rows`."""
    if len(rows) != state.shape[0]:
        raise ValueError(f"combine_rows: {len(rows)} row kinds for a state of {state.shape[0]} rows")
    gathered = state.new_empty((shard.mesh.size(0) * state.shape[0], state.shape[1]))  # gloo: ranks on dim 0
    dist.all_gather_single(gathered, state.contiguous(), group=shard.group)
    return merge_rows(gathered.view(-1, *state.shape), rows)


def merge_rows(states: torch.Tensor, rows: tuple[Row, ...]) -> torch.Tensor:
    """The statistics [K, N] of all the classes from those of disjoint slices of them,
    ``states`` [S, K, N]. ``rows[k]``: :data:`MAX`, :data:`SUM`, or ``j``: a sum of
    ``exp(z - m)`` terms with ``m`` the slice's max in row ``j`` (a :data:`MAX` row), rescaled
    to the overall max before the sum; or ``(j, i)``: a sum of ``exp(z - m) (m - z)`` terms,
    ``m`` row ``j``'s and row ``i`` the slice's ``Σ exp(z - m)``, gaining ``(M - m)`` times it
    before the rescale (0 for a slice whose sum is 0). Summed in slice order (every rank gets the same
    result). Maxima must be finite (the kernels keep them at the lowest finite value for rows
    without classes), so an empty slice contributes nothing to any sum; a NaN sum stays NaN."""
    out = states.sum(0)
    for k, kind in enumerate(rows):
        if kind == MAX:
            out[k] = states[:, k].amax(0)
    for k, kind in enumerate(rows):
        if isinstance(kind, int):
            out[k] = (states[:, k] * torch.exp(states[:, kind] - out[kind])).sum(0)
        elif isinstance(kind, tuple):
            j, i = kind
            gap = torch.where(states[:, i] == 0, 0, out[j] - states[:, j])  # a slice of no classes: 0
            out[k] = ((states[:, k] + gap * states[:, i]) * torch.exp(states[:, j] - out[j])).sum(0)
    return out


def all_reduce_(t: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """``t`` summed over the ranks, in place (one ``all_reduce``): a gradient each rank holds
    a partial sum of (over its classes)."""
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=shard.group)
    return t


def like_input(out: torch.Tensor, input: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """``out`` (the same on every rank) as a DTensor ``(Replicate(),)`` on the shard's mesh
    when ``input`` is a DTensor (differentiable), else ``out``."""
    if not is_dtensor(input):
        return out
    from torch.distributed.tensor import DTensor, Replicate

    return DTensor.from_local(out, shard.mesh, [Replicate()], run_check=False)
