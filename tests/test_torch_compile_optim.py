"""torch.compile of the fused optimizers' step and of ``clip_grad_norm_``: our custom ops in the
graph, ``fullgraph=True``, results equal to eager, no recompilation when a tensor lr changes."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import Graphs, case_id, check_same, for_device, give, grads_for, make

import fusedopt
from fusedopt.testing import OptimCase

CASES = [
    OptimCase(fusedopt.FusedAdamW, torch.optim.AdamW, dict(weight_decay=0.1)),
    OptimCase(fusedopt.FusedAdam, torch.optim.Adam, dict(amsgrad=True, maximize=True, capturable=True)),
    OptimCase(fusedopt.FusedSGD, torch.optim.SGD, dict(momentum=0.9, nesterov=True)),
    OptimCase(fusedopt.FusedSGD, torch.optim.SGD, dict()),
    OptimCase(
        fusedopt.FusedRMSprop, torch.optim.RMSprop, dict(momentum=0.9, centered=True, weight_decay=0.1)
    ),
    OptimCase(fusedopt.FusedAdagrad, torch.optim.Adagrad, dict(lr_decay=0.01, initial_accumulator_value=0.1)),
    OptimCase(fusedopt.FusedAdamax, torch.optim.Adamax, dict(weight_decay=0.1, maximize=True)),
    OptimCase(fusedopt.FusedRAdam, torch.optim.RAdam, dict(weight_decay=0.1, capturable=True)),
    OptimCase(fusedopt.FusedNAdam, torch.optim.NAdam, dict(weight_decay=0.1, momentum_decay=0.01)),
    OptimCase(fusedopt.FusedAdadelta, torch.optim.Adadelta, dict(weight_decay=0.1, maximize=True)),
    OptimCase(fusedopt.FusedRprop, torch.optim.Rprop, dict(etas=(0.4, 1.3), maximize=True)),
    OptimCase(fusedopt.FusedLion, fusedopt.optim.lion.Lion, dict(betas=(0.8, 0.95), weight_decay=0.1)),
]
SPECS = [(3, 4), (5,), (), (4097,)]


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)` before")
@pytest.mark.parametrize("max_grad_norm", [None, 0.5], ids=["no-clip", "max_grad_norm"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_compiled_step_matches_eager_without_recompiling(case, max_grad_norm, triton_device, launches):
    """torch's "compiling the optimizer" recipe: tensor lr, an LR scheduler, 10 compiled steps."""
    torch._dynamo.reset()
    device = triton_device
    ours, twins = make(device, SPECS), make(device, SPECS)
    lr, twin_lr = torch.tensor(0.05, device=device), torch.tensor(0.05, device=device)
    kwargs = for_device(case.kwargs, device)
    opt = case.fused_cls(ours, lr=lr, max_grad_norm=max_grad_norm, **kwargs)
    ref = case.fused_cls(twins, lr=twin_lr, max_grad_norm=max_grad_norm, **kwargs)
    graphs = Graphs()
    # Compiled before the scheduler wraps opt.step in its (untraceable) call counter.
    step = torch.compile(opt.step, fullgraph=True, backend=graphs)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda i: 0.9**i) for o in (opt, ref)]
    for i in range(12):
        grads = [g * (3.0 if i % 2 else 0.1) for g in grads_for(ours, i)]
        give(ours, grads)
        give(twins, grads)
        step()
        ref.step()
        for s in scheds:
            s.step()
        if i == 1:
            compiled = len(graphs)  # the first steps create state: traced again once
        for p, q in zip(ours, twins, strict=True):
            assert torch.equal(p, q), f"step {i}"
        for p, q in zip(ours, twins, strict=True):
            for key, v in opt.state[p].items():
                assert torch.equal(v, ref.state[q][key]), (i, key)
    assert len(graphs) == compiled <= 2, f"recompiled: {len(graphs)} graphs"
    assert len(launches) == 2 * 12, "our kernel ran in every compiled (and eager) step"
    assert "fusedopt.step_" in {t.split(".default")[0] for t in graphs.targets()}
    assert ("fusedopt.grad_norm" in graphs.targets()) is (max_grad_norm is not None)
    assert lr.item() == pytest.approx(0.05 * 0.9**12)


