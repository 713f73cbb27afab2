"""The launcher of FusedMuon's Triton path: a Muon group's matrices of one device and dtype.

One :class:`MuonLaunch` holds, for as long as the params, their buffers and their addresses
stay the same, what a step needs: the pointer tables of the two elementwise kernels
(:mod:`fusedopt.kernels.muon`), a bf16 workspace that holds every matrix's update (grouped by
shape, so each shape's matrices are one ``[n, rows, cols]`` batch: the input and output of that
shape's Newton–Schulz chain), the per-block partial sums and per-matrix divisors of the
normalization, and each matrix's learning-rate ratio. A step is then

    momentum + partial norms (1 launch) -> divisors (1 launch) -> per shape: divide, quintic
    chain, copy back (torch's batched matmuls) -> decay + update (1 launch)

whatever the number of matrices, with no host read (GradScaler's verdict, its scale, the clip
coefficient and a tensor lr are all read by the kernels on the device), so the step can be
captured in a CUDA graph once the tables exist.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fusedopt._multi_tensor import (
    TL_DTYPE,
    DeviceScalars,
    TensorTable,
    compute_dtype,
    launch_grid,
    tail_block,
    to_device,
)
from fusedopt.kernels import muon as kernels

_ALIGN = 8  # workspace elements (16 bytes of bf16) each shape's batch starts at a multiple of
_CHUNK = 128  # partial sums a program of the norms kernel adds per iteration


def check_newton_schulz(coefficients: tuple[float, float, float], steps: int) -> None:
    """torch's checks of its ``_zeropower_via_newtonschulz`` (made at step time, as torch's)."""
    if steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if len(coefficients) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")


def quintic(x: torch.Tensor, coefficients: tuple[float, float, float], steps: int) -> torch.Tensor:
    """``steps`` quintic Newton–Schulz steps ``X <- a X + (b A + c A²) X``, ``A = X Xᵀ``, of a
    batch of normalized wide (or square) bf16 matrices ``x`` [n, s, l]: a chain of ``bmm`` and
    ``baddbmm`` (``baddbmm`` rounds an element one bf16 step away from torch's ``addmm`` now
    and then: ``fusedopt.tolerance.MUON_TOLERANCE``)."""
    a, b, c = coefficients
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x


class MuonLaunch:
    """Tables and buffers for the Triton step of ``params`` (one device and dtype, dense; a
    DTensor's local shard) with momentum buffers ``bufs``, their updates held as matrices of
    ``shapes`` (the param's own 2-D shape or its ``[shape[0], -1]`` view; a shard's rows of
    it), each learning rate scaled by ``ratios[i]``; ``tall[i]``: the whole matrix is taller
    than wide (torch adds its update as a transposed view)."""

    def __init__(
        self,
        params: list[torch.Tensor],
        bufs: list[torch.Tensor],
        shapes: list[tuple[int, int]],
        ratios: list[float],
        tall: list[bool],
    ):
        device, self.dtype = params[0].device, params[0].dtype
        # the matrices ordered by shape, each shape's run of the workspace 16-byte aligned
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, shape in enumerate(shapes):
            by_shape.setdefault(tuple(shape), []).append(i)
        self.order = [i for members in by_shape.values() for i in members]
        starts, offset = [], 0
        for (rows, cols), members in by_shape.items():
            offset = -(-offset // _ALIGN) * _ALIGN
            starts.append(offset)
            offset += len(members) * rows * cols
        self.workspace = torch.empty(offset, dtype=torch.bfloat16, device=device)
        self.batches = []  # (first position in ``order``, [n, rows, cols] view, tall)
        views, first = [], 0
        for ((rows, cols), members), start in zip(by_shape.items(), starts, strict=True):
            batch = self.workspace[start : start + len(members) * rows * cols].view(len(members), rows, cols)
            self.batches.append((first, batch, rows > cols))
            views.extend(batch.unbind(0))
            first += len(members)
        position = {i: k for k, i in enumerate(self.order)}
        self.matrices = [views[position[i]] for i in range(len(params))]  # in the params' order
        ordered = [params[i] for i in self.order]
        self.momentum = TensorTable([[bufs[i] for i in self.order], views], device)
        self.update = TensorTable([ordered, views], device)
        self.partials = torch.empty(self.momentum.num_blocks, dtype=torch.float32, device=device)
        self.divisors = torch.empty(len(params), dtype=torch.bfloat16, device=device)
        # each matrix's lr ratio, and whether torch's CPU add_ rounds alpha * O to the dtype first:
        # its scalar loop does, in bf16/fp16, where O is a transposed view (a tall 2-D param's)
        low = self.dtype in (torch.bfloat16, torch.float16)
        rounded = [float(low and tall[i]) for i in self.order]
        self.ratios = to_device(
            torch.tensor(
                [[ratios[i], t] for i, t in zip(self.order, rounded, strict=True)], dtype=torch.float64
            ),
            device,
        )
        self.scalars = DeviceScalars(device)
        self.device = device

    def step(
        self,
        grads: list[torch.Tensor],
        group: dict,
        inv_scale: torch.Tensor | None,
        found_inf: torch.Tensor | None,
        clip_coef: torch.Tensor | None,
        exchange: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
    ) -> None:
        """One Muon step of the matrices with ``grads`` (in the params' order): ``inv_scale``
        (GradScaler's ``1 / scale``), ``found_inf`` (skip) and ``clip_coef`` on the device, or
        None. ``exchange``: for shards, the orthogonalized rows of each matrix from the rows of
        its update (:func:`fusedopt.optim._muon_dist.orthogonalize_sharded`), instead of the
        normalization and the chain here."""
        lr = group["lr"]
        scalars = self.scalars([group["momentum"], lr, group["weight_decay"]])
        ordered = [grads[i] for i in self.order]
        dynamic = self.momentum.dynamic(tuple(map(torch.Tensor.data_ptr, ordered)), lambda: [
            (g.data_ptr(),) for g in ordered
        ])  # fmt: skip
        dtype, compute = TL_DTYPE[self.dtype], TL_DTYPE[compute_dtype(self.dtype)]
        self.momentum.launch(
            kernels.muon_momentum_kernel, dynamic, self.partials, scalars, _or(inv_scale, scalars),
            _or(found_inf, scalars), _or(clip_coef, scalars), DTYPE=dtype, COMPUTE=compute,
            NESTEROV=bool(group["nesterov"]), HAS_INV_SCALE=inv_scale is not None,
            HAS_FOUND_INF=found_inf is not None, HAS_CLIP=clip_coef is not None,
        )  # fmt: skip
        if exchange is not None:
            torch._foreach_copy_(self.matrices, exchange(self.matrices))
        else:
            launch_grid(
                kernels.muon_norms_kernel, len(self.order), self.device, self.partials, self.momentum.meta,
                self.divisors, float(group["eps"]), BLOCK=self.momentum.block, CHUNK=_CHUNK,
            )  # fmt: skip
            self.orthogonalize(lambda x: quintic(x, group["ns_coefficients"], group["ns_steps"]))
        table = self.update
        launch_grid(
            kernels.muon_update_kernel, table.num_blocks, self.device, table.ptrs, table.meta, table.owner, scalars,
            self.ratios, _or(found_inf, scalars), DTYPE=dtype, COMPUTE=compute,
            FP32_LR=isinstance(lr, torch.Tensor) and lr.dtype == torch.float32,
            TORCH_CPU=self.device.type == "cpu",
            HAS_FOUND_INF=found_inf is not None, BLOCK=table.block, num_warps=table.num_warps,
            ALIGNED=table.aligned, TAIL=table.tail, TAIL_BLOCK=tail_block(table.block, table.num_warps),
        )  # fmt: skip

    def orthogonalize(self, chain: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Each shape's batch of updates in the workspace, divided by its divisors (the wide
        orientation: tall matrices transposed, as torch's), through ``chain``, written back."""
        for first, batch, tall in self.batches:
            divisors = self.divisors[first : first + batch.size(0), None, None]
            x = batch.mT if tall else batch
            x = chain(torch.div(x, divisors, out=torch.empty(x.shape, dtype=x.dtype, device=x.device)))
            batch.copy_(x.mT if tall else x)


def _or(t: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    return placeholder if t is None else t
