"""The torch.optim API around the fused step: constructor, validation, state_dict, schedulers,
closures, param groups, tensor lr, torch-implementation flags, AMP, bad input, mixed dtypes.

Every behavioural test runs the same thing through torch.optim and through fusedopt and
compares; "no kernel ran" / "one kernel per step" is counted by wrapping the Triton kernels.
"""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
from helpers import (
    F32,
    assert_unchanged,
    case_id,
    check_same,
    close,
    give,
    grads_for,
    kernel_name,
    make,
    outcome,
    roundtrip,
    snapshot,
    sparse_grad,
    step_both,
)
from torch import nn

from fusedopt import (
    FusedAdadelta,
    FusedAdagrad,
    FusedAdam,
    FusedAdamax,
    FusedAdamW,
    FusedLion,
    FusedNAdam,
    FusedRAdam,
    FusedRMSprop,
    FusedRprop,
    FusedSGD,
)
from fusedopt.optim.lion import Lion
from fusedopt.testing import OptimCase, assert_close, for_loop, leaves
from fusedopt.tolerance import OPTIM_TOLERANCE, SCALAR_STATE, round_to_storage_

SGD, Adam, AdamW = torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW
RMSprop, Adagrad = torch.optim.RMSprop, torch.optim.Adagrad
Adamax, RAdam, NAdam = torch.optim.Adamax, torch.optim.RAdam, torch.optim.NAdam
Adadelta = torch.optim.Adadelta
Rprop = torch.optim.Rprop
PAIRS = [
    (SGD, FusedSGD),
    (Adam, FusedAdam),
    (AdamW, FusedAdamW),
    (RMSprop, FusedRMSprop),
    (Adagrad, FusedAdagrad),
    (Adamax, FusedAdamax),
    (RAdam, FusedRAdam),
    (NAdam, FusedNAdam),
    (Adadelta, FusedAdadelta),
    (Rprop, FusedRprop),
]

SGD_M = OptimCase(FusedSGD, SGD, dict(lr=0.1, momentum=0.9))
SGD_PLAIN = OptimCase(FusedSGD, SGD, dict(lr=0.1))
ADAM_AMS = OptimCase(FusedAdam, Adam, dict(lr=0.01, amsgrad=True))
ADAMW = OptimCase(FusedAdamW, AdamW, dict(lr=0.01, weight_decay=0.1))
RMSPROP = OptimCase(FusedRMSprop, RMSprop, dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.1))
ADAGRAD = OptimCase(
    FusedAdagrad, Adagrad, dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=0.1)
)
ADAMAX = OptimCase(FusedAdamax, Adamax, dict(lr=0.01, betas=(0.8, 0.9), weight_decay=0.1))
RADAM = OptimCase(FusedRAdam, RAdam, dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True))
NADAM = OptimCase(FusedNAdam, NAdam, dict(lr=0.01, weight_decay=0.1, momentum_decay=0.01))
ADADELTA = OptimCase(FusedAdadelta, Adadelta, dict(lr=0.5, rho=0.8, weight_decay=0.1))
RPROP = OptimCase(FusedRprop, Rprop, dict(lr=0.02, etas=(0.4, 1.3), step_sizes=(1e-3, 0.05)))
ISSUE_22 = [ADAMAX, RADAM, NADAM, ADADELTA, RPROP]  # issue 22's optimizers
CASES = [SGD_M, ADAM_AMS, ADAMW, RMSPROP, ADAGRAD, *ISSUE_22]
# Lion has no torch class (its reference, fusedopt.optim.lion.Lion, stands in) and none of torch's
# implementation flags: the tests of the optimizer contract take it, the flag tests do not.
LION = OptimCase(FusedLion, Lion, dict(lr=0.01, betas=(0.8, 0.95), weight_decay=0.1))
EVERY = [*CASES, LION]


# Helpers ---------------------------------------------------------------------------------------


def takes_fused(torch_cls: type) -> bool:
    """Whether torch's class has a ``fused`` argument (RMSprop has none)."""
    return "fused" in inspect.signature(torch_cls).parameters


def with_fused(cases: list[OptimCase]) -> list:
    """``(case, fused)`` for ``fused`` None (the default: not passed) and True, where the class
    takes it."""
    return [
        pytest.param(c, fused, id=f"{c.id}-fused={fused}")
        for c in cases
        for fused in (None, True)
        if fused is None or takes_fused(c.torch_cls)
    ]


# 1. Signatures, defaults, param_groups ------------------------------------------------------------

DEFAULT_KWARGS = {
    SGD: [{}, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True), dict(fused=True)],
    Adam: [{}, dict(lr=0.02, betas=(0.8, 0.9), eps=1e-6, amsgrad=True, capturable=True), dict(fused=True)],
    AdamW: [{}, dict(lr=0.02, weight_decay=0.3, maximize=True, foreach=True), dict(fused=True)],
    RMSprop: [
        {},
        dict(lr=0.02, alpha=0.9, eps=1e-6, weight_decay=0.1, momentum=0.9, centered=True, capturable=True),
        dict(maximize=True, foreach=True, differentiable=True),
    ],
    Adagrad: [
        {},
        dict(lr=0.02, lr_decay=0.1, weight_decay=0.1, initial_accumulator_value=0.3, eps=1e-8, maximize=True),
        dict(fused=True),
    ],
    Adamax: [
        {},
        dict(lr=0.02, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1, capturable=True),
        dict(foreach=True),
    ],
    RAdam: [
        {},
        dict(lr=0.02, betas=(0.8, 0.9), weight_decay=0.1, decoupled_weight_decay=True),
        dict(capturable=True),
    ],
    NAdam: [
        {},
        dict(lr=0.02, momentum_decay=0.01, weight_decay=0.1, decoupled_weight_decay=True),
        dict(foreach=True),
    ],
    Adadelta: [
        {},
        dict(lr=0.5, rho=0.8, eps=1e-5, weight_decay=0.1, capturable=True),
        dict(foreach=True),
    ],
    Rprop: [
        {},
        dict(lr=0.02, etas=(0.4, 1.3), step_sizes=(1e-3, 0.05), capturable=True),
        dict(foreach=True),
    ],
}


