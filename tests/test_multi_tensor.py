"""The multi-tensor machinery: launch counts, cached plans, runtime hyper-parameters, offsets."""

from __future__ import annotations

import copy

import pytest
import torch
import triton
import triton.language as tl
from helpers import CountOps, record_launches
from torch.utils._python_dispatch import TorchDispatchMode

import fusedopt
from fusedopt import _multi_tensor
from fusedopt.kernels import adam as adam_kernels
from fusedopt.kernels.common import locate_block
from fusedopt.kernels.optimizer import prepare_kernel

OPTIMIZERS = [
    (fusedopt.FusedAdam, dict(lr=1e-3, weight_decay=0.1), "adam"),
    (fusedopt.FusedAdamW, dict(lr=1e-3, amsgrad=True), "adam"),
    (fusedopt.FusedSGD, dict(lr=0.1, momentum=0.9, nesterov=True), "sgd"),
    (fusedopt.FusedRMSprop, dict(lr=1e-3, momentum=0.9, centered=True), "rmsprop"),
    (fusedopt.FusedAdagrad, dict(lr=1e-2, lr_decay=0.01), "adagrad"),
    (fusedopt.FusedLion, dict(lr=1e-3, weight_decay=0.1), "lion"),
    (fusedopt.FusedAdamax, dict(lr=1e-3, weight_decay=0.1), "adamax"),
    (fusedopt.FusedRAdam, dict(lr=1e-3, weight_decay=0.1, decoupled_weight_decay=True), "radam"),
    (fusedopt.FusedAdadelta, dict(lr=1.0, weight_decay=0.1), "adadelta"),
    (fusedopt.FusedRprop, dict(lr=1e-3, etas=(0.4, 1.3)), "rprop"),
    (fusedopt.FusedNAdam, dict(lr=1e-3, weight_decay=0.1, momentum_decay=0.01), "nadam"),
]


def _params(n: int, device: str, dtype: torch.dtype = torch.float32, size: int = 17) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(n)
    return [torch.randn(size + i % 5, generator=gen).to(device, dtype).requires_grad_() for i in range(n)]


# Low-precision cases of the CUDA tests: (cls, kwargs, params' dtype, params' size).
LOW_PRECISION = [
    (fusedopt.FusedAdamW, dict(master_weights=True), torch.bfloat16, 17),
    (fusedopt.FusedAdam, dict(kahan_summation=True), torch.float16, 17),
    (fusedopt.FusedSGD, dict(momentum=0.9, stochastic_rounding=True), torch.bfloat16, 17),
    (fusedopt.FusedAdamW, dict(state_dtype="int8"), torch.float32, 5000),
]
LOW_PRECISION_IDS = ["adamw-master-bf16", "adam-kahan-fp16", "sgd-sr-bf16", "adamw-int8"]


def _set_grads(params: list[torch.Tensor]) -> None:
    for p in params:
        p.grad = torch.randn_like(p)  # new buffers every step, as after zero_grad()


def _count_step(cls, kwargs, n: int, device: str, launches) -> tuple[int, int]:
    params = _params(n, device)
    opt = cls(params, **kwargs)
    for _ in range(2):  # first steps create state and plans
        _set_grads(params)
        opt.step()
    _set_grads(params)
    launches.clear()
    with CountOps() as ops:
        opt.step()
    return len(launches), len(ops.ops)


@pytest.mark.parametrize(("cls", "kwargs", "kernel"), OPTIMIZERS, ids=lambda x: getattr(x, "__name__", ""))
def test_launches_do_not_grow_with_tensor_count(cls, kwargs, kernel, triton_device, launches, monkeypatch):
    """One launch of the optimizer kernel per device and dtype (with this algorithm's update),
    plus one of ``prepare_kernel`` where the algorithm has per-tensor values; the same number of
    torch ops for 4 tensors as for 64."""
    prepares = record_launches(monkeypatch, {"prepare": prepare_kernel})
    device = triton_device
    few = _count_step(cls, kwargs, 4, device, launches)
    assert [name for name, *_ in launches] == [kernel]
    few_prepares = len(prepares)
    prepares.clear()
    many = _count_step(cls, kwargs, 64, device, launches)
    assert few[0] == many[0] == 1, "one Triton launch per device and dtype"
    assert few_prepares == len(prepares) == 3 * bool(cls.algorithm.kernels.PREPARED)  # 3 steps each
    assert few[1] == many[1], f"torch ops per step: {few[1]} for 4 tensors, {many[1]} for 64"


