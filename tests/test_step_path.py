"""The one step path: eager and compiled steps agree bit for bit, a step makes no host read and
no copy between devices, plans die with their optimizer, and CPU tensors without the Triton
interpreter take torch's fastest correct path."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from helpers import Graphs, case_id, for_device, grads_for, make, parity_params, run_parity
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fusedopt
from fusedopt.testing import OPTIM_CASES

SPECS = [(3, 4), (5,), (), (4097,), (0,)]
# GradScaler's verdicts: the first step is skipped (a momentum buffer must stay new), then one more.
FOUND_INF = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
# Every option set fusedopt check runs (SGD's include dampening != 0; max_grad_norm ones too;
# the low-precision ones, 8-bit state included, on bf16 params too, below).
CASES = OPTIM_CASES
LOW_PRECISION_CASES = [c for c in CASES if c.fused_cls([torch.zeros(1)], **c.kwargs).precision.active]


@pytest.mark.parametrize(
    ("case", "dtype"),
    [(c, torch.float32) for c in CASES] + [(c, torch.bfloat16) for c in LOW_PRECISION_CASES],
    ids=lambda x: case_id(x) if isinstance(x, fusedopt.testing.OptimCase) else str(x).removeprefix("torch."),
)
def test_compiled_step_is_bit_identical_to_eager(case, dtype, triton_device):
    """Same params, grads, GradScaler operands (a skipped first step included) and tensor lr:
    ``torch.compile(opt.step)`` (functionalized, aot_eager) and the eager step give identical
    params and state, step after step (stochastic rounding: the same seeds)."""
    torch._dynamo.reset()
    device = triton_device
    ours, twins = make(device, [(s, dtype) for s in SPECS]), make(device, [(s, dtype) for s in SPECS])
    kwargs = dict(
        for_device(case.kwargs, device), lr=torch.tensor(case.kwargs.get("lr", 0.01), device=device)
    )
    opt, ref = case.fused_cls(ours, **kwargs), case.fused_cls(twins, **kwargs)
    step = torch.compile(opt.step, fullgraph=True, backend=Graphs())
    for i, bad in enumerate(FOUND_INF):
        grads = grads_for(ours, i)
        for params, o in ((ours, opt), (twins, ref)):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            o.grad_scale = torch.tensor(2.0, device=device)
            o.found_inf = torch.tensor(bad, device=device)
        torch.manual_seed(i)  # the rounding seeds are drawn when the state is created
        step()
        torch.manual_seed(i)
        ref.step()
        for k, (p, q) in enumerate(zip(ours, twins, strict=True)):
            assert torch.equal(p, q), f"param {k} after step {i}"
            assert opt.state.get(p, {}).keys() == ref.state.get(q, {}).keys()
            for key, v in ref.state.get(q, {}).items():
                assert torch.equal(opt.state[p][key], v), f"state[{key}] of param {k} after step {i}"
    if "step" in opt.state.get(ours[0], {}):
        assert float(opt.state[ours[0]]["step"]) == FOUND_INF.count(0.0)


class NoHostSync(TorchDispatchMode):
    """Fails on any host read of a tensor (``item``, ``is_nonzero``, ``tolist`` all dispatch
    ``_local_scalar_dense``) and on any copy between devices."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense":
            raise AssertionError(f"host read: {func}")
        devices = {
            t.device
            for t in (*args, *kwargs.values())
            if isinstance(t, torch.Tensor) and t.device.type != "meta"
        }
        if "device" in kwargs and kwargs["device"] is not None:
            devices.add(torch.device(kwargs["device"]))
        if name in ("_to_copy", "copy_", "copy") and len(devices) > 1:
            raise AssertionError(f"copy between devices: {func} {devices}")
        return func(*args, **kwargs)


PROBED = [
    fusedopt.FusedAdamW,
    fusedopt.FusedSGD,
    fusedopt.FusedAdam,
    fusedopt.FusedRMSprop,
    fusedopt.FusedAdagrad,
]


@pytest.mark.parametrize("mode", ["defaults", "torch-scaler", "fusedopt-scaler", "low-precision"])
@pytest.mark.parametrize("cls", PROBED, ids=lambda c: c.__name__)
def test_steady_state_step_makes_no_host_read(cls, mode, triton_device):
    """Default options, or a GradScaler (torch's or ours) with max_grad_norm and a tensor lr, or
    bf16 params with stochastic rounding and 8-bit state: after the first steps (state and plans
    created), the step (``scaler.step``/``update``) makes no host read and no copy between
    devices (the probe sees every aten op; it is shown to fire by the last lines)."""
    device = triton_device
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(device)
    if mode == "low-precision":
        model = nn.Sequential(nn.Linear(4, 1024), nn.Tanh(), nn.Linear(1024, 2)).to(device, torch.bfloat16)
    kwargs = {}
    if mode == "low-precision":
        kwargs = dict(lr=0.01, stochastic_rounding=True, state_dtype="int8")
    elif mode != "defaults":
        kwargs = dict(lr=torch.tensor(0.01, device=device), max_grad_norm=1.0)
        kwargs.update(dict(momentum=0.9, dampening=0.5) if cls is fusedopt.FusedSGD else {})
    elif cls is fusedopt.FusedSGD:
        kwargs = dict(lr=0.01)
    opt = cls(model.parameters(), **kwargs)
    scaler = None
    if mode not in ("defaults", "low-precision"):
        scaler = (torch.amp.GradScaler if mode == "torch-scaler" else fusedopt.GradScaler)(
            device, init_scale=16.0
        )

    def step() -> None:
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()

    for i in range(4):
        opt.zero_grad()
        loss = model(torch.randn(5, 4, device=device).to(model[0].weight.dtype)).float().square().mean()
        (loss if scaler is None else scaler.scale(loss)).backward()
        if i == 3 and scaler is not None:
            model[0].weight.grad[0, 0] = float("inf")  # a skipped step too
        if i >= 2:
            with NoHostSync():
                step()
        else:
            step()
    with pytest.raises(AssertionError, match="host read"), NoHostSync():
        torch.zeros((), device=device).item()