@pytest.mark.parametrize("case", CASES[:1] + CASES[2:3], ids=case_id)
def test_compiled_step_with_inductor_matches_torch(case, triton_device):
    """The default backend (inductor) too, against torch.optim's own eager step."""
    torch._dynamo.reset()
    device = triton_device
    ours, theirs = make(device, SPECS), make(device, SPECS)
    opt = case.fused_cls(ours, lr=torch.tensor(0.05, device=device), **case.kwargs)
    ref = case.torch_cls(theirs, lr=torch.tensor(0.05, device=device), **case.kwargs)
    step = torch.compile(opt.step, fullgraph=True)
    for i in range(3):
        grads = grads_for(ours, i)
        give(ours, grads)
        give(theirs, grads)
        step()
        ref.step()
    check_same(opt, ref, ours, theirs)


def test_compiled_step_with_grad_scaler_state(triton_device):
    """grad_scale / found_inf as GradScaler sets them are traced into the op: an inf skips."""
    torch._dynamo.reset()
    device = triton_device
    ours, twins = make(device, SPECS), make(device, SPECS)
    opt, ref = fusedopt.FusedAdamW(ours, lr=0.05), fusedopt.FusedAdamW(twins, lr=0.05)
    step = torch.compile(opt.step, fullgraph=True, backend=Graphs())
    for i, bad in enumerate([0.0, 0.0, 1.0, 0.0]):
        grads = grads_for(ours, i)
        give(ours, grads)
        give(twins, grads)
        for o in (opt, ref):
            o.grad_scale = torch.tensor(4.0, device=device)
            o.found_inf = torch.tensor(bad, device=device)
        step()
        ref.step()
        for p, q in zip(ours, twins, strict=True):
            assert torch.equal(p, q)
            assert torch.equal(opt.state[p]["step"], ref.state[q]["step"])
    assert opt.state[ours[0]]["step"].item() == 3