@pytest.mark.parametrize(("torch_cls", "fused_cls"), PAIRS, ids=lambda c: c.__name__)
def test_signature_defaults_and_param_groups(torch_cls, fused_cls):
    # torch's signature, plus our keyword-only extensions at the end.
    ours, theirs = inspect.signature(fused_cls), inspect.signature(torch_cls)
    params = list(ours.parameters.values())
    same, extra = params[: len(theirs.parameters)], params[len(theirs.parameters) :]
    assert ours.replace(parameters=same) == theirs
    assert [(p.name, p.kind, p.default) for p in extra] == [
        ("max_grad_norm", inspect.Parameter.KEYWORD_ONLY, None),
        ("master_weights", inspect.Parameter.KEYWORD_ONLY, False),
        ("kahan_summation", inspect.Parameter.KEYWORD_ONLY, False),
        ("stochastic_rounding", inspect.Parameter.KEYWORD_ONLY, False),
        ("state_dtype", inspect.Parameter.KEYWORD_ONLY, None),
    ]
    for kwargs in DEFAULT_KWARGS[torch_cls]:
        p, q = make("cpu", [(2,)]), make("cpu", [(2,)])
        ours = fused_cls([{"params": p}, {"params": q, "lr": 0.5}], **kwargs)
        theirs = torch_cls([{"params": p}, {"params": q, "lr": 0.5}], **kwargs)
        assert ours.defaults == theirs.defaults, kwargs
        assert len(ours.param_groups) == len(theirs.param_groups) == 2
        for mine, expected in zip(ours.param_groups, theirs.param_groups, strict=True):
            assert mine.keys() == expected.keys(), kwargs
            assert {k: v for k, v in mine.items() if k != "params"} == {
                k: v for k, v in expected.items() if k != "params"
            }
            assert all(a is b for a, b in zip(mine["params"], expected["params"], strict=True))


# 2. Validation errors -----------------------------------------------------------------------------

INVALID = [
    (SGD, dict(lr=-0.1)),
    (SGD, dict(lr=0.1, momentum=-0.5)),
    (SGD, dict(lr=0.1, weight_decay=-1.0)),
    (SGD, dict(lr=0.1, nesterov=True)),
    (SGD, dict(lr=0.1, momentum=0.9, dampening=0.5, nesterov=True)),
    (SGD, dict(lr=torch.tensor([0.1, 0.2]))),
    (SGD, dict(lr=0.1, fused=True, differentiable=True)),
    (SGD, dict(lr=0.1, fused=True, foreach=True)),
    (Adam, dict(lr=-1e-3)),
    (Adam, dict(eps=-1e-8)),
    (Adam, dict(betas=(1.0, 0.999))),
    (Adam, dict(betas=(0.9, -0.1))),
    (Adam, dict(betas=(0.9, 1.5))),
    (Adam, dict(weight_decay=-0.1)),
    (Adam, dict(lr=torch.tensor([1e-3, 2e-3]))),
    (Adam, dict(betas=(torch.tensor(0.9), 0.999))),
    (Adam, dict(lr=torch.tensor(0.01), foreach=True)),
    (Adam, dict(fused=True, differentiable=True)),
    (Adam, dict(fused=True, foreach=True)),
    (AdamW, dict(lr=-1.0)),
    (AdamW, dict(eps=-1.0)),
    (AdamW, dict(betas=(-0.1, 0.999))),
    (AdamW, dict(weight_decay=-0.01)),
    (AdamW, dict(betas=(0.9, torch.tensor(0.999)))),
    (AdamW, dict(fused=True, differentiable=True)),
    (AdamW, dict(fused=True, foreach=True)),
    (RMSprop, dict(lr=-0.01)),
    (RMSprop, dict(alpha=-0.5)),
    (RMSprop, dict(eps=-1e-8)),
    (RMSprop, dict(momentum=-0.1)),
    (RMSprop, dict(weight_decay=-1.0)),
    (RMSprop, dict(lr=torch.tensor([0.1, 0.2]))),
    (RMSprop, dict(fused=True)),  # RMSprop has no fused argument
    (Adagrad, dict(lr=-0.01)),
    (Adagrad, dict(lr_decay=-0.1)),
    (Adagrad, dict(weight_decay=-0.1)),
    (Adagrad, dict(initial_accumulator_value=-1.0)),
    (Adagrad, dict(eps=-1e-10)),
    (Adagrad, dict(lr=torch.tensor([0.1, 0.2]))),
    (Adagrad, dict(fused=True, differentiable=True)),
    (Adagrad, dict(fused=True, foreach=True)),
    (Adamax, dict(lr=-0.01)),
    (Adamax, dict(eps=-1e-8)),
    (Adamax, dict(betas=(1.0, 0.9))),
    (Adamax, dict(betas=(0.9, -0.1))),
    (Adamax, dict(weight_decay=-0.1)),
    (Adamax, dict(lr=torch.tensor([0.1, 0.2]))),
    (Adamax, dict(fused=True)),  # Adamax has no fused argument
    (RAdam, dict(lr=-0.01)),
    (RAdam, dict(eps=-1e-8)),
    (RAdam, dict(betas=(1.0, 0.9))),
    (RAdam, dict(betas=(0.9, 1.0))),
    (RAdam, dict(weight_decay=-0.1)),
    (RAdam, dict(lr=torch.tensor([0.1, 0.2]))),
    (RAdam, dict(fused=True)),
    (NAdam, dict(lr=-0.01)),
    (NAdam, dict(eps=-1e-8)),
    (NAdam, dict(betas=(1.0, 0.9))),
    (NAdam, dict(weight_decay=-0.1)),
    (NAdam, dict(momentum_decay=-0.1)),
    (NAdam, dict(lr=torch.tensor([0.1, 0.2]))),
    (NAdam, dict(fused=True)),
    (Adadelta, dict(lr=-0.01)),
    (Adadelta, dict(rho=1.1)),
    (Adadelta, dict(rho=-0.1)),
    (Adadelta, dict(eps=-1e-6)),
    (Adadelta, dict(weight_decay=-0.1)),
    (Adadelta, dict(lr=torch.tensor([0.1, 0.2]))),
    (Adadelta, dict(fused=True)),  # Adadelta has no fused argument
    (Rprop, dict(lr=-0.01)),
    (Rprop, dict(etas=(1.0, 1.2))),
    (Rprop, dict(etas=(0.0, 1.2))),
    (Rprop, dict(etas=(0.5, 1.0))),
    (Rprop, dict(lr=torch.tensor([0.1, 0.2]))),
    (Rprop, dict(fused=True)),  # Rprop has no fused argument
]