def test_one_launch_per_dtype(triton_device, launches):
    device = triton_device
    params = [
        torch.randn(5, device=device, dtype=dtype, requires_grad=True)
        for dtype in (torch.float32, torch.bfloat16, torch.float32, torch.float16)
    ]
    opt = fusedopt.FusedAdam(params)
    _set_grads(params)
    opt.step()
    assert len(launches) == 3


def test_hyper_parameters_are_runtime_values(triton_device, launches):
    """A changed lr (or betas, eps, momentum...) changes tensor contents, never the kernel's
    specialisation: every positional argument is a tensor and the constexprs stay the same."""
    device = triton_device
    params = _params(3, device)
    opt = fusedopt.FusedAdam(params, lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    lrs = []
    for _ in range(3):
        _set_grads(params)
        opt.step()
        lrs.append(launches[-1][1][4][adam_kernels.LR.value].item())
        sched.step()
    assert len(launches) == 3
    for _, args, kwargs in launches:
        assert all(isinstance(a, torch.Tensor) for a in args)
        assert kwargs == launches[0][2]
    assert lrs == [1e-3, 5e-4, 2.5e-4]
    # One vector, rewritten in place when a value changes (a captured CUDA graph sees it).
    assert all(args[4] is launches[0][1][4] for _, args, _ in launches)


def test_plan_is_cached_and_grad_table_follows_new_grads(triton_device, monkeypatch):
    device = triton_device
    params = _params(6, device)
    opt = fusedopt.FusedSGD(params, lr=0.1, momentum=0.9)
    built = []
    original = _multi_tensor.TensorTable.__init__

    def counting_init(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(_multi_tensor.TensorTable, "__init__", counting_init)
    for _ in range(4):
        _set_grads(params)
        opt.step()
    assert len(built) == 1, "pointer tables are built once while params and state stay put"
    expected = [p.detach().clone() for p in params]
    for p in params:  # a grad written in place keeps its address
        p.grad.fill_(1.0)
    reference = torch.optim.SGD([e.requires_grad_() for e in expected], lr=0.1, momentum=0.9)
    reference.load_state_dict(copy.deepcopy(opt.state_dict()))
    for e in expected:
        e.grad = torch.ones_like(e)
    opt.step()
    reference.step()
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p, e)
    with torch.no_grad():
        params[0].data = params[0].detach().clone()  # a param moved: the plan is rebuilt
    _set_grads(params)
    opt.step()
    assert len(built) == 2


@triton.jit
def _offsets_kernel(meta, owner, out, BLOCK: tl.constexpr):
    _t, offs, mask, full = locate_block(meta, owner, BLOCK)
    tl.store(out + tl.arange(0, BLOCK), offs)
    tl.store(out + BLOCK + tl.arange(0, BLOCK), mask.to(tl.int64))
    tl.store(out + 2 * BLOCK, full.to(tl.int64))


def test_block_offsets_are_int64(triton_device):
    """A block far past 2**31 elements gets exact offsets (tensors over 2**31 elements exist).

    The tensor's first block is placed so that program 0 is its block number 2**22 + 3.
    """
    device = triton_device
    block = 1024
    local = (1 << 22) + 3  # block * local > 2**32
    numel = block * local + 100
    meta = torch.tensor([[numel, -local]], dtype=torch.int64, device=device)
    owner = torch.zeros(1, dtype=torch.int32, device=device)
    out = torch.empty(2 * block + 1, dtype=torch.int64, device=device)
    _offsets_kernel[(1,)](meta, owner, out, BLOCK=block)
    expected = torch.arange(block, dtype=torch.int64, device=device) + block * local
    assert torch.equal(out[:block], expected)
    assert out[:block].min() > 2**32
    assert out[block : 2 * block].tolist() == [1] * 100 + [0] * (block - 100)
    assert out[2 * block].item() == 0, "a partly filled block is not full"


@pytest.mark.parametrize(
    ("size", "stride", "dense"),
    [
        ((), (), True),
        ((0,), (1,), True),
        ((3, 4), (4, 1), True),
        ((3, 4), (1, 3), True),
        ((3, 4), (8, 2), False),
        ((3, 1, 4), (4, 99, 1), True),
        ((2, 2), (0, 1), False),
    ],
)
def test_dense_layout_detection(size, stride, dense):
    assert _multi_tensor._dense(size, stride) is dense


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (fusedopt.FusedAdam, {}),
        (fusedopt.FusedAdam, dict(capturable=True, lr=torch.tensor(1e-3))),
        (fusedopt.FusedAdamW, dict(fused=True, amsgrad=True)),
        (fusedopt.FusedSGD, dict(lr=0.1, momentum=0.9)),
        (fusedopt.FusedAdamW, dict(max_grad_norm=1.0, amp=True)),
        (fusedopt.FusedSGD, dict(lr=0.1, momentum=0.9, max_grad_norm=1.0, amp=True)),
        (fusedopt.FusedRMSprop, dict(momentum=0.9, centered=True, max_grad_norm=1.0, amp=True)),
        (fusedopt.FusedAdagrad, dict(lr_decay=0.01, max_grad_norm=1.0, amp=True)),
        *[(cls, dict(kwargs, dtype=dtype, size=size)) for cls, kwargs, dtype, size in LOW_PRECISION],
    ],
    ids=[
        "adam",
        "adam-capturable-tensor-lr",
        "adamw-fused",
        "sgd",
        "adamw-clip-amp",
        "sgd-clip-amp",
        "rmsprop-clip-amp",
        "adagrad-clip-amp",
        *LOW_PRECISION_IDS,
    ],
)
def test_cuda_step_has_no_host_sync(cls, kwargs):
    params = _params(8, "cuda", kwargs.pop("dtype", torch.float32), kwargs.pop("size", 17))
    if isinstance(kwargs.get("lr"), torch.Tensor):
        kwargs = dict(kwargs, lr=kwargs["lr"].cuda())
    amp = kwargs.pop("amp", False)
    opt = cls(params, **kwargs)
    if amp:  # as GradScaler.step sets them
        opt.grad_scale = torch.tensor(1024.0, device="cuda")
        opt.found_inf = torch.tensor(0.0, device="cuda")
    _set_grads(params)
    opt.step()  # plans and state are built on the first step
    torch.cuda.synchronize()
    _set_grads(params)
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (fusedopt.FusedAdam, dict(capturable=True, amsgrad=True)),
        (fusedopt.FusedAdamW, dict(capturable=True, max_grad_norm=0.5)),
        (fusedopt.FusedSGD, dict(momentum=0.9, nesterov=True, max_grad_norm=0.5)),
        (fusedopt.FusedRMSprop, dict(capturable=True, momentum=0.9, centered=True)),
        (fusedopt.FusedAdagrad, dict(lr_decay=0.01, max_grad_norm=0.5)),
        *[(cls, dict(kwargs, dtype=dtype, size=size)) for cls, kwargs, dtype, size in LOW_PRECISION],
    ],
    ids=[
        "adam-capturable",
        "adamw-capturable-clip",
        "sgd-clip",
        "rmsprop-capturable",
        "adagrad-clip",
        *LOW_PRECISION_IDS,
    ],
)
def test_cuda_graph_capture_and_replay_match_eager(cls, kwargs):
    """torch's CUDA-graph recipe: warm up on a side stream, capture one step on static grads,
    replay with new grads and a tensor lr changed in place: identical to eager steps
    (stochastic rounding: the same seeds, advanced on the device by every replay)."""
    kwargs = dict(kwargs)
    params = _params(6, "cuda", kwargs.pop("dtype", torch.float32), kwargs.pop("size", 17))
    twins = [p.detach().clone().requires_grad_() for p in params]
    lr, twin_lr = torch.tensor(1e-2, device="cuda"), torch.tensor(1e-2, device="cuda")
    opt, ref = cls(params, lr=lr, **kwargs), cls(twins, lr=twin_lr, **kwargs)
    static = [torch.zeros_like(p) for p in params]
    for p, g in zip(params, static, strict=True):
        p.grad = g

    def new_grads(i: int) -> None:
        gen = torch.Generator(device="cuda").manual_seed(i)
        for g, q in zip(static, twins, strict=True):
            g.copy_(torch.randn(g.shape, device="cuda", generator=gen) * (3.0 if i % 2 else 0.1))
            q.grad = g.clone()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(3):
            new_grads(i)
            torch.manual_seed(i)  # rounding seeds are drawn when the state is created
            opt.step()
            torch.manual_seed(i)
            ref.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for i in range(3, 8):
        new_grads(i)
        lr.fill_(1e-2 / i)
        twin_lr.fill_(1e-2 / i)
        graph.replay()
        ref.step()
    torch.cuda.synchronize()
    for p, q in zip(params, twins, strict=True):
        assert torch.equal(p, q)
        for key, v in opt.state[p].items():
            assert torch.equal(v, ref.state[q][key]), key


