"""Distributed training on CPU: 2 ranks (gloo, spawned), kernels through the interpreter.

One spawned group runs every check in :data:`CHECKS` in order on both ranks and writes each
rank's verdicts to a file; each test below reads one check's verdicts. Every rank counts the
launches of its step kernels and its all-reduces, so a plain-torch fallback (no launch) or a
norm reduced per tensor fails. A rank stops at its first failure (the other then times out in
its next collective: the later checks report "not run").
"""

from __future__ import annotations

import datetime
import importlib
import itertools
import json
import os
import socket
import tempfile
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import close

import fusedopt
from fusedopt.kernels import muon as muon_kernels
from fusedopt.optim._step import ALGORITHMS
from fusedopt.testing import assert_close
from fusedopt.tolerance import MUON_TOLERANCE, OPTIM_TOLERANCE

WORLD = 2
STEPS = 3
if not dist.is_available():
    pytest.skip("torch without torch.distributed", allow_module_level=True)


# The model: uneven rows (7, 3 and 1 over 2 ranks: rank 1 holds an empty shard of the last) ---


def _model(seed: int = 0, sizes: tuple[int, ...] = (6, 7, 3, 1)) -> torch.nn.Module:
    """Linear layers from ``sizes[0]`` to ``sizes[-1]`` features, Tanh between them."""
    torch.manual_seed(seed)
    layers = []
    for n, m in itertools.pairwise(sizes):
        layers += [torch.nn.Linear(n, m), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1])


def _sharded(mesh, seed: int = 0, sizes: tuple[int, ...] = (6, 7, 3, 1)) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = _model(seed, sizes)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _batch(step: int, rank: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(4, 6, generator=gen)


def _backward(model: torch.nn.Module, step: int, rank: int, scale: float = 1.0) -> None:
    x = _batch(step, rank).to(next(model.parameters()).device)
    (model(x).pow(2).mean() * scale).backward()


def _global_backward(model: torch.nn.Module, step: int, ranks: int = WORLD) -> None:
    """The single-process backward of the batches of ``ranks`` ranks: the mean of their grads,
    as FSDP's."""
    model(torch.cat([_batch(step, r) for r in range(ranks)])).pow(2).mean().backward()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _same(ours, theirs, what: str) -> None:
    """Params and state of two optimizers over two models: within the optimizer contract."""
    for i, (p, q) in enumerate(
        zip(ours.param_groups[0]["params"], theirs.param_groups[0]["params"], strict=True)
    ):
        close(_local(p), _local(q), f"{what}: param {i}")
        mine, expected = ours.state[p], theirs.state[q]
        assert mine.keys() == expected.keys(), f"{what}: state keys of param {i}"
        for key, v in expected.items():
            if key == "step":
                assert float(mine[key]) == float(v), f"{what}: step of param {i}"
                continue
            close(_local(mine[key]), _local(v), f"{what}: state[{key}] of param {i}")
            if hasattr(p, "placements"):
                assert type(mine[key]) is type(p), f"{what}: state[{key}] of a DTensor param is not one"
                assert mine[key].placements == p.placements and mine[key].device_mesh == p.device_mesh


class _Count:
    """Launches of the step kernels (every algorithm's; FusedMuon's momentum and update kernels
    apart) and calls of ``dist.all_reduce`` and ``dist.all_to_all_single`` in this process."""

    def __init__(self):
        self.launches = 0
        self.all_reduces = 0
        self.all_to_alls = 0
        self.muon_launches = 0
        for kernel in {id(spec.kernel): spec.kernel for spec in ALGORITHMS.values()}.values():
            kernel.run = self._wrap(kernel.run, "launches")  # one kernel runs every algorithm
        for kernel in (muon_kernels.muon_momentum_kernel, muon_kernels.muon_update_kernel):
            kernel.run = self._wrap(kernel.run, "muon_launches")
        dist.all_reduce = self._wrap(dist.all_reduce, "all_reduces")
        dist.all_to_all_single = self._wrap(dist.all_to_all_single, "all_to_alls")

    def _wrap(self, fn, counter: str):
        def counted(*args, **kwargs):
            setattr(self, counter, getattr(self, counter) + 1)
            return fn(*args, **kwargs)

        return counted

    def during(self, fn, counters: tuple[str, ...] = ("launches", "all_reduces")) -> tuple[int, ...]:
        """How many of each of ``counters`` ``fn()`` made."""
        before = [getattr(self, c) for c in counters]
        fn()
        return tuple(getattr(self, c) - b for c, b in zip(counters, before, strict=True))


# The checks: each runs on every rank ---------------------------------------------------------

CASES = [
    (fusedopt.FusedSGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    (fusedopt.FusedAdam, torch.optim.Adam, dict(lr=0.01, amsgrad=True)),
    (fusedopt.FusedAdamW, torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
    (fusedopt.FusedRMSprop, torch.optim.RMSprop, dict(lr=0.01, momentum=0.5, centered=True)),
    (fusedopt.FusedAdagrad, torch.optim.Adagrad, dict(lr=0.1, initial_accumulator_value=0.1)),
]


def _side_by_side(models, optimizers, count, rank: int, clip=None, step=None, expect=(1, None)) -> None:
    """STEPS steps of ours and torch's optimizer on the same batches (torch's clip_grad_norm_
    to ``clip`` before its step); each of our steps (``step``: how to call it) must make
    ``expect`` = (launches, all-reduces; None: not counted)."""
    a, b = models
    ours, theirs = optimizers
    for i in range(STEPS):
        for model in (a, b):
            _backward(model, i, rank)
        counts = count.during(step or ours.step)
        assert all(e is None or c == e for c, e in zip(counts, expect, strict=True)), f"step {i}: {counts}"
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(b.parameters(), clip)
        theirs.step()
        ours.zero_grad()
        theirs.zero_grad()


def check_fsdp_parity(rank, mesh, count, workdir):
    """FSDP2 (Shard(0), uneven and empty shards): every fused optimizer against torch's, one
    launch per step for the 6 local shards, state DTensors placed as their params."""
    for fused_cls, torch_cls, kwargs in CASES:
        a, b = _sharded(mesh), _sharded(mesh)
        ours, theirs = fused_cls(a.parameters(), **kwargs), torch_cls(b.parameters(), **kwargs)
        _side_by_side((a, b), (ours, theirs), count, rank)  # one launch for the 6 shards
        _same(ours, theirs, fused_cls.__name__)


def _torch_norm(grads) -> torch.Tensor:
    """The reference: the 2-norm of the whole (gathered) gradients, in fp64."""
    full = [g.full_tensor() if hasattr(g, "full_tensor") else g for g in grads]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in full]))