@pytest.mark.parametrize(
    ("torch_cls", "kwargs"), INVALID, ids=[f"{c.__name__}-{i}" for i, (c, _) in enumerate(INVALID)]
)
def test_invalid_arguments_raise_like_torch(torch_cls, kwargs):
    fused_cls = dict(PAIRS)[torch_cls]
    expected = outcome(lambda: torch_cls(make("cpu"), **kwargs))
    assert expected is not None, f"torch accepts {kwargs}"
    assert outcome(lambda: fused_cls(make("cpu"), **kwargs)) == expected


@pytest.mark.parametrize(("torch_cls", "fused_cls"), PAIRS, ids=lambda c: c.__name__)
def test_params_not_an_iterable_raises_like_torch(torch_cls, fused_cls):
    expected = outcome(lambda: torch_cls(torch.zeros(3), lr=0.1))
    assert expected is not None and expected[0] is TypeError
    assert outcome(lambda: fused_cls(torch.zeros(3), lr=0.1)) == expected


# 3. state_dict ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused_first", [False, True], ids=["torch->fused", "fused->torch"])
@pytest.mark.parametrize("case", EVERY, ids=case_id)
def test_state_dict_interchange(case, fused_first, triton_device, launches):
    device = triton_device
    first_cls, second_cls = (
        (case.fused_cls, case.torch_cls) if fused_first else (case.torch_cls, case.fused_cls)
    )
    a = make(device)
    first = first_cls(a, **case.kwargs)
    for step in range(3):
        give(a, grads_for(a, step))
        first.step()
    b = leaves(a)
    second = second_cls(b, **case.kwargs)
    # The second optimizer has already stepped once (state, cached plans) when it loads.
    give(b, grads_for(b, 99))
    second.step()
    with torch.no_grad():
        for p, q in zip(b, a, strict=True):
            p.copy_(q)
    second.load_state_dict(roundtrip(first.state_dict()))
    before = launches.counts.get(kernel_name(case), 0)
    for step in range(3, 7):
        step_both(first, second, a, b, step)
    check_same(second, first, b, a)
    assert launches.counts.get(kernel_name(case), 0) - before == 4, (
        "the fused optimizer must keep using its kernel"
    )


LAYOUTS = [
    SGD_M,
    SGD_PLAIN,
    OptimCase(FusedSGD, SGD, dict(lr=0.1, momentum=0.9, fused=True)),
    OptimCase(FusedAdam, Adam, dict(lr=0.01)),
    ADAM_AMS,
    OptimCase(FusedAdam, Adam, dict(lr=0.01, fused=True)),
    OptimCase(FusedAdam, Adam, dict(lr=0.01, capturable=True)),
    ADAMW,
    OptimCase(FusedAdamW, AdamW, dict(lr=0.01, fused=True, amsgrad=True)),
    OptimCase(FusedAdamW, AdamW, dict(lr=0.01, capturable=True, amsgrad=True)),
    OptimCase(FusedRMSprop, RMSprop, dict(lr=0.01)),
    RMSPROP,
    OptimCase(FusedRMSprop, RMSprop, dict(lr=0.01, momentum=0.5, capturable=True)),
    ADAGRAD,
    OptimCase(FusedAdagrad, Adagrad, dict(lr=0.1, fused=True)),
    ADAMAX,
    OptimCase(FusedAdamax, Adamax, dict(lr=0.01, capturable=True)),
    RADAM,
    OptimCase(FusedRAdam, RAdam, dict(lr=0.01, capturable=True)),
    NADAM,
    OptimCase(FusedNAdam, NAdam, dict(lr=0.01, capturable=True)),
    ADADELTA,
    OptimCase(FusedAdadelta, Adadelta, dict(capturable=True)),
    RPROP,
    OptimCase(FusedRprop, Rprop, dict(capturable=True)),
]


@pytest.mark.parametrize("case", LAYOUTS, ids=case_id)
def test_state_dict_layout(case, device):
    torch_kwargs = dict(case.kwargs)
    if device == "cpu" and torch_kwargs.get("capturable", False):
        pytest.skip("torch and fusedopt refuse capturable=True on CPU (test_capturable_on_cpu_refused)")
    ours, theirs = make(device), make(device)
    opt, ref = case.fused_cls(ours, **case.kwargs), case.torch_cls(theirs, **torch_kwargs)
    for step in range(2):
        step_both(opt, ref, ours, theirs, step)
    mine, expected = opt.state_dict(), ref.state_dict()
    assert mine.keys() == expected.keys()
    assert mine["param_groups"] == expected["param_groups"]
    assert mine["state"].keys() == expected["state"].keys()
    for i, state in expected["state"].items():
        assert mine["state"][i].keys() == state.keys(), f"state keys of param {i}"
        for key, v in state.items():
            w = mine["state"][i][key]
            assert (w.dtype, w.device, w.shape) == (v.dtype, v.device, v.shape), f"state[{key}] of {i}"
        if "step" in state:
            step = mine["state"][i]["step"]
            assert float(step) == 2
            assert step.dtype == F32 and step.shape == ()
            # On the param's device whatever the flags (torch: only fused/capturable), so a step
            # on CUDA never copies counters from the host; torch loads it either way.
            assert step.device == ours[i].device


# 4. LR schedulers ---------------------------------------------------------------------------------

SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1 / (1 + e)),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=0.1, total_steps=10, cycle_momentum=momentum_key(o) is not None
    ),
}