@needs_cuda
def test_params_on_two_devices_in_one_group(launches):
    cpu, gpu = _params(3, "cpu"), _params(3, "cuda")
    ref = [p.detach().clone().requires_grad_() for p in cpu + gpu]
    opt = fusedopt.FusedAdam(cpu + gpu, lr=1e-2)
    torch_opt = torch.optim.Adam(ref, lr=1e-2, foreach=False)
    for _ in range(3):
        for p, q in zip(cpu + gpu, ref, strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        torch_opt.step()
    for p, q in zip(cpu + gpu, ref, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert len(launches) >= 3, "the CUDA bucket runs the kernel"


class HostReads(TorchDispatchMode):
    """Records every op that copies a tensor value to the host (.item(), bool(t), float(t))."""

    READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default)

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (fusedopt.FusedAdamW, dict(capturable=True, amsgrad=True)),
        (fusedopt.FusedSGD, dict(momentum=0.9)),
        (fusedopt.FusedRMSprop, dict(capturable=True, momentum=0.9, centered=True)),
        (fusedopt.FusedAdagrad, dict(lr_decay=0.01)),
    ],
    ids=["adamw-capturable", "sgd", "rmsprop-capturable", "adagrad"],
)
def test_step_with_clip_amp_and_tensor_lr_reads_nothing_on_the_host(cls, kwargs, triton_device):
    """No .item()/bool()/float() of a device value anywhere in a step, the first one included
    (max_grad_norm, GradScaler's grad_scale/found_inf, tensor lr): what CUDA-graph capture needs."""
    with HostReads() as probe:  # the detector itself sees a host read
        torch.ones(()).item()
    assert probe.reads
    if triton_device == "cpu":  # torch (and fusedopt) refuse capturable=True on CPU
        kwargs = {k: v for k, v in kwargs.items() if k != "capturable"}
    params = _params(4, triton_device)
    opt = cls(params, lr=torch.tensor(0.01, device=triton_device), max_grad_norm=1.0, **kwargs)
    for bad in (0.0, 1.0, 0.0):
        _set_grads(params)
        opt.grad_scale = torch.tensor(2.0, device=triton_device)
        opt.found_inf = torch.tensor(bad, device=triton_device)
        with HostReads() as probe:
            opt.step()
        assert probe.reads == []


@pytest.mark.parametrize("cls, kwargs, kernel", OPTIMIZERS, ids=[c.__name__ for c, *_ in OPTIMIZERS])
def test_dry_run_skips_the_step_kernel_and_nothing_else(cls, kwargs, kernel, triton_device):
    """Inside ``dry_run()`` a step plans and returns with params and kernel-written state as they
    were; the block nests and restores; the next step outside it moves the params."""
    params = _params(3, triton_device)
    _set_grads(params)
    opt = cls(params, **kwargs)
    before = [p.detach().clone() for p in params]
    with _multi_tensor.dry_run():
        with _multi_tensor.dry_run():
            opt.step()
        assert _multi_tensor._dry_run
        opt.step()
    assert not _multi_tensor._dry_run
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    for state in opt.state.values():
        kernel_written = [v for k, v in state.items() if k in cls.algorithm.columns]
        assert kernel_written and all(
            torch.equal(v, torch.full_like(v, v.flatten()[0])) for v in kernel_written
        )
    opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(params, before, strict=True))