def check_clipping(rank, mesh, count, workdir):
    """max_grad_norm and clip_grad_norm_ over FSDP2 grads as torch's clip_grad_norm_, with one
    all-reduce per step; the returned norm is a replicated DTensor, as torch's."""
    a, b = _sharded(mesh), _sharded(mesh)
    ours = fusedopt.FusedAdamW(a.parameters(), lr=0.01, max_grad_norm=0.05)
    theirs = torch.optim.AdamW(b.parameters(), lr=0.01)
    _side_by_side((a, b), (ours, theirs), count, rank, clip=0.05, expect=(1, 1))
    _same(ours, theirs, "max_grad_norm")
    for model in (a, b):
        _backward(model, STEPS, rank, scale=100.0)
    expected_norm = _torch_norm([p.grad for p in b.parameters()])
    out = {}
    _, reduces = count.during(lambda: out.update(norm=fusedopt.clip_grad_norm_(a.parameters(), 0.5)))
    theirs_norm = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.5)
    assert reduces == 1, f"clip_grad_norm_: {reduces} all-reduces"
    norm = out["norm"]
    assert type(norm) is type(theirs_norm) and norm.placements == theirs_norm.placements
    close(norm.full_tensor(), theirs_norm.full_tensor(), "clip_grad_norm_'s total norm")
    torch.testing.assert_close(norm.full_tensor().double(), expected_norm, rtol=1e-5, atol=0)
    for i, (p, q) in enumerate(zip(a.parameters(), b.parameters(), strict=True)):
        close(p.grad.to_local(), q.grad.to_local(), f"clipped grad {i}")