def momentum_key(opt) -> str | None:
    """The hyper-parameter OneCycleLR cycles: Adam's betas, SGD's and RMSprop's momentum (none
    for Adagrad)."""
    return next((k for k in ("betas", "momentum") if k in opt.defaults), None)


@pytest.mark.parametrize("schedule", SCHEDULERS)
@pytest.mark.parametrize("case", EVERY, ids=case_id)
def test_lr_schedulers(case, schedule, device):
    ours, theirs = make(device), make(device)
    opt, ref = case.fused_cls(ours, **case.kwargs), case.torch_cls(theirs, **case.kwargs)
    sched, ref_sched = SCHEDULERS[schedule](opt), SCHEDULERS[schedule](ref)
    key = momentum_key(ref)
    history, ref_history = [], []
    for step in range(8):
        step_both(opt, ref, ours, theirs, step)
        sched.step()
        ref_sched.step()
        history.append((sched.get_last_lr(), opt.param_groups[0].get(key)))
        ref_history.append((ref_sched.get_last_lr(), ref.param_groups[0].get(key)))
    assert history == ref_history
    assert len({h[0][0] for h in history}) > 2, "the schedule must change the lr"
    if schedule == "OneCycleLR" and key is not None:
        assert len({str(h[1]) for h in history}) > 2, "OneCycleLR must cycle momentum/betas"
    check_same(opt, ref, ours, theirs)


# 5. closure, zero_grad, param groups, params without grads ----------------------------------------


@pytest.mark.parametrize("case", EVERY, ids=case_id)
def test_step_closure_returns_loss(case, device):
    ours, theirs = make(device), make(device)
    opt, ref = case.fused_cls(ours, **case.kwargs), case.torch_cls(theirs, **case.kwargs)
    target = [torch.randn(p.shape, generator=torch.Generator().manual_seed(3)).to(device) for p in ours]

    def closure_for(o, params):
        def closure():
            o.zero_grad()
            loss = sum(((p - t) ** 2).sum() for p, t in zip(params, target, strict=True))
            loss.backward()
            return loss

        return closure

    for _ in range(3):
        loss = opt.step(closure_for(opt, ours))
        ref_loss = ref.step(closure_for(ref, theirs))
        assert isinstance(loss, torch.Tensor) and loss.requires_grad
        close(loss, ref_loss, "loss")
    check_same(opt, ref, ours, theirs)
    assert opt.step() is None