def test_unsupported_params_run_eager_outside_the_graph(triton_device):
    """Complex params are not in the ops: the step still works (with a graph break)."""
    torch._dynamo.reset()
    p = torch.randn(3, dtype=torch.complex64, device=triton_device, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    opt, ref = fusedopt.FusedAdam([p], lr=0.1), torch.optim.Adam([q], lr=0.1)
    step = torch.compile(opt.step)
    for i in range(2):
        p.grad = q.grad = torch.full_like(p, complex(1.0, -2.0) * (i + 1))
        step()
        ref.step()
    torch.testing.assert_close(p, q)


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_compiled_clip_grad_norm(norm_type, triton_device):
    torch._dynamo.reset()
    ours, theirs = make(triton_device, SPECS), make(triton_device, SPECS)
    grads = grads_for(ours, 0)
    give(ours, grads)
    give(theirs, grads)
    graphs = Graphs()
    clip = torch.compile(fusedopt.clip_grad_norm_, fullgraph=True, backend=graphs)
    total = clip(ours, 1.0, norm_type)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
    torch.testing.assert_close(total, expected)
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    assert {"fusedopt.grad_norm.default", "fusedopt.scale_grads_.default"} <= graphs.targets() | {
        t + ".default" for t in graphs.targets()
    }


def test_ops_pass_opcheck(triton_device):
    device = triton_device
    params = make(device, [(5,), (3, 2)], requires_grad=False)
    grads = grads_for(params, 0)
    state = [[torch.rand_like(p) for p in params] for _ in range(3)]
    steps = [torch.tensor(2.0, device=device) for _ in params]
    lr = torch.tensor(0.01, device=device)
    scale, inf, coef = (torch.tensor(v, device=device) for v in (2.0, 0.0, 0.5))
    # Adam with amsgrad (state columns 0, 1, 2), a tensor lr in slot 0; SGD with momentum.
    adam = ("adam", 0, params, grads, [0, 1, 2], [t for column in state for t in column], steps,
            [0.0, 0.9, 0.99, 1e-8, 0.1], [0], [lr], [True, False, True, True], scale, inf, coef)  # fmt: skip
    sgd = ("sgd", 0, params, grads, [0], state[0], [torch.tensor(v, device=device) for v in (0.0, 1.0)],
           [0.1, 0.9, 0.1, 0.0], [], [], [True, False, True, False], None, None, None)  # fmt: skip
    # RMSprop centered with momentum (all three state columns, square_avg > grad_avg**2); Adagrad
    # (sum), a tensor lr.
    rms_state = [t + 1.0 for t in state[0]] + state[1] + state[2]
    rmsprop = ("rmsprop", 0, params, grads, [0, 1, 2], rms_state, steps,
               [0.01, 0.99, 1e-8, 0.1, 0.9], [], [], [True, True, False, True], scale, inf, None)  # fmt: skip
    adagrad = ("adagrad", 0, params, grads, [0], state[0], steps, [0.0, 0.01, 0.0, 1e-10], [0], [lr],
               [True, False], None, None, coef)  # fmt: skip
    # no low-precision option, column, seeds, 8-bit state or per-tensor scalar state
    plain = ([0, 0, 0], "", [], [], [], [], [])
    # bf16 params: Adam with fp32 masters and fp32 state; SGD with stochastic rounding.
    low = [p.to(torch.bfloat16) for p in params]
    masters = [p.float() for p in low]
    seeds = [torch.tensor(s, device=device) for s in (3, 4)]
    adam_master = ("adam", 0, low, [g.to(torch.bfloat16) for g in grads], [0, 1], state[0] + state[1], steps,
                   [0.01, 0.9, 0.99, 1e-8, 0.0], [], [], [False, False, True, False], None, None, None,
                   [1, 0, 0], "", masters, [], [], [], [])  # fmt: skip
    sgd_sr = ("sgd", 0, low, [g.to(torch.bfloat16) for g in grads], [0], [t.to(torch.bfloat16) for t in state[0]],
              [torch.tensor(v, device=device) for v in (0.0, 1.0)], [0.1, 0.9, 0.0, 0.0], [], [],
              [True, False, False, False], None, None, None, [0, 0, 1], "", [], seeds, [], [], [])  # fmt: skip
    # NAdam: its per-tensor mu_product (carried), decoupled decay.
    mu_products = [torch.tensor(0.9, device=device) for _ in params]
    nadam = ("nadam", 0, params, grads, [0, 1], [*state[0], *(t + 1.0 for t in state[1])], steps,
             [0.01, 0.9, 0.99, 1e-8, 0.1, 0.004], [], [], [False, True, True], scale, inf, None,
             [0, 0, 0], "", [], [], [], [], mu_products)  # fmt: skip
    cases = [
        (torch.ops.fusedopt.step_.default, adam + plain),
        (torch.ops.fusedopt.step_.default, nadam),
        (torch.ops.fusedopt.step_.default, sgd + plain),
        (torch.ops.fusedopt.step_.default, rmsprop + plain),
        (torch.ops.fusedopt.step_.default, adagrad + plain),
        (torch.ops.fusedopt.step_.default, adam_master),
        (torch.ops.fusedopt.step_.default, sgd_sr),
        (torch.ops.fusedopt.grad_norm.default, (grads, 2.0, scale, True)),
        (torch.ops.fusedopt.scale_grads_.default, (grads, coef)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("case", CASES[:2], ids=case_id)
def test_eager_then_compiled_then_eager_steps(case, triton_device):
    """Eager steps make Adam's step counters views of one tensor; compiled steps then mutate
    those aliased views through the op, and eager steps continue after: all as one eager run."""
    torch._dynamo.reset()
    device = triton_device
    ours, twins = make(device, SPECS), make(device, SPECS)
    kwargs = for_device(case.kwargs, device)
    opt, ref = case.fused_cls(ours, lr=0.05, **kwargs), case.fused_cls(twins, lr=0.05, **kwargs)
    compiled = torch.compile(opt.step, fullgraph=True, backend=Graphs())
    for i in range(8):
        grads = grads_for(ours, i)
        give(ours, grads)
        give(twins, grads)
        (compiled if 2 <= i < 5 else opt.step)()
        ref.step()
        for p, q in zip(ours, twins, strict=True):
            assert torch.equal(p, q), i
            for key, v in opt.state[p].items():
                assert torch.equal(v, ref.state[q][key]), (i, key)