def check_grad_scaler(rank, mesh, count, workdir):
    """An inf in rank 1's shard only: both ranks skip the step and back off the scale alike
    (the inf check is the max-norm pass, or with max_grad_norm the 2-norm pass)."""
    for max_grad_norm in (None, 1.0):
        model = _sharded(mesh)
        opt = fusedopt.FusedAdamW(model.parameters(), lr=0.01, max_grad_norm=max_grad_norm)
        scaler = fusedopt.GradScaler("cpu", init_scale=2.0**10)
        for step in range(2):
            scaler.scale(model(_batch(step, rank)).pow(2).mean()).backward()
            if step == 1 and rank == 1:
                next(model.parameters()).grad.to_local()[0, 0] = float("inf")
            before = [p.to_local().clone() for p in model.parameters()]
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            moved = [
                not torch.equal(p.to_local(), q) for p, q in zip(model.parameters(), before, strict=True)
            ]
            assert any(moved) == (step == 0), f"max_grad_norm={max_grad_norm}, step {step}: moved {moved}"
        scales = [torch.zeros(1) for _ in range(WORLD)]
        dist.all_gather(scales, torch.tensor([scaler.get_scale()]))
        assert scales[0].item() == scales[1].item() == 2.0**9, f"scales after the skip: {scales}"
        steps = {float(s["step"]) for s in opt.state.values()}
        assert steps == {1.0}, f"step counters after one step and one skip: {steps}"
    # What the README says of torch's own GradScaler here: DTensor all-reduces its inf flag
    # (torch/distributed/tensor/_dispatch.py, found_inf_reduce_handler): the ranks agree too.
    model = _sharded(mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(model(_batch(0, rank)).pow(2).mean()).backward()
    if rank == 1:
        next(model.parameters()).grad.to_local()[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    scales = [torch.zeros(1) for _ in range(WORLD)]
    dist.all_gather(scales, torch.tensor([scaler.get_scale()]))
    assert scales[0].item() == scales[1].item() == 2.0**9, f"torch's scales: {scales}"


def _train(model, opt, steps: range, rank: int) -> None:
    for step in steps:
        _backward(model, step, rank)
        opt.step()
        opt.zero_grad()


def check_checkpoint(rank, mesh, count, workdir):
    """Save with torch.distributed.checkpoint on 2 ranks (from FusedAdamW and from torch's
    AdamW); resume each into both (training continues as if uninterrupted); load the fused
    one on 1 process (reshard)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    classes = (fusedopt.FusedAdamW, torch.optim.AdamW)
    for saver in classes:
        path = os.path.join(workdir, f"ckpt-{saver.__module__}")
        model = _sharded(mesh)
        opt = saver(model.parameters(), lr=0.01, weight_decay=0.1)
        _train(model, opt, range(2), rank)
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
        _train(model, opt, range(2, 4), rank)  # the uninterrupted run
        for cls in classes:
            resumed = _sharded(mesh, seed=1)
            ropt = cls(resumed.parameters(), lr=0.01, weight_decay=0.1)
            msd, osd = get_state_dict(resumed, ropt)
            state = {"model": msd, "optim": osd}
            dcp.load(state, checkpoint_id=path)
            set_state_dict(resumed, ropt, model_state_dict=state["model"], optim_state_dict=state["optim"])
            _train(resumed, ropt, range(2, 4), rank)
            _same(ropt, opt, f"saved from {saver.__name__}, resumed into {cls.__name__}")
    dist.barrier()
    path = os.path.join(workdir, f"ckpt-{fusedopt.FusedAdamW.__module__}")
    if rank == 0:  # reshard: the whole model and state on one process, no process group
        plain = _model(seed=1)
        popt = fusedopt.FusedAdamW(plain.parameters(), lr=0.01, weight_decay=0.1)
        msd, osd = get_state_dict(plain, popt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=path, no_dist=True)
        set_state_dict(plain, popt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        for step in range(2, 4):
            _global_backward(plain, step)
            popt.step()
            popt.zero_grad()
    expected = [q.full_tensor() for q in _resumed_fused(mesh, path, rank)]
    if rank == 0:
        for i, (p, q) in enumerate(zip(plain.parameters(), expected, strict=True)):
            close(p.detach(), q, f"1-rank resume: param {i}")
    dist.barrier()


def _resumed_fused(mesh, path: str, rank: int) -> list[torch.Tensor]:
    """The 2-rank run resumed from ``path`` for steps 2 and 3: its params."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = _sharded(mesh, seed=1)
    opt = fusedopt.FusedAdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    _train(model, opt, range(2, 4), rank)
    return list(model.parameters())


def check_low_precision(rank, mesh, count, workdir):
    """bf16 FSDP2 params with master_weights: the fp32 masters are DTensors placed as their
    params, each param its master rounded, one launch per step; a DCP checkpoint resumes
    bitwise (the masters are not cast to bf16 on load)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def build(seed):
        model = _sharded(mesh, seed)
        return model, fusedopt.FusedAdamW(model.parameters(), lr=0.01, master_weights=True)

    def train(model, opt, steps):
        for step in steps:
            (model(_batch(step, rank).bfloat16()).float().pow(2).mean()).backward()
            launches, _ = count.during(opt.step)
            assert launches == 1, f"{launches} launches"
            opt.zero_grad()

    torch.set_default_dtype(torch.bfloat16)  # the model's params in bf16
    try:
        model, opt = build(0)
        resumed, ropt = build(1)
    finally:
        torch.set_default_dtype(torch.float32)
    train(model, opt, range(2))
    for p in model.parameters():
        master = opt.state[p]["master_weight"]
        assert p.dtype == torch.bfloat16 and master.dtype == torch.float32
        assert master.placements == p.placements and master.device_mesh == p.device_mesh
        assert torch.equal(p.to_local(), master.to_local().bfloat16())
    path = os.path.join(workdir, "ckpt-bf16")
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    msd, osd = get_state_dict(resumed, ropt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(resumed, ropt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(model, opt, range(2, 4))
    train(resumed, ropt, range(2, 4))
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p.to_local(), q.to_local())
        for key, v in opt.state[p].items():
            assert torch.equal(_local(ropt.state[q][key]), _local(v)), key


def check_int8_state(rank, mesh, count, workdir):
    """8-bit state of FSDP2 params: codes are DTensors placed as the params (each rank's blocks
    its shard's), one launch per step; the checkpoint holds the state dequantized, so DCP saves
    it and a resumed run continues bitwise (the same codes again), also into torch's AdamW."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    def build(cls, seed, **options):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(6, 2048), torch.nn.Tanh(), torch.nn.Linear(2048, 1))
        for layer in (model[0], model[2], model):
            fully_shard(layer, mesh=mesh)
        return model, cls(model.parameters(), lr=0.01, **options)

    def train(model, opt, steps, expect=1):
        for step in steps:
            _backward(model, step, rank)
            launches, _ = count.during(opt.step)
            assert expect is None or launches == expect, launches
            opt.zero_grad()

    model, opt = build(fusedopt.FusedAdamW, 0, state_dtype="int8")
    train(model, opt, range(2))
    weight = model[0].weight  # 12,288 elements: 6,144 per rank, 8-bit
    codes = opt.state[weight]["exp_avg"]
    assert codes.dtype == torch.uint8 and codes.placements == weight.placements
    assert opt.state[weight]["exp_avg_absmax"].numel() == -(-weight.to_local().numel() // 256)
    path = os.path.join(workdir, "ckpt-int8")
    msd, osd = get_state_dict(model, opt)
    saved = osd["state"]["0.weight"]["exp_avg"]
    assert saved.dtype == torch.float32 and saved.placements == weight.placements  # dequantized
    saved = saved.to_local().clone()
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    train(model, opt, range(2, 4))
    for cls, options in ((fusedopt.FusedAdamW, {"state_dtype": "int8"}), (torch.optim.AdamW, {})):
        resumed, ropt = build(cls, 1, **options)
        msd, osd = get_state_dict(resumed, ropt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(resumed, ropt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if cls is torch.optim.AdamW:  # torch's class takes the dequantized state as its own
            assert torch.equal(ropt.state[resumed[0].weight]["exp_avg"].to_local(), saved)
            continue
        train(resumed, ropt, range(2, 4))
        for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
            assert torch.equal(p.to_local(), q.to_local()), "resumed 8-bit run"


def check_compiled_step(rank, mesh, count, workdir):
    """torch.compile(opt.step) over DTensor params: the eager step runs (one launch), as
    torch's AdamW."""
    a, b = _sharded(mesh), _sharded(mesh)
    ours, theirs = fusedopt.FusedAdamW(a.parameters(), lr=0.01), torch.optim.AdamW(b.parameters(), lr=0.01)
    _side_by_side((a, b), (ours, theirs), count, rank, step=torch.compile(ours.step, backend="eager"))
    _same(ours, theirs, "compiled step")


def check_mixed(rank, mesh, count, workdir):
    """One optimizer over FSDP2 shards, a DTensor replicated on another mesh and a plain
    tensor: one launch per step, max_grad_norm as the norm of the whole gradients."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    other = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("other",))
    runs = []
    for cls in (fusedopt.FusedAdamW, torch.optim.AdamW):
        model = _sharded(mesh)
        torch.manual_seed(5)
        replicated = torch.nn.Parameter(distribute_tensor(torch.randn(4, 2), other, [Replicate()]))
        plain = torch.nn.Parameter(torch.randn(3))
        params = [*model.parameters(), replicated, plain]
        opt = cls(params, lr=0.01, **({"max_grad_norm": 0.05} if cls is fusedopt.FusedAdamW else {}))
        for step in range(STEPS):
            _backward(model, step, rank)
            gen = torch.Generator().manual_seed(step)
            replicated.grad = distribute_tensor(torch.randn(4, 2, generator=gen), other, [Replicate()])
            plain.grad = torch.randn(3, generator=gen)
            if cls is fusedopt.FusedAdamW:
                launches, reduces = count.during(opt.step)
                assert (launches, reduces) == (1, 1), f"(launches, all-reduces) = {(launches, reduces)}"
            else:  # torch's clip cannot mix DTensors and tensors: the reference clips by hand
                total = _torch_norm([p.grad for p in params]).float()
                coef = torch.clamp(0.05 / (total + 1e-6), max=1.0)
                for p in params:
                    _local(p.grad).mul_(coef)
                opt.step()
            opt.zero_grad()
        runs.append(opt)
    _same(*runs, "mixed meshes and plain tensors")


def check_ddp(rank, mesh, count, workdir):
    """DistributedDataParallel (default, gradient_as_bucket_view, static_graph) with FusedAdamW
    against torch's AdamW."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    for options in ({}, {"gradient_as_bucket_view": True, "static_graph": True}):
        a, b = DDP(_model(), **options), DDP(_model(), **options)
        ours = fusedopt.FusedAdamW(a.parameters(), lr=0.01, max_grad_norm=0.1)
        theirs = torch.optim.AdamW(b.parameters(), lr=0.01)
        _side_by_side((a, b), (ours, theirs), count, rank, clip=0.1)
        _same(ours, theirs, f"DDP {options}")


def check_zero(rank, mesh, count, workdir):
    """ZeroRedundancyOptimizer(optimizer_class=FusedAdamW) against it with torch's AdamW,
    consolidate_state_dict included."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    a, b = DDP(_model()), DDP(_model())
    ours = ZeroRedundancyOptimizer(a.parameters(), optimizer_class=fusedopt.FusedAdamW, lr=0.01)
    theirs = ZeroRedundancyOptimizer(b.parameters(), optimizer_class=torch.optim.AdamW, lr=0.01)
    _side_by_side((a, b), (ours, theirs), count, rank)
    for i, (p, q) in enumerate(zip(a.parameters(), b.parameters(), strict=True)):
        close(p.detach(), q.detach(), f"ZeRO: param {i}")
    _same(ours.optim, theirs.optim, "ZeRO's local optimizer")
    for opt in (ours, theirs):
        opt.consolidate_state_dict(to=0)
    if rank == 0:
        mine, expected = ours.state_dict(), theirs.state_dict()
        assert mine["state"].keys() == expected["state"].keys()
        for k, state in expected["state"].items():
            for key, v in state.items():
                close(mine["state"][k][key], v, f"ZeRO consolidated state[{k}][{key}]")


def _tensor_parallel(mesh, seed: int = 0) -> torch.nn.Module:
    """The model on a 2-D (dp, tp) mesh: Megatron-style column/row-parallel pairs on "tp",
    FSDP2 on "dp" (placements (_StridedShard(0), Shard(0)) for column-parallel params,
    (Shard(0), Shard(1)) and (Shard(0), Replicate()) for row-parallel ones)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5))
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    return fully_shard(model, mesh=mesh["dp"])


def check_2d_mesh(rank, mesh, count, workdir):
    """FSDP2 + tensor parallel on a 2x2 mesh: FusedAdamW with max_grad_norm against torch's
    AdamW after torch's clip_grad_norm_; one launch and one all-reduce per process group."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh2d = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp_rank = mesh2d["dp"].get_local_rank()
    a, b = _tensor_parallel(mesh2d), _tensor_parallel(mesh2d)
    ours = fusedopt.FusedAdamW(a.parameters(), lr=0.01, max_grad_norm=0.05)
    theirs = torch.optim.AdamW(b.parameters(), lr=0.01)
    # A tp group sees one batch; the norm is all-reduced over dp, then over tp.
    _side_by_side((a, b), (ours, theirs), count, dp_rank, clip=0.05, expect=(1, 2))
    _same(ours, theirs, "2-D mesh")
    tp = [p.placements[1].is_replicate() for p in a.parameters()]
    assert any(tp) and not all(tp), "the model has params replicated and sharded on tp"


def check_linear_cross_entropy_head(rank, mesh, count, workdir):
    """A small language model under FSDP2 whose head is FusedLinearCrossEntropyHead: its weight
    is gathered by fully_shard's hooks like any layer's, the fused op runs on the gathered
    weight, and losses and sharded gradients match the same model with nn.Linear and the
    composition, for 2 AdamW steps."""
    from torch.distributed.fsdp import fully_shard

    import fusedopt.losses._linear_cross_entropy_launch as launch

    vocab, width = 31, 8

    def build(head):
        torch.manual_seed(0)
        model = torch.nn.ModuleDict({"embed": torch.nn.Embedding(vocab, width), "head": head})
        model.head.weight.data.normal_(0, 0.5)
        model.head.bias.data.uniform_(-0.5, 0.5)
        for part in model.values():  # each an FSDP unit (a ModuleDict has no forward to hook)
            fully_shard(part, mesh=mesh)
        return model

    fused = build(fusedopt.nn.FusedLinearCrossEntropyHead(width, vocab, chunk_rows=3))
    plain = build(torch.nn.Linear(width, vocab))
    opts = {id(m): torch.optim.AdamW(m.parameters(), lr=0.05) for m in (fused, plain)}
    calls = []
    forward = launch.forward
    launch.forward = lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs)
    try:
        for step in range(2):
            gen = torch.Generator().manual_seed(10 * step + rank)
            tokens = torch.randint(0, vocab, (2, 6), generator=gen)
            losses = []
            for model in (fused, plain):
                hidden = model.embed(tokens[:, :-1])
                if model is fused:
                    loss = model.head(hidden, tokens[:, 1:])
                else:
                    loss = torch.nn.functional.cross_entropy(model.head(hidden).movedim(-1, 1), tokens[:, 1:])
                loss.backward()
                losses.append(loss.detach())
            close(losses[0], losses[1], f"loss, step {step}")
            for (name, p), q in zip(fused.named_parameters(), plain.parameters(), strict=True):
                close(_local(p.grad), _local(q.grad), f"grad of {name}, step {step}")
            for opt in opts.values():
                opt.step()
                opt.zero_grad()
    finally:
        launch.forward = forward
    assert len(calls) == 2, calls  # the fused op ran, on the gathered (plain tensor) weight


# A head sharded over the vocabulary (tensor parallel) ---------------------------------------------

# (V, input dims, options): V odd (uneven shards: 19 and 18 classes) but the last, V = 1 (rank 1's
# shard empty); both requested orders (the vocabulary-parallel path runs blocks; chunk_rows sizes
# them); class weights (plain, or a replicated DTensor), label smoothing, z-loss and ignored
# targets (a real class as ignore_index); a 3-D input; a plain input (the same on both ranks)
VOCAB_PARALLEL_CASES = [
    (37, (10, 8), dict(reduction="mean", chunk_classes=8)),
    (37, (10, 8), dict(reduction="sum", chunk_rows=4, label_smoothing=0.2, z_loss=0.01, ignore_index=3)),
    (
        37,
        (2, 5, 8),
        dict(reduction="none", class_weight="replicated", label_smoothing=0.1, z_loss=0.01, chunk_classes=8),
    ),
    (37, (10, 8), dict(reduction="mean", class_weight=True, ignore_index=3, plain_input=True, bias=False)),
    (1, (4, 8), dict(reduction="sum", z_loss=0.1)),
]


def _collectives(fn) -> tuple[object, list[tuple[str, int]]]:
    """``fn()`` and its collectives in this process, each as (name, elements sent by this
    rank): our calls of ``dist.all_gather_single`` and ``dist.all_reduce``, which must be all
    that CommDebugMode sees (no collective inside DTensor's ops)."""
    from torch.distributed.tensor.debug import CommDebugMode

    calls, saved = [], {name: getattr(dist, name) for name in ("all_gather_single", "all_reduce")}

    def recorder(name):
        def record(*args, **kwargs):
            calls.append((name, args[1 if name == "all_gather_single" else 0].numel()))
            return saved[name](*args, **kwargs)

        return record

    for name in saved:
        setattr(dist, name, recorder(name))
    try:
        with CommDebugMode() as mode:
            out = fn()
    finally:
        for name, f in saved.items():
            setattr(dist, name, f)
    assert mode.get_total_counts() == len(calls), (mode.get_comm_counts(), calls)
    return out, calls


def _sharded_head(mesh, x, w, b, plain_input: bool) -> list:
    """The input (a clone, or a DTensor ``Replicate()``), the weight and the bias (if any) as
    DTensors ``Shard(0)`` on ``mesh``, all requiring grad."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    xs = x.clone() if plain_input else distribute_tensor(x, mesh, [Replicate()])
    sharded = [xs] + [distribute_tensor(t, mesh, [Shard(0)]) for t in (w, b) if t is not None]
    return [t.requires_grad_() for t in sharded]


def _same_sharded_grads(rank, vocab: int, sharded: list, leaves: list, what: str) -> None:
    """The gradients of :func:`_sharded_head`'s tensors are those of the unsharded ``leaves``:
    the input's whole (placed ``Replicate()`` for a DTensor input), the weight's and bias's
    this rank's rows (torch.chunk's), DTensors ``Shard(0)``."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    close(_local(sharded[0].grad), leaves[0].grad, f"{what}: grad of the input")
    if isinstance(sharded[0], DTensor):
        assert sharded[0].grad.placements == (Replicate(),), what
    start = -(-vocab // WORLD) * rank  # torch.chunk's rows
    for name, mine, theirs in zip(
        ("weight", "bias")[: len(leaves) - 1], sharded[1:], leaves[1:], strict=True
    ):
        assert mine.grad.placements == (Shard(0),), f"{what}: grad of the {name}"
        local = mine.grad.to_local()
        close(local, theirs.grad[start : start + len(local)], f"{what}: grad of the {name}")


def _vocab_parallel_case(rank, mesh, vocab: int, shape: tuple[int, ...], options: dict) -> None:
    """One case of VOCAB_PARALLEL_CASES (see check_vocab_parallel_head)."""
    from torch.distributed.tensor import Replicate, distribute_tensor

    options = dict(options)
    plain_input, bias = options.pop("plain_input", False), options.pop("bias", True)
    gen = torch.Generator().manual_seed(vocab)
    x = torch.randn(shape, generator=gen)
    w = torch.randn(vocab, shape[-1], generator=gen) * 0.5
    b = torch.rand(vocab, generator=gen) - 0.5 if bias else None
    target = torch.randint(0, vocab, shape[:-1], generator=gen)
    target.view(-1)[::4] = options.get("ignore_index", -100)
    class_weight = options.pop("class_weight", False)  # True: a plain tensor; "replicated": a DTensor
    if class_weight:
        options["weight"] = torch.rand(vocab, generator=gen) + 0.5
    grad_out = torch.rand(shape[:-1], generator=gen) if options["reduction"] == "none" else None
    what = f"V={vocab}, {options}"

    leaves = [t.clone().requires_grad_() for t in (x, w, b) if t is not None]
    expected = fusedopt.functional.linear_cross_entropy(leaves[0], leaves[1], target, *leaves[2:], **options)
    expected.backward(grad_out)
    sharded = _sharded_head(mesh, x, w, b, plain_input)
    if grad_out is not None and not plain_input:
        grad_out = distribute_tensor(grad_out, mesh, [Replicate()])
    if class_weight == "replicated":
        options["weight"] = distribute_tensor(options["weight"], mesh, [Replicate()])
    loss, forward = _collectives(
        lambda: fusedopt.functional.linear_cross_entropy(
            sharded[0], sharded[1], target, *sharded[2:], **options
        )
    )
    _, backward = _collectives(lambda: loss.backward(grad_out))
    gather, reduce = [("all_gather_single", 4 * (x.numel() // x.shape[-1]))], [("all_reduce", x.numel())]
    if options["reduction"] == "none":
        assert forward == gather and backward == reduce, (what, forward, backward)
    else:
        assert forward == gather + reduce and backward == [], (what, forward, backward)
    _same_as_unsharded(what, rank, vocab, loss, expected, sharded, leaves, plain_input)


def _same_as_unsharded(
    what: str, rank: int, vocab: int, loss, expected, sharded, leaves, plain_input
) -> None:
    """A vocabulary-parallel head's loss and gradients (``sharded``: the input, the weight, the
    bias if any) against the unsharded op's (``expected``, ``leaves``): the loss a DTensor but
    for a plain input; the input's gradient the whole sum (``Replicate()`` for a DTensor input);
    the weight's and bias's ``Shard(0)`` DTensors holding this rank's rows."""
    from torch.distributed.tensor import DTensor

    assert isinstance(loss, DTensor) != plain_input, what
    close(_local(loss), expected.detach(), f"{what}: loss")
    _same_sharded_grads(rank, vocab, sharded, leaves, what)


def check_vocab_parallel_head(rank, mesh, count, workdir):
    """linear_cross_entropy with its weight and bias DTensors ``Shard(0)`` on the vocabulary
    (input a replicated DTensor, or a plain tensor) against the unsharded op on the whole
    weight: loss and gradients (input; the weight's and bias's shards, DTensors placed as
    they are) for every case of VOCAB_PARALLEL_CASES; per call one all-gather of 4 numbers a
    token and, when the input's gradient is asked, one all-reduce of N x H (in the forward of
    mean/sum, in the backward of none), however many tokens and blocks; the module with its
    parameters sharded alike."""
    from torch.distributed.tensor import Shard, distribute_module, distribute_tensor

    for case in VOCAB_PARALLEL_CASES:
        _vocab_parallel_case(rank, mesh, *case)

    # the module, its weight and bias sharded over the classes by distribute_module (parallelize_module's
    # ColwiseParallel would pass the module its input alone, without the targets), the input plain
    def shard_classes(name, module, mesh):
        for key, p in list(module.named_parameters(recurse=False)):
            module.register_parameter(
                key, torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)]))
            )

    vocab, hidden = 37, 8
    torch.manual_seed(1)
    head = fusedopt.nn.FusedLinearCrossEntropyHead(hidden, vocab, chunk_rows=3)
    whole = fusedopt.nn.FusedLinearCrossEntropyHead(hidden, vocab, chunk_rows=3)
    whole.load_state_dict(head.state_dict())
    distribute_module(head, mesh, shard_classes)
    x, target = torch.randn(3, 4, hidden), torch.randint(0, vocab, (3, 4))
    loss, expected = head(x, target), whole(x, target)
    loss.backward()
    expected.backward()
    close(loss, expected.detach(), "module: loss")
    start = -(-vocab // WORLD) * rank
    for name, p in whole.named_parameters():
        local = getattr(head, name).grad.to_local()
        close(local, p.grad[start : start + len(local)], f"module: grad of {name}")


# (V, tokens' shape, options): V odd (19 and 18 classes a rank) but the last, V = 1 (rank 1's shards
# empty); every divergence (the JSD at β = 0.3), every reduction (none with a random grad_output),
# ignored targets; a 3-D replicated input, plain inputs, no biases; no target
DISTILLATION_CASES = [
    (37, (2, 5), dict(divergence="kl", reduction="mean", temperature=0.7)),
    (37, (10,), dict(divergence="reverse_kl", reduction="sum", plain_input=True, bias=False)),
    (37, (10,), dict(divergence="jsd", beta=0.3, reduction="none", temperature=1.5)),
    (1, (4,), dict(divergence="jsd", beta=0.3, reduction="mean", target=False)),
]


def _distillation_case(rank, mesh, vocab: int, lead: tuple[int, ...], options: dict) -> None:
    """One case of DISTILLATION_CASES (see check_vocab_parallel_distillation)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    options = dict(options)
    plain_input, bias = options.pop("plain_input", False), options.pop("bias", True)
    gen = torch.Generator().manual_seed(vocab)
    hs, ht = 8, 6
    xs, xt = torch.randn(*lead, hs, generator=gen), torch.randn(*lead, ht, generator=gen)
    ws, wt = torch.randn(vocab, hs, generator=gen) * 0.6, torch.randn(vocab, ht, generator=gen) * 0.9
    bs, bt = torch.rand(vocab, generator=gen) - 0.5, torch.rand(vocab, generator=gen)
    bs, bt = (bs, bt) if bias else (None, None)
    target = torch.randint(0, vocab, lead, generator=gen)
    target.view(-1)[::4] = -100
    target = target if options.pop("target", True) else None
    grad_out = torch.rand(lead, generator=gen) if options["reduction"] == "none" else None
    what = f"V={vocab}, {options}"

    leaves = [t.clone().requires_grad_() for t in (xs, ws, bs) if t is not None]
    student_bias = leaves[2] if bias else None
    expected = fusedopt.functional.linear_distillation_loss(
        leaves[0], leaves[1], xt, wt, target, student_bias=student_bias, teacher_bias=bt, **options
    )
    expected.backward(grad_out)

    def replicated(t):
        if t is None or plain_input:
            return t
        return distribute_tensor(t, mesh, [Replicate()])

    def sharded(t):
        return distribute_tensor(t, mesh, [Shard(0)]) if t is not None else None

    student = [replicated(xs)] + [sharded(t) for t in (ws, bs) if t is not None]
    for t in student:
        t.requires_grad_()
    if grad_out is not None and not plain_input:
        grad_out = distribute_tensor(grad_out, mesh, [Replicate()])
    teacher = (replicated(xt), sharded(wt), replicated(target), sharded(bt))

    def run():
        return fusedopt.functional.linear_distillation_loss(
            student[0], student[1], *teacher[:3], student_bias=student[2] if bias else None, teacher_bias=teacher[3],
            **options,
        )  # fmt: skip

    loss, forward = _collectives(run)
    _, backward = _collectives(lambda: loss.backward(grad_out))
    n, kl = xs.numel() // hs, options["divergence"] == "kl"
    state, sums = ("all_gather_single", 4 * n), ("all_gather_single", (1 if kl else 2) * n)  # (Σ p_s a)
    reduce = ("all_reduce", n * hs)
    if options["reduction"] == "none":
        expected_calls = [state, sums], [reduce]
    else:  # the forward KL's gradient comes in pass 2, before the divergences are summed
        expected_calls = [state, reduce, sums] if kl else [state, sums, reduce], []
    assert (forward, backward) == expected_calls, (what, forward, backward)
    _same_as_unsharded(what, rank, vocab, loss, expected, student, leaves, plain_input)


def check_vocab_parallel_distillation(rank, mesh, count, workdir):
    """linear_distillation_loss with the student's and the teacher's weights (and biases)
    DTensors ``Shard(0)`` on the vocabulary (inputs and targets replicated DTensors, or plain
    tensors) against the unsharded op on the whole weights: loss and student gradients (input;
    the weight's and bias's shards, DTensors placed as they are) for every case of
    DISTILLATION_CASES; per call an all-gather of 4 numbers a token (both heads' max and sum
    of exponentials), one of 1 or 2 (the divergence, Σ p_s a) and, when the input's gradient
    is asked, one all-reduce of N x H (in the forward of mean/sum, in the backward of none)."""
    for case in DISTILLATION_CASES:
        _distillation_case(rank, mesh, *case)


# (V, input dims, options) of linear_log_probs: V odd (19 and 18 classes) but the last, V = 1
# (rank 1's shard empty); temperatures; with and without the entropy; a bias or none; a 3-D
# input; a plain input; blocks of 4 classes (many blocks a rank: still one all-gather)
LOG_PROBS_CASES = [
    (37, (10, 8), dict(temperature=0.7, return_entropy=True)),
    (37, (2, 5, 8), dict(temperature=1.3, return_entropy=True, plain_input=True, bias=False, block=4)),
    (37, (10, 8), dict(return_entropy=False)),
    (1, (4, 8), dict(temperature=2.0, return_entropy=True)),
]


def _log_probs_case(rank, mesh, vocab: int, shape: tuple[int, ...], options: dict) -> None:
    """One case of LOG_PROBS_CASES (see check_vocab_parallel_log_probs)."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    module = importlib.import_module("fusedopt.losses.linear_log_probs")  # the module, not the function

    options = dict(options)
    plain_input, bias, block = (
        options.pop("plain_input", False),
        options.pop("bias", True),
        options.pop("block", 0),
    )
    entropy = options["return_entropy"]
    gen = torch.Generator().manual_seed(vocab)
    x = torch.randn(shape, generator=gen)
    w = torch.randn(vocab, shape[-1], generator=gen)
    b = torch.rand(vocab, generator=gen) - 0.5 if bias else None
    target = torch.randint(0, vocab, shape[:-1], generator=gen)
    target.view(-1)[::3] = -100
    grads = [torch.randn(shape[:-1], generator=gen) for _ in range(2 if entropy else 1)]
    what = f"V={vocab}, {shape}, {options}, plain input {plain_input}, bias {bias}, block {block}"

    leaves = [t.clone().requires_grad_() for t in (x, w, b) if t is not None]
    expected = fusedopt.functional.linear_log_probs(leaves[0], leaves[1], target, *leaves[2:], **options)
    expected = expected if entropy else (expected,)
    torch.autograd.backward(expected, grads)
    sharded = _sharded_head(mesh, x, w, b, plain_input)
    if not plain_input:
        grads = [distribute_tensor(g, mesh, [Replicate()]) for g in grads]
    vocab_block = module.vocab_block
    if block:  # blocks of `block` classes
        module.vocab_block = lambda *args: block
    try:
        out, forward = _collectives(
            lambda: fusedopt.functional.linear_log_probs(
                sharded[0], sharded[1], target, *sharded[2:], **options
            )
        )
    finally:
        module.vocab_block = vocab_block
    out = out if entropy else (out,)
    _, backward = _collectives(lambda: torch.autograd.backward(out, grads))
    n = x.numel() // x.shape[-1]
    assert forward == [("all_gather_single", 4 * n)] and backward == [("all_reduce", x.numel())], (
        what, forward, backward,
    )  # fmt: skip
    for name, ours, theirs in zip(("log-probs", "entropy"), out, expected, strict=False):
        assert isinstance(ours, DTensor) != plain_input, what
        close(_local(ours), theirs.detach(), f"{what}: {name}")
    _same_sharded_grads(rank, vocab, sharded, leaves, what)


def check_vocab_parallel_log_probs(rank, mesh, count, workdir):
    """linear_log_probs with its weight and bias DTensors ``Shard(0)`` on the vocabulary (the
    input a replicated DTensor or a plain tensor) against the unsharded op on the whole
    weight, for every case of LOG_PROBS_CASES: log-probs and entropies (ignored targets
    included), the gradients through both outputs for random grad_outputs (the input's, placed
    as the input; the weight's and bias's shards, placed as they are); per call one all-gather
    of 4 numbers a token in the forward and one all-reduce of N x H in the backward, however
    many blocks."""
    for case in LOG_PROBS_CASES:
        _log_probs_case(rank, mesh, *case)


# FusedMuon over FSDP2: each matrix orthogonalized whole by one owner rank ------------------------

# Muon matrices 7x6 (4 + 3 rows), 12x7 (tall), 8x12 (wide), 1x8 (rank 1's shard empty); the
# biases in an AdamW group.
MUON_SIZES = (6, 7, 12, 8, 1)
MUON_OPTIONS = dict(lr=0.02, max_grad_norm=0.1)


def _muon(model: torch.nn.Module, cls=fusedopt.FusedMuon) -> torch.optim.Optimizer:
    """FusedMuon over the model's matrices and an AdamW group of its biases; torch's Muon
    over its matrices alone."""
    if cls is torch.optim.Muon:
        return cls([p for p in model.parameters() if p.ndim == 2], lr=MUON_OPTIONS["lr"])
    return cls(fusedopt.muon_param_groups(model, lr=0.01), **MUON_OPTIONS)


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach()


def _same_muon(ours, theirs, what: str, exact: bool = False) -> None:
    """Params and state of two Muon runs, DTensors compared whole, group by group (``theirs``
    may hold the Muon group alone): bit for bit (``exact``), else the Muon group's params within
    MUON_TOLERANCE, every other tensor within OPTIM_TOLERANCE."""
    for group, other in zip(ours.param_groups, theirs.param_groups, strict=False):
        muon = group.get("use_muon", True) is not False
        for i, (p, q) in enumerate(zip(group["params"], other["params"], strict=True)):
            pairs = [("param", p, q, MUON_TOLERANCE if muon else OPTIM_TOLERANCE)]
            assert ours.state[p].keys() == theirs.state[q].keys(), f"{what}: state keys of param {i}"
            pairs += [(key, v, theirs.state[q][key], OPTIM_TOLERANCE) for key, v in ours.state[p].items()]
            for key, a, b, table in pairs:
                a, b = _full(a), _full(b)
                if exact:
                    assert torch.equal(a, b), f"{what}: {key} of param {i}"
                elif a.is_floating_point() and a.ndim:
                    assert_close(a, b, f"{what}: {key} of param {i}", table)
                else:
                    assert float(a) == float(b), f"{what}: {key} of param {i}"


def check_muon_exchange(rank, mesh, count, workdir):
    """orthogonalize_sharded against Newton–Schulz of the whole matrices, bit for bit (the rows
    sent in bf16 are the whole matrix rounded): Shard(0) params of uneven, empty and 3-D shards,
    a replicated one and a plain tensor, in two all-to-alls."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from fusedopt.optim._muon_dist import orthogonalize_sharded
    from fusedopt.optim.muon import newton_schulz

    gen = torch.Generator().manual_seed(0)
    shapes = [(7, 6), (12, 7), (8, 12), (1, 8), (5, 2, 3), (8, 12), (3, 4)]
    whole = [torch.randn(s, generator=gen) for s in shapes]
    params = [distribute_tensor(w, mesh, [Shard(0)]) for w in whole[:-2]]
    params += [distribute_tensor(whole[-2], mesh, [Replicate()]), whole[-1]]
    updates = [
        _local(p).reshape(_local(p).shape[0], w[0].numel()) for p, w in zip(params, whole, strict=True)
    ]

    def orthogonalize(ms):
        return newton_schulz(ms, fusedopt.optim.muon.NS_COEFFICIENTS, 5, 1e-7)

    out = {}
    counts = count.during(
        lambda: out.update(mine=orthogonalize_sharded(params, updates, orthogonalize)), ("all_to_alls",)
    )
    assert counts == (2,), f"{counts[0]} all-to-alls"
    expected = orthogonalize([w.reshape(w.shape[0], -1) for w in whole])
    for i, (p, o, e) in enumerate(zip(params, out["mine"], expected, strict=True)):
        sharded = hasattr(p, "placements") and p.placements[0].is_shard()
        start = -(-len(e) // WORLD) * rank if sharded else 0  # torch.chunk's rows
        assert o.dtype == torch.bfloat16 and o.shape == updates[i].shape, f"matrix {i}: {o.dtype} {o.shape}"
        assert torch.equal(o, e[start : start + len(o)]), f"matrix {i}"


def check_muon_fsdp(rank, mesh, count, workdir):
    """FusedMuon (max_grad_norm, an AdamW group of biases) over FSDP2 shards against the
    single-process run on the whole batch: 2 all-to-alls and 1 all-reduce a step for 2, 4 or 6
    Muon matrices; state DTensors placed as their params; a DCP checkpoint resumes into
    FusedMuon (bit for bit) and loads into torch's Muon."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = os.path.join(workdir, "ckpt-muon")
    model, reference = _sharded(mesh, sizes=MUON_SIZES), _model(sizes=MUON_SIZES)
    opt, ref_opt = _muon(model), _muon(reference)
    for step in range(STEPS):
        _backward(model, step, rank)
        _global_backward(reference, step)
        counts = count.during(opt.step, ("all_reduces", "all_to_alls", "muon_launches", "launches"))
        # the shards' momentum and update: one launch each; the AdamW group's: one
        assert counts == (1, 2, 2, 1), (
            f"step {step}: (all-reduces, all-to-alls, Muon, AdamW launches) = {counts}"
        )
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        if step == STEPS - 2:
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
            saved = [_full(opt.state[p]["momentum_buffer"]).clone() for p in opt.param_groups[0]["params"]]
    _same_muon(opt, ref_opt, "FSDP2 against one process")
    for p, state in opt.state.items():
        for key, v in state.items():
            if key != "step":
                assert type(v) is type(p) and (v.placements, v.device_mesh) == (p.placements, p.device_mesh)
    for cls in (fusedopt.FusedMuon, torch.optim.Muon):
        resumed = _sharded(mesh, seed=1, sizes=MUON_SIZES)
        resumed_opt = _muon(resumed, cls)
        if cls is torch.optim.Muon:  # its state as its first step makes it: DCP's first step (to
            # make the state to load into) fails in torch's Muon, on the 1x8 matrix (below)
            for p in resumed_opt.param_groups[0]["params"]:
                resumed_opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
        msd, osd = get_state_dict(resumed, resumed_opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(resumed, resumed_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if cls is torch.optim.Muon:  # takes the state as its own (its step cannot: DTensor cannot
            # add the 1x8 matrix's replicated update in place to the Shard(0) param)
            for p, buf in zip(resumed_opt.param_groups[0]["params"], saved, strict=True):
                mine = resumed_opt.state[p]["momentum_buffer"]
                assert mine.placements == p.placements and torch.equal(_full(mine), buf), "torch's Muon"
            continue
        _train(resumed, resumed_opt, range(STEPS - 1, STEPS), rank)
        _same_muon(resumed_opt, opt, "resumed", exact=True)
    for sizes in ((6, 7, 1), (6, 7, 12, 8, 5, 9, 1)):  # 2 and 6 matrices: the same collectives
        small = _sharded(mesh, sizes=sizes)
        _backward(small, 0, rank)
        counts = count.during(_muon(small).step, ("all_reduces", "all_to_alls", "muon_launches"))
        assert counts == (1, 2, 2), (
            f"{len(sizes) - 1} matrices: (all-reduces, all-to-alls, Muon launches) = {counts}"
        )


def check_muon_hsdp(rank, mesh, count, workdir):
    """HSDP on a 2x2 mesh (params ``(Replicate(), Shard(0))``): each replica group exchanges
    within its shard group (2 all-to-alls a step, 1 all-reduce for max_grad_norm) and the run
    equals one process on the 4 ranks' batches; tensor parallel's placements are refused."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    mesh2d = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    model, reference = _sharded(mesh2d, sizes=MUON_SIZES), _model(sizes=MUON_SIZES)
    assert model[0].weight.placements == (Replicate(), Shard(0))
    opt, ref_opt = _muon(model), _muon(reference)
    for step in range(STEPS):
        _backward(model, step, rank)
        _global_backward(reference, step, ranks=4)
        counts = count.during(opt.step, ("all_reduces", "all_to_alls"))
        assert counts == (1, 2), f"step {step}: (all-reduces, all-to-alls) = {counts}"
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    _same_muon(opt, ref_opt, "HSDP against one process")
    tp = _tensor_parallel(init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp")))
    for p in tp.parameters():  # (_StridedShard(0), Shard(0)), (Shard(0), Shard(1))
        if p.ndim == 2:
            with pytest.raises(NotImplementedError, match="placements"):
                fusedopt.FusedMuon([p])


CHECKS = [
    check_fsdp_parity,
    check_clipping,
    check_grad_scaler,
    check_checkpoint,
    check_mixed,
    check_ddp,
    check_zero,
    check_compiled_step,
    check_low_precision,
    check_int8_state,
    check_linear_cross_entropy_head,
    check_vocab_parallel_head,
    check_vocab_parallel_distillation,
    check_vocab_parallel_log_probs,
    check_muon_exchange,
    check_muon_fsdp,
]
GROUPS = {  # (world size, device): the checks its ranks run
    (WORLD, "cpu"): CHECKS,
    (4, "cpu"): [check_2d_mesh, check_muon_hsdp],
    (1, "cuda"): [check_fsdp_parity, check_clipping, check_linear_cross_entropy_head],  # where a GPU exists
}


def _worker(rank: int, world: int, device: str, port: int, workdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=90))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device, (world,))
    count = _Count()
    verdicts: dict[str, str] = {}
    failed = False
    for check in GROUPS[world, device]:
        if failed:
            verdicts[check.__name__] = "not run: an earlier check failed on this rank"
            continue
        start = time.perf_counter()
        try:
            check(rank, mesh, count, workdir)
            verdicts[check.__name__] = f"ok {time.perf_counter() - start:.1f} s"
        except Exception:
            verdicts[check.__name__] = traceback.format_exc()
            failed = True
        Path(workdir, f"rank{rank}.json").write_text(json.dumps(verdicts))
    if not failed:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_group(world: int, device: str = "cpu") -> list[dict[str, str]]:
    """Spawn ``world`` ranks that run their checks; each rank's verdicts by check name."""
    with tempfile.TemporaryDirectory() as workdir:
        args = (world, device, _free_port(), workdir)
        context = mp.start_processes(_worker, args=args, nprocs=world, join=False, start_method="spawn")
        try:
            while not context.join(timeout=600):
                pass
        except Exception as e:  # a rank that died: its verdicts file says how far it got
            print(f"process group ended with: {e}")
        out = []
        for rank in range(world):
            path = Path(workdir, f"rank{rank}.json")
            out.append(json.loads(path.read_text()) if path.exists() else {})
        return out


@pytest.fixture(scope="module")
def verdicts() -> list[dict[str, str]]:
    return _run_group(WORLD)


def _assert_ok(verdicts: list[dict[str, str]], check: str) -> None:
    for rank, results in enumerate(verdicts):
        verdict = results.get(check, "not run: the rank died before it")
        assert verdict.startswith("ok"), f"rank {rank}, {check}:\n{verdict}"


@pytest.mark.parametrize("check", [c.__name__ for c in CHECKS])
def test_distributed(verdicts, check):
    _assert_ok(verdicts, check)


@pytest.fixture(scope="module")
def verdicts_on_4_ranks() -> list[dict[str, str]]:
    return _run_group(4)


@pytest.mark.parametrize("check", [c.__name__ for c in GROUPS[4, "cpu"]])
def test_on_4_ranks(verdicts_on_4_ranks, check):
    _assert_ok(verdicts_on_4_ranks, check)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fsdp_on_cuda():
    """FSDP2 on one GPU (world size 1): the compiled kernels on the local shards."""
    verdicts = _run_group(1, "cuda")
    for check in GROUPS[1, "cuda"]:
        _assert_ok(verdicts, check.__name__)