def test_step_hooks_and_profiler_range_as_torch(device):
    """The step hooks run as torch's wrapper runs them (global and the optimizer's, pre-hooks
    before, post-hooks after, a pre-hook may replace the arguments, a bad return raises), once
    per step; the profiler range ``Optimizer.step#<class>.step`` is recorded while a profiler
    runs (fusedopt enters it only then: see ``_torch_compat.profiled_step``)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    ours, theirs = make(device), make(device)
    opt, ref = FusedAdamW(ours, lr=0.01), torch.optim.AdamW(theirs, lr=0.01)
    calls = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("global pre", type(o).__name__))),
        register_optimizer_step_post_hook(lambda o, a, k: calls.append(("global post", type(o).__name__))),
    ]
    closures = []
    for o, params in ((opt, ours), (ref, theirs)):

        def closure(params=params):
            closures.append(len(params))
            return torch.zeros(())

        handles.append(o.register_step_pre_hook(lambda o, a, k, c=closure: ((o, c), {})))  # the closure
        handles.append(o.register_step_post_hook(lambda o, a, k: calls.append(("post", len(a)))))
    try:
        for o, params in ((opt, ours), (ref, theirs)):
            give(params, grads_for(params, 0))
            o.step()
        assert calls[:3] == [("global pre", "FusedAdamW"), ("post", 2), ("global post", "FusedAdamW")]
        assert calls[3:] == [("global pre", "AdamW"), ("post", 2), ("global post", "AdamW")]
        assert closures == [len(ours), len(theirs)]
        check_same(opt, ref, ours, theirs)
        bad = opt.register_step_pre_hook(lambda o, a, k: "bad")
        with pytest.raises(RuntimeError, match="must return None or a tuple"):
            opt.step()
        bad.remove()
    finally:
        for h in handles:
            h.remove()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    assert "Optimizer.step#FusedAdamW.step" in {e.name for e in prof.events()}
    assert getattr(type(opt).step, "hooked", False)


@pytest.mark.parametrize("case", EVERY, ids=case_id)
def test_zero_grad(case, device):
    ours, theirs = make(device), make(device)
    opt, ref = case.fused_cls(ours, **case.kwargs), case.torch_cls(theirs, **case.kwargs)
    step_both(opt, ref, ours, theirs, 0)
    opt.zero_grad()
    assert all(p.grad is None for p in ours)
    step_both(opt, ref, ours, theirs, 1)
    buffers = [p.grad for p in ours]
    opt.zero_grad(set_to_none=False)
    ref.zero_grad(set_to_none=False)
    assert all(p.grad is g and not g.any() for p, g in zip(ours, buffers, strict=True))
    opt.step()  # zero grads still step (momentum, weight decay, Adam's moments)
    ref.step()
    check_same(opt, ref, ours, theirs)


@pytest.mark.parametrize("case", EVERY, ids=case_id)
def test_add_param_group_after_steps(case, device):
    ours, theirs = make(device), make(device)
    opt, ref = case.fused_cls(ours[:2], **case.kwargs), case.torch_cls(theirs[:2], **case.kwargs)
    mask = [True, True, False]
    for step in range(2):
        step_both(opt, ref, ours, theirs, step, mask)
    extra = dict(lr=0.03, weight_decay=0.2, maximize=True)
    opt.add_param_group({"params": ours[2:], **extra})
    ref.add_param_group({"params": theirs[2:], **extra})
    assert opt.param_groups[1].keys() == ref.param_groups[1].keys()
    assert opt.param_groups[1]["lr"] == 0.03
    before = ours[2].detach().clone()
    for step in range(2, 5):
        step_both(opt, ref, ours, theirs, step)
    assert not torch.equal(before, ours[2].detach()), "the new group was not stepped"
    check_same(opt, ref, ours, theirs)


# Not Adagrad: torch's constructor creates the state of every param (tests/test_adagrad.py).
@pytest.mark.parametrize("case", [SGD_PLAIN, *(c for c in EVERY if c is not ADAGRAD)], ids=case_id)
def test_params_without_grads_get_no_state(case, device):
    ours, theirs = make(device, [(3, 4), (5,), (), (2, 2)]), make(device, [(3, 4), (5,), (), (2, 2)])
    opt, ref = case.fused_cls(ours, **case.kwargs), case.torch_cls(theirs, **case.kwargs)
    late = [True, False, True, False]
    for step in range(3):
        step_both(opt, ref, ours, theirs, step, late)
    assert ours[1] not in opt.state and ours[3] not in opt.state
    assert torch.equal(ours[1].detach(), theirs[1].detach()), "a param without grad moved"
    if case.kwargs.get("momentum", 0) == 0 and case.torch_cls is SGD:
        assert len(opt.state) == len(ref.state) == 0
    assert opt.state_dict()["state"].keys() == ref.state_dict()["state"].keys()
    check_same(opt, ref, ours, theirs)
    # Param 1 gets a grad from now on; its own step count starts at 1 (Adam's bias correction).
    for step in range(3, 6):
        step_both(opt, ref, ours, theirs, step, [True, True, step % 2 == 1, False])
    assert ours[3] not in opt.state
    check_same(opt, ref, ours, theirs)


MIXED_GROUPS = {
    SGD: [dict(lr=0.1, momentum=0.9), dict(lr=0.02, weight_decay=0.1, momentum=0.5, nesterov=True), {}],
    Adam: [
        dict(lr=0.02, amsgrad=True),
        dict(lr=0.005, betas=(0.5, 0.9), weight_decay=0.1, maximize=True),
        {},
    ],
    AdamW: [dict(weight_decay=0.5, eps=1e-3), dict(lr=0.003, amsgrad=True), {}],
    RMSprop: [
        dict(lr=0.02, centered=True),
        dict(momentum=0.5, weight_decay=0.1, maximize=True, alpha=0.9),
        {},
    ],
    # A group's initial_accumulator_value: torch's constructor ignores it (uses its argument's).
    Adagrad: [
        dict(lr_decay=0.1),
        dict(lr=0.05, weight_decay=0.1, maximize=True, initial_accumulator_value=0.5),
        {},
    ],
    Adamax: [dict(lr=0.02, eps=1e-3), dict(lr=0.005, betas=(0.5, 0.9), weight_decay=0.1, maximize=True), {}],
    RAdam: [
        dict(lr=0.02, decoupled_weight_decay=True, weight_decay=0.1),
        dict(betas=(0.5, 0.9), maximize=True),
        {},
    ],
    NAdam: [dict(momentum_decay=0.01), dict(lr=0.05, weight_decay=0.1, decoupled_weight_decay=True), {}],
    Adadelta: [dict(lr=0.5, rho=0.8), dict(lr=2.0, weight_decay=0.1, maximize=True), {}],
    Rprop: [dict(lr=0.02, etas=(0.4, 1.3)), dict(step_sizes=(1e-3, 0.02), maximize=True), {}],
    Lion: [dict(betas=(0.5, 0.9)), dict(lr=0.05, weight_decay=0.1, maximize=True), {}],
}


@pytest.mark.parametrize("case", EVERY, ids=case_id)
def test_mixed_param_groups(case, device):
    ours, theirs = make(device), make(device)
    specs = MIXED_GROUPS[case.torch_cls]

    def groups(params):
        return [{"params": [p], **spec} for p, spec in zip(params, specs, strict=True)]

    opt, ref = case.fused_cls(groups(ours), lr=0.01), case.torch_cls(groups(theirs), lr=0.01)
    for step in range(4):
        step_both(opt, ref, ours, theirs, step)
    check_same(opt, ref, ours, theirs)


# 6. Tensor lr -------------------------------------------------------------------------------------

LR_VALUES = [0.01, 0.005, 0.02, 0.02, 0.001]


TENSOR_LR_CASES = [
    SGD_M,
    OptimCase(FusedAdam, Adam, {}),
    ADAMW,
    OptimCase(FusedRMSprop, RMSprop, dict(momentum=0.9)),
    OptimCase(FusedAdagrad, Adagrad, dict(lr_decay=0.1)),
    *ISSUE_22,
    LION,
]


@pytest.mark.parametrize("case", TENSOR_LR_CASES, ids=case_id)
def test_tensor_lr_changed_in_place(case, device):
    ours, theirs = make(device), make(device)
    kwargs = {k: v for k, v in case.kwargs.items() if k != "lr"}
    lr = torch.tensor(LR_VALUES[0])
    opt, ref = case.fused_cls(ours, lr=lr, **kwargs), case.torch_cls(theirs, lr=float(lr), **kwargs)
    for step, value in enumerate(LR_VALUES):
        lr.fill_(value)
        ref.param_groups[0]["lr"] = float(lr)
        step_both(opt, ref, ours, theirs, step)
    assert opt.param_groups[0]["lr"] is lr
    check_same(opt, ref, ours, theirs)


@pytest.mark.parametrize("cls", [(Adam, FusedAdam), (AdamW, FusedAdamW)], ids=lambda c: c[1].__name__)
def test_capturable_with_tensor_lr(cls, device):
    torch_cls, fused_cls = cls
    ours, theirs = make(device), make(device)
    lr = torch.tensor(LR_VALUES[0], device=device)
    opt = fused_cls(ours, lr=lr, capturable=device != "cpu", amsgrad=True)  # CPU: torch refuses it
    ref = torch_cls(theirs, lr=float(lr), amsgrad=True)
    for step, value in enumerate(LR_VALUES):
        lr.fill_(value)
        ref.param_groups[0]["lr"] = float(lr)
        step_both(opt, ref, ours, theirs, step)
    for p in ours:
        step_t = opt.state[p]["step"]
        assert (step_t.dtype, step_t.shape, step_t.device) == (F32, (), p.device)
    check_same(opt, ref, ours, theirs)


# 7. Flags selecting torch's implementation; kernel launches ---------------------------------------

# torch's speed hints choose among torch's implementations: a drop-in runs its kernel for any of
# them (docs/options.md). Only differentiable=True (autograd through the step) is torch's step.
SPEED_HINTS = [dict(fused=False), dict(foreach=True), dict(foreach=False)]
SPEED_HINT_CASES = [
    pytest.param(case, flags, id=f"{case.id}-{next(iter(flags))}={next(iter(flags.values()))}")
    for case in CASES
    for flags in SPEED_HINTS
    if "fused" not in flags or takes_fused(case.torch_cls)
]


@pytest.mark.parametrize(("case", "flags"), SPEED_HINT_CASES)
def test_speed_hints_run_the_kernel(case, flags, triton_device, launches):
    """foreach=True/False and fused=False were torch's step before (a user who changed the import
    got no kernel, and no word): the kernel runs, with torch's results for the same flags."""
    device = triton_device
    ours, theirs = make(device), make(device)
    opt = case.fused_cls(ours, **case.kwargs, **flags)
    ref = case.torch_cls(theirs, **case.kwargs, **flags)
    for step in range(3):
        step_both(opt, ref, ours, theirs, step)
    check_same(opt, ref, ours, theirs)
    assert launches.counts == {kernel_name(case): 3}
    assert opt._step_supports_amp_scaling


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_differentiable_runs_torchs_step(case, triton_device, launches):
    device = triton_device
    # differentiable steps run with grad enabled: params must not be leaves requiring grad.
    ours, theirs = make(device, requires_grad=False), make(device, requires_grad=False)
    opt = case.fused_cls(ours, **case.kwargs, differentiable=True)
    ref = case.torch_cls(theirs, **case.kwargs, differentiable=True)
    for step in range(3):
        step_both(opt, ref, ours, theirs, step)
    check_same(opt, ref, ours, theirs)
    assert len(launches) == 0


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_torch_flag_applies_per_group(case, triton_device, launches):
    device = triton_device
    ours, theirs = make(device, requires_grad=False), make(device, requires_grad=False)

    def groups(params):
        return [{"params": params[:2]}, {"params": params[2:], "differentiable": True}]

    opt, ref = case.fused_cls(groups(ours), **case.kwargs), case.torch_cls(groups(theirs), **case.kwargs)
    for step in range(3):
        step_both(opt, ref, ours, theirs, step)
    check_same(opt, ref, ours, theirs)
    assert launches.counts == {kernel_name(case): 3}