def test_probe_catches_a_copy_between_devices():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (only one device here)")
    with pytest.raises(AssertionError, match="between devices"), NoHostSync():
        torch.zeros(3).to("cuda")


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("cls", [fusedopt.FusedAdamW, fusedopt.FusedSGD])
def test_dropping_model_and_optimizer_frees_the_params(cls, compiled, triton_device):
    torch._dynamo.reset()
    device = triton_device
    model = nn.Linear(6, 3).to(device)
    opt = cls(
        model.parameters(),
        lr=0.1,
        max_grad_norm=1.0,
        **({"momentum": 0.9} if cls is fusedopt.FusedSGD else {}),
    )
    # inductor re-inplaces the op, so it gets the optimizer's own tensors (under aot_eager it
    # gets functionalized copies); a recording backend would keep its graphs, and the tensors.
    step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(2, 6, device=device)).sum().backward()
        step()
        fusedopt.clip_grad_norm_(model.parameters(), 1.0)
    refs = [weakref.ref(model.weight)] + [weakref.ref(t) for t in opt.state[model.weight].values()]
    assert len(refs) > 1, "the optimizer keeps state"
    del model, opt, step
    gc.collect()
    assert all(r() is None for r in refs), "a cache outlived its optimizer"


# CPU without the Triton interpreter: torch's fused CPU step where it is right, for-loop otherwise.


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("case", "dtype"), parity_params(CASES, [torch.float32, torch.float64, torch.bfloat16])
)
def test_cpu_path_matches_torch(case, dtype, plain_cpu, launches):
    run_parity(case, "cpu", dtype)
    assert not launches, "no Triton kernel on this path"


@pytest.mark.parametrize(
    ("cls", "kwargs", "fused_op"),
    [
        (fusedopt.FusedAdamW, {}, "_fused_adamw_"),
        (fusedopt.FusedAdam, dict(amsgrad=True), "_fused_adam_"),
        (fusedopt.FusedSGD, dict(momentum=0.9), "_fused_sgd_"),
    ],
)
def test_cpu_path_is_torchs_fused_step_where_it_is_right(cls, kwargs, fused_op, plain_cpu):
    dense = make("cpu", [(3, 4), (5,)])
    strided = [torch.randn(6, 10)[:, ::3].requires_grad_()]
    for params, fused in ((dense, True), (strided, False)):
        opt = cls(params, lr=0.01, **kwargs)
        for i in range(3):
            for p, g in zip(params, grads_for(params, i), strict=True):
                p.grad = g
            with Ops() as ops:
                opt.step()
        # torch's fused CPU step corrupts non-dense params: its for-loop step (faster than its
        # foreach step on CPU) takes those.
        assert (fused_op in ops.names) is fused, sorted(ops.names)
        assert not any(n.startswith("_fused_") for n in ops.names) or fused


@pytest.mark.parametrize(
    ("torch_cls", "fused_cls", "kwargs", "switch"),
    [
        (torch.optim.Adam, fusedopt.FusedAdam, {}, ("amsgrad", True)),
        (torch.optim.RMSprop, fusedopt.FusedRMSprop, {}, ("momentum", 0.9)),
        (torch.optim.RMSprop, fusedopt.FusedRMSprop, {}, ("centered", True)),
    ],
    ids=lambda x: x[0] if isinstance(x, tuple) else getattr(x, "__name__", ""),
)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_switching_on_an_option_that_needs_state_raises_like_torch(
    torch_cls, fused_cls, kwargs, switch, compiled, triton_device
):
    """The cached plan was built without the buffer the option needs: the step (eager or
    compiled) must not run with the param standing in for it, but refuse as torch does and
    change nothing."""
    torch._dynamo.reset()
    ours, theirs = make(triton_device), make(triton_device)
    opt, ref = fused_cls(ours, lr=0.01, **kwargs), torch_cls(theirs, lr=0.01, **kwargs)
    for params, o in ((ours, opt), (theirs, ref)):
        for p, g in zip(params, grads_for(params, 0), strict=True):
            p.grad = g
        o.step()
        o.param_groups[0][switch[0]] = switch[1]
    with pytest.raises(KeyError) as expected:
        ref.step()
    before = [p.detach().clone() for p in ours]
    step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
    with pytest.raises(KeyError) as raised:
        step()
    assert raised.value.args == expected.value.args
    assert all(torch.equal(p, q) for p, q in zip(ours, before, strict=True))