@pytest.mark.parametrize(("case", "fused"), with_fused([SGD_PLAIN, *EVERY]))
def test_default_path_launches_one_kernel_per_step(case, fused, triton_device, launches):
    device = triton_device
    ours, theirs = make(device, [(3, 4), (5,), (), (7, 3)]), make(device, [(3, 4), (5,), (), (7, 3)])
    opt = case.fused_cls(ours, **({} if fused is None else dict(fused=fused)), **case.kwargs)
    ref = case.torch_cls(theirs, **case.kwargs)
    for step in range(3):
        step_both(opt, ref, ours, theirs, step)
        assert launches.counts == {kernel_name(case): step + 1}
    check_same(opt, ref, ours, theirs)


# 8. AMP -------------------------------------------------------------------------------------------

INF_STEP = 3


@pytest.mark.parametrize("unscale_first", [False, True], ids=["step", "unscale_-then-step"])
@pytest.mark.parametrize(("case", "fused"), with_fused(EVERY))
def test_grad_scaler(case, fused, unscale_first, triton_device, launches):
    """GradScaler hands grad_scale/found_inf to our step (default path too): the kernel unscales,
    and the step with an injected inf changes nothing (params, state, step) without a host
    sync; the scale backs off and the run matches torch's own (unfused) optimizer."""
    device = triton_device
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(device)
    twin = copy.deepcopy(model)
    opt = case.fused_cls(model.parameters(), **({} if fused is None else dict(fused=fused)), **case.kwargs)
    ref = case.torch_cls(twin.parameters(), **case.kwargs)
    assert opt._step_supports_amp_scaling
    assert not getattr(ref, "_step_supports_amp_scaling", False)
    scaler, ref_scaler = (torch.amp.GradScaler(device, init_scale=2.0**4, growth_interval=2) for _ in "ab")
    ours, theirs = list(model.parameters()), list(twin.parameters())
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        x = torch.randn(5, 4, generator=gen).to(device)
        for m, o, s in ((model, opt, scaler), (twin, ref, ref_scaler)):
            o.zero_grad()
            s.scale(m(x).square().mean()).backward()
            if step == INF_STEP:
                m[0].weight.grad[1, 2] = float("inf")
        before, scale = snapshot(opt, ours), scaler.get_scale()
        for o, s in ((opt, scaler), (ref, ref_scaler)):
            if unscale_first:
                s.unscale_(o)
            s.step(o)
            s.update()
        if step == INF_STEP:
            assert_unchanged(before, opt, ours)
            assert scaler.get_scale() == scale / 2
        assert scaler.get_scale() == ref_scaler.get_scale()
        check_same(opt, ref, ours, theirs)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    assert launches.counts.get(kernel_name(case), 0) == 6
    # Unscaled in the kernel unless unscale_() already did it: the flags say which.
    flags = [kwargs["HAS_GRAD_SCALE"] for _, _, kwargs in launches]
    assert flags == [not unscale_first] * 6
    assert all(kwargs["HAS_FOUND_INF"] for _, _, kwargs in launches)


@pytest.mark.parametrize("scaler_cls", ["torch", "fusedopt"])
def test_grad_scaler_skipping_the_first_step_keeps_momentum_buffers_new(scaler_cls, triton_device):
    """AMP often skips the first steps (scale too high). torch then has no momentum buffer yet,
    so the first step taken sets buf = grad; ours must too (it matters with dampening)."""
    import fusedopt

    device = triton_device
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(device)
    twin = copy.deepcopy(model)
    kwargs = dict(lr=0.1, momentum=0.9, dampening=0.5)
    opt, ref = FusedSGD(model.parameters(), **kwargs), SGD(twin.parameters(), **kwargs)
    make_scaler = fusedopt.GradScaler if scaler_cls == "fusedopt" else torch.amp.GradScaler
    scaler, ref_scaler = make_scaler(device, init_scale=8.0), torch.amp.GradScaler(device, init_scale=8.0)
    gen = torch.Generator().manual_seed(0)
    for step in range(5):
        x = torch.randn(5, 4, generator=gen).to(device)
        for m, o, s in ((model, opt, scaler), (twin, ref, ref_scaler)):
            o.zero_grad()
            s.scale(m(x).square().mean()).backward()
            if step in (0, 1):  # the first two steps are skipped
                m[0].weight.grad[0, 0] = float("inf")
            s.step(o)
            s.update()
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            close(p, q, f"param after step {step}")
        if step >= 2:
            check_same(opt, ref, list(model.parameters()), list(twin.parameters()))


@pytest.mark.parametrize(
    ("fused_cls", "torch_cls"), [(FusedSGD, SGD), (FusedAdam, Adam)], ids=["SGD", "Adam"]
)
def test_grad_scaler_unscales_groups_that_run_torchs_step(fused_cls, torch_cls, triton_device):
    """A group with differentiable=True runs torch's step, which cannot unscale: then GradScaler
    must, every group's grads once (in place, as torch's GradScaler does). Adam's first step
    hardly depends on the grads' scale: the grads themselves are compared too."""
    device = triton_device
    p, q = make(device, [(3,)], requires_grad=False), make(device, [(3,)], requires_grad=False)
    opt = fused_cls([{"params": p}, {"params": q, "differentiable": True}], lr=0.1)
    assert not opt._step_supports_amp_scaling
    ours = [*p, *q]
    theirs = [x.detach().clone().requires_grad_() for x in ours]
    ref = torch_cls(theirs, lr=0.1)
    scaler = torch.amp.GradScaler(device, init_scale=4.0)
    scaler.scale(torch.ones((), device=device))  # sets up the scale, as scaling a loss does
    for x, y in zip(ours, theirs, strict=True):
        x.grad = torch.full((3,), 8.0, device=device)
        y.grad = torch.full((3,), 2.0, device=device)  # unscaled
    scaler.step(opt)
    ref.step()
    for i, (x, y) in enumerate(zip(ours, theirs, strict=True)):
        assert torch.equal(x.grad, y.grad), f"grad of group {i}"
        close(x, y, f"param of group {i}")


# 9. Bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("prior_steps", [0, 1])
@pytest.mark.parametrize(
    "cls",
    [
        (Adam, FusedAdam),
        (AdamW, FusedAdamW),
        (RMSprop, FusedRMSprop),
        (Adamax, FusedAdamax),
        (RAdam, FusedRAdam),
        (NAdam, FusedNAdam),
        (Adadelta, FusedAdadelta),
        (Rprop, FusedRprop),
    ],
    ids=lambda c: c[1].__name__,
)
def test_sparse_grad_raises_and_changes_nothing(cls, prior_steps, device):
    torch_cls, fused_cls = cls
    ours, theirs = make(device, [(4, 3), (5, 3), (2,)]), make(device, [(4, 3), (5, 3), (2,)])

    def groups(params):  # a valid group first: it must not step either
        return [{"params": params[2:], "lr": 0.05}, {"params": params[:2]}]

    opt, ref = fused_cls(groups(ours), lr=0.01), torch_cls(groups(theirs), lr=0.01)
    for step in range(prior_steps):
        step_both(opt, ref, ours, theirs, step)
    grads = grads_for(ours, 10)
    give(ours, [grads[0], sparse_grad(ours[1], 0), grads[2]])
    before = snapshot(opt, ours)
    with pytest.raises(RuntimeError, match="sparse") as raised:
        opt.step()
    assert_unchanged(before, opt, ours)
    if torch_cls is not Adam and torch_cls is not AdamW:  # torch's own message (FusedAdam's names itself)
        probe = make(device, [(4, 3)])
        probe[0].grad = sparse_grad(probe[0], 0)
        assert outcome(torch_cls(probe).step) == (RuntimeError, str(raised.value))
    # The failed step left nothing behind: a dense step afterwards matches torch.
    step_both(opt, ref, ours, theirs, 11)
    check_same(opt, ref, ours, theirs)


SPARSE_CASES = [
    OptimCase(FusedSGD, SGD, dict(lr=0.1)),
    OptimCase(FusedSGD, SGD, dict(lr=0.1, momentum=0.9, dampening=0.2)),
    OptimCase(FusedAdagrad, Adagrad, dict(lr=0.1)),
    OptimCase(
        FusedAdagrad, Adagrad, dict(lr=0.1, lr_decay=0.1, initial_accumulator_value=0.1, maximize=True)
    ),
]


@pytest.mark.filterwarnings("ignore:Sparse invariant checks are implicitly disabled")  # torch's Adagrad
@pytest.mark.parametrize("case", SPARSE_CASES, ids=case_id)
def test_sparse_grads_match_torch(case, device):
    """SGD and Adagrad take sparse grads: torch's own (for-loop) step for those params."""
    ours, theirs = make(device, [(4, 3), (6, 3), (2,)]), make(device, [(4, 3), (6, 3), (2,)])
    opt, ref = case.fused_cls(ours, **case.kwargs), case.torch_cls(theirs, **case.kwargs)
    for step in range(3):
        grads = grads_for(ours, step)
        grads[1] = sparse_grad(ours[1], step)
        give(ours, grads)
        give(theirs, grads)
        opt.step()
        ref.step()
    check_same(opt, ref, ours, theirs)


@pytest.mark.parametrize(
    "case",
    [
        SGD_M,
        ADAM_AMS,
        OptimCase(FusedAdamW, AdamW, dict(lr=0.01)),
        RMSPROP,
        ADAGRAD,
        *ISSUE_22,
        LION,
    ],
    ids=case_id,
)
def test_complex_params_match_torch(case, device):
    specs = [((3,), torch.complex64), ((2, 4), torch.complex64), ((5,), F32)]
    ours, theirs = make(device, specs), make(device, specs)
    opt, ref = (
        case.fused_cls(ours, **case.kwargs),
        case.torch_cls(theirs, **for_loop(case.torch_cls), **case.kwargs),
    )
    for step in range(7):
        step_both(opt, ref, ours, theirs, step)
    check_same(opt, ref, ours, theirs)


@pytest.mark.parametrize(
    "cls",
    [
        FusedAdam,
        FusedAdamW,
        FusedRMSprop,
        FusedAdagrad,
        FusedAdamax,
        FusedRAdam,
        FusedNAdam,
        FusedAdadelta,
        FusedRprop,
        FusedLion,
    ],
)
def test_integer_params_raise_and_change_nothing(cls, device):
    """torch fails in the middle of such a step (a RuntimeError); ours raises before it
    (NotImplementedError, a RuntimeError) and changes nothing."""
    params = make(device, [(3,), ((4,), torch.int64)])
    opt = cls(params, lr=0.01)
    give(params, [grads_for(params, 0)[0], None])
    opt.step()  # the integer param has no grad yet: fine
    give(params, grads_for(params, 1))
    before = snapshot(opt, params)
    with pytest.raises(NotImplementedError):
        opt.step()
    assert_unchanged(before, opt, params)
    if cls is not FusedAdagrad:  # torch's Adagrad creates every param's state in its constructor
        assert params[1] not in opt.state


@pytest.mark.parametrize("momentum", [0, 1])
def test_fused_sgd_integer_params_match_torch(momentum, device):
    specs = [((4,), torch.int64), ((2, 3), torch.int64)]
    ours, theirs = make(device, specs), make(device, specs)
    opt, ref = FusedSGD(ours, lr=1, momentum=momentum), SGD(theirs, lr=1, momentum=momentum)
    for step in range(3):
        step_both(opt, ref, ours, theirs, step)
    check_same(opt, ref, ours, theirs)


def construct_with_warnings(cls, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = cls(*args, **kwargs)
    return opt, [(w.category, str(w.message)) for w in caught]


SGD_DAMPENED = OptimCase(
    FusedSGD, SGD, dict(lr=0.1, momentum=0.9, dampening=0.5)
)  # a new buffer per occurrence


@pytest.mark.parametrize(
    "case",
    [
        SGD_M,
        SGD_DAMPENED,
        SGD_PLAIN,
        ADAM_AMS,
        ADAMW,
        RMSPROP,
        ADAGRAD,
        *ISSUE_22,
        LION,
    ],
    ids=case_id,
)
def test_duplicate_params(case, device):
    ours, theirs = make(device), make(device)
    opt, warned = construct_with_warnings(case.fused_cls, [ours[0], *ours, ours[2]], **case.kwargs)
    ref, ref_warned = construct_with_warnings(case.torch_cls, [theirs[0], *theirs, theirs[2]], **case.kwargs)
    assert ref_warned and warned == ref_warned
    for step in range(3):
        step_both(opt, ref, ours, theirs, step)
    check_same(opt, ref, ours, theirs)


@pytest.mark.parametrize(("torch_cls", "fused_cls"), PAIRS, ids=lambda c: c.__name__)
def test_empty_param_list(torch_cls, fused_cls):
    expected = outcome(lambda: torch_cls([], lr=0.1))
    assert expected is not None and expected[0] is ValueError
    assert outcome(lambda: fused_cls([], lr=0.1)) == expected


# 10. Mixed dtypes in one group --------------------------------------------------------------------

MIXED_DTYPES = [
    ((5, 3), F32),
    ((4,), torch.bfloat16),
    ((3, 3), torch.float64),
    ((7,), F32),
    ((6,), torch.bfloat16),
]


@pytest.mark.parametrize(
    "case",
    [
        OptimCase(FusedSGD, SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.1)),
        OptimCase(FusedAdam, Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
        ADAMW,
        OptimCase(FusedRMSprop, RMSprop, dict(lr=0.01, momentum=0.9, centered=True)),
        OptimCase(FusedAdagrad, Adagrad, dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1)),
        *ISSUE_22,
        LION,
    ],
    ids=case_id,
)
def test_mixed_dtypes_in_one_group(case, triton_device, launches):
    """Oracle: torch's for-loop step; bf16 params through fp32 copies rounded to bf16 each step."""
    device = triton_device
    ours = make(device, MIXED_DTYPES)
    theirs = [leaves([p], F32 if p.dtype == torch.bfloat16 else None)[0] for p in ours]
    low = [q for p, q in zip(ours, theirs, strict=True) if p.dtype == torch.bfloat16]
    opt, ref = (
        case.fused_cls(ours, **case.kwargs),
        case.torch_cls(theirs, **for_loop(case.torch_cls), **case.kwargs),
    )
    # The oracle's bf16 params and their state, stored in bf16 (the state torch's constructor
    # creates, Adagrad's sum, too).
    round_to_storage_(ref, low, torch.bfloat16)
    for step in range(7):
        step_both(opt, ref, ours, theirs, step)
        round_to_storage_(ref, low, torch.bfloat16)
    assert launches.counts == {kernel_name(case): 3 * 7}, "one launch per dtype and step"
    for i, (p, q) in enumerate(zip(ours, theirs, strict=True)):
        assert_close(p.detach(), q.detach(), f"param {i} ({p.dtype})", OPTIM_TOLERANCE)
        for key, v in ref.state[q].items():
            w = opt.state[p][key]
            if key == "step":
                assert float(w) == float(v) == 7
            elif key in SCALAR_STATE:  # NAdam's mu_product: torch's dtype (the step's) whatever the param's
                assert w.dtype == v.dtype, f"state[{key}] of param {i}"
                assert_close(w, v, f"state[{key}] of param {i}", OPTIM_TOLERANCE)
            else:
                assert w.dtype == p.dtype, f"state[{key}] of param {i} must be stored as {p.dtype}"
                assert_close(w, v, f"state[{key}] of param {i} ({p.dtype})", OPTIM_TOLERANCE)
