"""Drop-in safety of the optimizers under misuse (issue 18): whatever a kernel walks is checked
against what its plan assumed; state is the optimizer's ``state``, always; torch's errors where
torch refuses, torch's results where it does not.

Each test names the defect it guards against; before the fix each crashed the process (heap
corruption), silently stepped something else than torch, or raised where torch works.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from helpers import (
    F32,
    assert_unchanged,
    check_same,
    close,
    give,
    grads_for,
    make,
    outcome,
    roundtrip,
    snapshot,
)

import fusedopt
from fusedopt import FusedAdagrad, FusedAdam, FusedAdamW, FusedRMSprop, FusedSGD
from fusedopt.optim import _plan

PAIRS = [
    (FusedSGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    (FusedAdam, torch.optim.Adam, dict(lr=0.01)),
    (FusedAdamW, torch.optim.AdamW, dict(lr=0.01, amsgrad=True)),
    (FusedRMSprop, torch.optim.RMSprop, dict(lr=0.01, momentum=0.5, centered=True)),
    (FusedAdagrad, torch.optim.Adagrad, dict(lr=0.1)),
]
PAIR_IDS = [cls.__name__ for cls, _, _ in PAIRS]


def twins(device, specs, seed=0):
    return make(device, specs, seed=seed), make(device, specs, seed=seed)


def both_raise(fn_ours, fn_theirs) -> type[BaseException]:
    mine, theirs = outcome(fn_ours), outcome(fn_theirs)
    assert mine is not None, "fusedopt stepped where torch raises"
    assert theirs is not None, f"torch steps where fusedopt raises {mine}"
    assert mine[0] is theirs[0], f"fusedopt raised {mine}, torch {theirs}"
    return mine[0]


# Memory: state, params and grads that are not what the plan was built for ---------------------


@pytest.mark.parametrize(("fused_cls", "torch_cls", "kwargs"), PAIRS, ids=PAIR_IDS)
def test_state_dict_of_another_model_raises_at_step(fused_cls, torch_cls, kwargs, device):
    """A state dict whose state tensors are smaller than the params (another model with the same
    number of params) loads, as in torch; the step then walked each param's numel over the smaller
    buffers (heap corruption). Now it raises torch's error type, changing nothing."""
    small_first, large_first = [(8,), (5000,)], [(5000,), (8,)]
    donor = make(device, large_first)
    give(donor, grads_for(donor, 0))
    source = torch_cls(donor, **kwargs)
    source.step()
    ours, theirs = twins(device, small_first)
    opt, ref = fused_cls(ours, **kwargs), torch_cls(theirs, **kwargs)
    opt.load_state_dict(roundtrip(source.state_dict()))
    ref.load_state_dict(roundtrip(source.state_dict()))  # torch's load may keep the tensors given
    grads = grads_for(ours, 1)
    give(ours, grads)
    give(theirs, grads)
    before = snapshot(opt, ours)
    assert both_raise(opt.step, ref.step) is RuntimeError
    assert_unchanged(before, opt, ours)


def test_int8_codes_of_a_smaller_param_raise_at_step(device):
    """8-bit codes and absmax saved for a smaller param (both >= 4096 elements): the kernel read
    the larger param's blocks from them."""
    donor = make(device, [(4096,)])
    give(donor, grads_for(donor, 0))
    source = FusedAdam(donor, lr=0.01, state_dtype="int8")
    source.step()
    assert source.state[donor[0]]["exp_avg"].dtype == torch.uint8
    ours = make(device, [(8192,)])
    opt = FusedAdam(ours, lr=0.01, state_dtype="int8")
    opt.load_state_dict(roundtrip(source.state_dict()))
    give(ours, grads_for(ours, 1))
    before = snapshot(opt, ours)
    with pytest.raises(RuntimeError, match=r"state\['exp_avg'\] of param 0 has shape"):
        opt.step()
    assert_unchanged(before, opt, ours)


@pytest.mark.parametrize(("fused_cls", "torch_cls", "kwargs"), PAIRS, ids=PAIR_IDS)
def test_data_swapped_to_a_smaller_view_after_a_step_raises(fused_cls, torch_cls, kwargs, device):
    """``p.data = <tensor of another size>`` after a step: the plan (keyed on the data pointer and
    the grad strides, which a view at offset 0 keeps) was reused and walked past the new buffers."""
    ours, theirs = twins(device, [(64,), (3, 4)])
    opt, ref = fused_cls(ours, **kwargs), torch_cls(theirs, **kwargs)
    for step in range(2):
        grads = grads_for(ours, step)
        give(ours, grads)
        give(theirs, grads)
        opt.step()
        ref.step()
    for params in (ours, theirs):
        params[0].data = params[0].data[:10]  # same address, 10 elements
        params[0].grad = torch.ones(10, device=device)
    before = snapshot(opt, ours)
    assert both_raise(opt.step, ref.step) is RuntimeError
    assert_unchanged(before, opt, ours)


@pytest.mark.parametrize(("fused_cls", "torch_cls", "kwargs"), PAIRS, ids=PAIR_IDS)
def test_data_swapped_to_a_new_tensor_of_the_same_shape_steps_it(fused_cls, torch_cls, kwargs, device):
    """``p.data = new tensor`` of the same shape (e.g. weights reloaded): the new memory is stepped."""
    ours, theirs = twins(device, [(6,), (3, 4)])
    opt, ref = fused_cls(ours, **kwargs), torch_cls(theirs, **kwargs)
    for step in range(4):
        if step == 2:
            fresh = torch.randn(3, 4, generator=torch.Generator().manual_seed(5)).to(device)
            ours[1].data, theirs[1].data = fresh.clone(), fresh.clone()
        grads = grads_for(ours, step)
        give(ours, grads)
        give(theirs, grads)
        opt.step()
        ref.step()
    check_same(opt, ref, ours, theirs)


def test_a_grad_left_from_before_a_data_swap_raises(device):
    """The grad was set before ``p.data`` changed shape: torch raises a size mismatch; the kernel
    would have walked the grad's old length over the new param."""
    ours, theirs = twins(device, [(16,)])
    opt, ref = FusedSGD(ours, lr=0.1), torch.optim.SGD(theirs, lr=0.1)
    give(ours, grads_for(ours, 0))
    give(theirs, grads_for(ours, 0))
    for params in (ours, theirs):
        params[0].data = torch.zeros(4, device=device)
    before = snapshot(opt, ours)
    assert both_raise(opt.step, ref.step) is RuntimeError
    assert_unchanged(before, opt, ours)


GRAD_DTYPES = [torch.float64, torch.bfloat16]


@pytest.mark.skipif(not hasattr(torch.Tensor, "grad_dtype"), reason="p.grad_dtype: torch >= 2.13")
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES, ids=str)
@pytest.mark.parametrize(("fused_cls", "torch_cls", "kwargs"), PAIRS, ids=PAIR_IDS)
def test_grad_of_another_dtype_gets_torchs_step(fused_cls, torch_cls, kwargs, grad_dtype, device):
    """A grad whose dtype differs from its param's (``p.grad_dtype = None``) was reinterpreted:
    fp64 grads read as fp32, bf16 grads read past their buffer. torch's own step takes such a
    param now: torch's results and state where torch steps it (SGD, Adagrad), torch's error with
    nothing changed where it refuses (Adam's lerp, centered RMSprop)."""
    ours, theirs = twins(device, [(33,), (3, 4)])
    opt, ref = fused_cls(ours, **kwargs), torch_cls(theirs, foreach=False, **kwargs)
    for step in range(3):
        grads = grads_for(ours, step)
        for params in (ours, theirs):
            params[0].grad_dtype = None
            give(params, grads)
            params[0].grad = grads[0].to(grad_dtype)
        before = snapshot(opt, ours)
        mine, expected = outcome(opt.step), outcome(ref.step)
        assert (mine and mine[0]) == (expected and expected[0]), (mine, expected)
        if mine is not None:
            assert_unchanged(before, opt, ours)
            return
        check_same(opt, ref, ours, theirs)


@pytest.mark.skipif(not hasattr(torch.Tensor, "grad_dtype"), reason="p.grad_dtype: torch >= 2.13")
def test_grad_of_another_dtype_under_grad_scaler_and_clipping(device):
    """The params torch's step takes are unscaled, clipped by the global norm and skipped on an
    inf like the others."""
    ours, theirs = twins(device, [(33,), (3, 4)])
    opt = FusedSGD(ours, lr=0.1, momentum=0.9, max_grad_norm=0.5)
    ref = torch.optim.SGD(theirs, lr=0.1, momentum=0.9)
    scale = torch.tensor(64.0, device=device)
    for step in range(3):
        grads = grads_for(ours, step)
        if step == 1:
            grads[1][0, 0] = float("inf")
        for params in (ours, theirs):
            params[0].grad_dtype = None
            give(params, grads)
            params[0].grad = grads[0].to(torch.float64)  # torch makes an fp64 buffer of it
        opt.grad_scale, opt.found_inf = scale, torch.tensor(float(step == 1), device=device)
        for p in ours:
            p.grad.mul_(64)
        opt.step()
        del opt.grad_scale, opt.found_inf
        if step != 1:
            torch.nn.utils.clip_grad_norm_(theirs, 0.5)
            ref.step()
    # The two clip coefficients (ours in fp32, torch's in fp64) differ by fp32 roundings, which
    # the fp64 buffer shows: compared to fp32 precision.
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        (a,), (b,) = opt.state[p].values(), ref.state[q].values()
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_compiled_int8_step_without_an_8bit_param(triton_device):
    """``torch.compile(opt.step)`` with ``state_dtype="int8"`` and a group with no param of >= 4096
    elements: the op never filled the absmax table and the kernel read the lr vector as a pointer
    table. Now it steps as the eager step does."""
    torch._dynamo.reset()
    device = triton_device
    specs = [(100,), (7, 3)]
    ours, eager = twins(device, specs)
    big = make(device, [(4100,)], seed=3)
    big_eager = make(device, [(4100,)], seed=3)
    opt = FusedAdam([{"params": ours}, {"params": big}], lr=0.01, state_dtype="int8")
    ref = FusedAdam([{"params": eager}, {"params": big_eager}], lr=0.01, state_dtype="int8")
    step = torch.compile(opt.step, backend="eager")
    for i in range(3):
        grads = grads_for(ours + big, i)
        give(ours + big, grads)
        give(eager + big_eager, grads)
        step()
        ref.step()
    for p, q in zip(ours + big, eager + big_eager, strict=True):
        assert torch.equal(p, q)


# State is the optimizer's state ----------------------------------------------------------------

RESETS = {
    "state[p] = {}": lambda opt, params: opt.state.__setitem__(params[0], {}),
    "state.clear()": lambda opt, params: opt.state.clear(),
    "del state[p]": lambda opt, params: opt.state.__delitem__(params[1]),
    "state[p][step] = 0": lambda opt, params: opt.state[params[0]].__setitem__(
        "step", torch.zeros((), device=params[0].device)
    ),
    "state[p][key] = zeros": lambda opt, params: opt.state[params[1]].__setitem__(
        next(k for k in opt.state[params[1]] if k != "step"), torch.zeros_like(params[1])
    ),
}


@pytest.mark.parametrize("reset", RESETS, ids=list(RESETS))
@pytest.mark.parametrize(("fused_cls", "torch_cls", "kwargs"), PAIRS, ids=PAIR_IDS)
def test_state_edited_by_hand_is_what_the_next_step_uses(fused_cls, torch_cls, kwargs, reset, device):
    """Resetting state by hand was ignored: the plan kept stepping the old tensors (kept alive)
    and ``state_dict()`` saved what the step did not use."""
    if reset == "state[p][step] = 0" and fused_cls is FusedSGD:
        pytest.skip("SGD keeps no step")
    ours, theirs = twins(device, [(5,), (3, 4)])
    opt, ref = fused_cls(ours, **kwargs), torch_cls(theirs, **kwargs)
    for step in range(5):
        if step == 3:
            RESETS[reset](opt, ours)
            RESETS[reset](ref, theirs)
        grads = grads_for(ours, step)
        give(ours, grads)
        give(theirs, grads)
        opt.step()
        ref.step()
    check_same(opt, ref, ours, theirs)


def test_no_plan_keeps_state_alive_after_clear(device):
    params = make(device, [(5,), (3, 4)])
    opt = FusedAdam(params, lr=0.01)
    give(params, grads_for(params, 0))
    opt.step()
    dropped = weakref.ref(opt.state[params[1]]["exp_avg"])
    opt.state.clear()
    gc.collect()
    assert dropped() is None, "a plan still holds the cleared state"


def test_sgd_momentum_buffer_none_is_a_new_buffer(device):
    """State ``momentum_buffer: None`` (written by older torch, accepted by torch) was stepped with
    the param itself as the buffer."""
    ours, theirs = twins(device, [(5,), (3, 4)])
    kwargs = dict(lr=0.1, momentum=0.9, dampening=0.3)
    opt, ref = FusedSGD(ours, **kwargs), torch.optim.SGD(theirs, **kwargs)
    sd = ref.state_dict()
    sd["state"] = {0: {"momentum_buffer": None}, 1: {"momentum_buffer": None}}
    opt.load_state_dict(sd)
    ref.load_state_dict(sd)
    for step in range(3):
        grads = grads_for(ours, step)
        give(ours, grads)
        give(theirs, grads)
        opt.step()
        ref.step()
    check_same(opt, ref, ours, theirs)


def test_grad_scaler_skipped_first_sgd_step_resumes_as_torch(device):
    """A GradScaler-skipped first step left a zero momentum buffer where torch has none; a
    checkpoint taken then resumed as a buffer that took a step (dampening applied to zero)."""
    kwargs = dict(lr=0.1, momentum=0.9, dampening=0.5)
    ours, theirs = twins(device, [(5,), (3, 4)])
    opt, ref = FusedSGD(ours, **kwargs), torch.optim.SGD(theirs, **kwargs)
    grads = grads_for(ours, 0)
    give(ours, grads)
    opt.grad_scale, opt.found_inf = torch.ones((), device=device), torch.ones((), device=device)
    opt.step()  # skipped: GradScaler found an inf (torch's own GradScaler skips torch's step)
    del opt.grad_scale, opt.found_inf
    sd = roundtrip(opt.state_dict())
    assert sd["state"] == ref.state_dict()["state"] == {}
    resumed, again = twins(device, [(5,), (3, 4)])
    for params in (resumed, again):
        for p, q in zip(params, ours, strict=True):
            p.data.copy_(q)
    opt2, ref2 = FusedSGD(resumed, **kwargs), torch.optim.SGD(again, **kwargs)
    opt2.load_state_dict(sd)
    ref2.load_state_dict(roundtrip(ref.state_dict()))
    for step in range(1, 4):
        grads = grads_for(resumed, step)
        give(resumed, grads)
        give(again, grads)
        opt2.step()
        ref2.step()
    check_same(opt2, ref2, resumed, again)


def test_master_weights_through_torch_and_back(triton_device):
    """A ``master_weights=True`` state dict loaded by ``torch.optim.Adam`` (which casts the master to
    bf16 and keeps it while stepping the param) and back into FusedAdam: the bf16 master was read
    and written as fp32 (heap abort), and the stale master discarded torch's steps. Now the master
    is re-seeded from the param, which is what torch trained."""
    device = triton_device
    (p,) = make(device, [((4000,), torch.bfloat16)])
    opt = FusedAdam([p], lr=0.01, master_weights=True)
    give([p], grads_for([p], 0))
    opt.step()
    q = p.detach().clone().requires_grad_()
    torch_opt = torch.optim.Adam([q], lr=0.01)
    torch_opt.load_state_dict(roundtrip(opt.state_dict()))
    assert torch_opt.state[q]["master_weight"].dtype == torch.bfloat16  # torch's cast
    for step in (1, 2):
        give([q], grads_for([q], step))
        torch_opt.step()
    r = q.detach().clone().requires_grad_()
    back = FusedAdam([r], lr=0.01, master_weights=True)
    back.load_state_dict(roundtrip(torch_opt.state_dict()))
    master = back.state[r]["master_weight"]
    assert master.dtype == F32 and torch.equal(master, r.detach().float())
    twin = r.detach().clone().requires_grad_()
    oracle = FusedAdam([twin], lr=0.01, master_weights=True)
    sd = roundtrip(torch_opt.state_dict())
    del sd["state"][0]["master_weight"]  # an absent master is made from the param
    oracle.load_state_dict(sd)
    for step in (3, 4):
        give([r], grads_for([r], step))
        give([twin], grads_for([r], step))
        back.step()
        oracle.step()
    assert torch.equal(r, twin)
    assert torch.equal(back.state[r]["master_weight"], oracle.state[twin]["master_weight"])


def test_master_dropped_by_hand_is_reseeded_from_an_edited_param(triton_device):
    """The documented way to keep an in-place edit of a bf16 param with master weights."""
    device = triton_device
    (p,) = make(device, [((64,), torch.bfloat16)])
    opt = FusedAdam([p], lr=0.01, master_weights=True)
    give([p], grads_for([p], 0))
    opt.step()
    with torch.no_grad():
        p.mul_(0.5)
    del opt.state[p]["master_weight"]
    edited = p.detach().clone()
    opt.step()
    assert torch.allclose(p.float(), edited.float(), atol=0.05)  # one step from the edit


def test_load_state_dict_keeps_keys_that_are_not_params(device):
    """torch keeps a non-param key of a state dict's ``state``; FusedAdam raised AttributeError."""
    params = make(device, [(4,)])
    opt = FusedAdam(params, lr=0.01)
    give(params, grads_for(params, 0))
    opt.step()
    sd = opt.state_dict()
    sd["state"]["ema"] = {"decay": 0.99}
    opt.load_state_dict(sd)
    opt.step()
    assert opt.state_dict()["state"]["ema"] == {"decay": 0.99}
    assert opt.torch_state_dict()["state"]["ema"] == {"decay": 0.99}


# Errors where torch works, or worse errors -----------------------------------------------------


@pytest.mark.parametrize(("fused_cls", "torch_cls", "kwargs"), PAIRS, ids=PAIR_IDS)
def test_meta_params_step_as_torch(fused_cls, torch_cls, kwargs):
    """Params on the ``meta`` device (shape-only models): torch steps them; FusedAdam read a
    meta step counter on the host."""
    ours = [torch.nn.Parameter(torch.empty(4, 3, device="meta"))]
    theirs = [torch.nn.Parameter(torch.empty(4, 3, device="meta"))]
    for p in ours + theirs:
        p.grad = torch.empty(4, 3, device="meta")
    opt, ref = fused_cls(ours, **kwargs), torch_cls(theirs, **kwargs)
    for _ in range(2):
        opt.step()
        ref.step()
    assert opt.state[ours[0]].keys() == ref.state[theirs[0]].keys()
    for key, v in ref.state[theirs[0]].items():
        w = opt.state[ours[0]][key]
        assert (w.device, w.dtype, w.shape) == (v.device, v.dtype, v.shape), key


def test_max_grad_norm_as_a_tensor(device):
    """``max_grad_norm=torch.tensor(1.0)`` was refused as 'Invalid max_grad_norm value: 1.0'."""
    ours, theirs = twins(device, [(5,), (3, 4)])
    opt = FusedSGD(ours, lr=0.1, max_grad_norm=torch.tensor(0.5))
    ref = torch.optim.SGD(theirs, lr=0.1)
    grads = grads_for(ours, 0)
    give(ours, grads)
    give(theirs, grads)
    opt.step()
    torch.nn.utils.clip_grad_norm_(theirs, 0.5)
    ref.step()
    check_same(opt, ref, ours, theirs)
    for bad in (torch.tensor([1.0, 2.0]), torch.tensor(-1.0), True):
        with pytest.raises(ValueError, match="Invalid max_grad_norm"):
            FusedSGD(ours, lr=0.1, max_grad_norm=bad)


@pytest.mark.parametrize(
    ("fused_cls", "torch_cls"),
    [(FusedAdam, torch.optim.Adam), (FusedAdamW, torch.optim.AdamW), (FusedRMSprop, torch.optim.RMSprop)],
    ids=["FusedAdam", "FusedAdamW", "FusedRMSprop"],
)
def test_capturable_on_cpu_refused(fused_cls, torch_cls):
    """``capturable=True`` on CPU was accepted where torch refuses it (AssertionError at the step);
    ours refuses before creating any state."""
    ours, theirs = twins("cpu", [(5,)])
    opt, ref = fused_cls(ours, lr=0.01, capturable=True), torch_cls(theirs, lr=0.01, capturable=True)
    give(ours, grads_for(ours, 0))
    give(theirs, grads_for(ours, 0))
    mine, expected = outcome(opt.step), outcome(ref.step)
    assert mine == expected and mine[0] is AssertionError
    assert not opt.state


def test_clip_grad_norm_of_complex_grads(device):
    """``fusedopt.clip_grad_norm_`` on complex grads raised NotImplementedError (clamp)."""
    ours, theirs = twins(device, [((5,), torch.complex64), (3, 4)])
    grads = grads_for(ours, 0)
    give(ours, grads)
    give(theirs, grads)
    mine = fusedopt.clip_grad_norm_(ours, 0.5)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 0.5)
    close(mine, expected, "total norm")
    for p, q in zip(ours, theirs, strict=True):
        close(p.grad, q.grad, "clipped grad")


# Races a GPU would have: overlapping params and state ------------------------------------------


@pytest.mark.parametrize(("fused_cls", "torch_cls", "kwargs"), PAIRS, ids=PAIR_IDS)
def test_overlapping_params_are_stepped_in_order(fused_cls, torch_cls, kwargs, triton_device, launches):
    """Params that are overlapping views of one tensor passed on CPU only because the interpreter
    runs blocks in order; a GPU launch would race. They are launched in layers now, one after
    the other, which is torch's order, in one launch per layer."""
    device = triton_device
    base = torch.randn(40, generator=torch.Generator().manual_seed(0)).to(device)
    ours = [torch.nn.Parameter(base[:30].clone()), torch.nn.Parameter(torch.randn(3, device=device))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for params in (ours, theirs):  # a second param: a view of the first (overlapping 20..29)
        params.append(torch.nn.Parameter(params[0].data[10:]))
    opt, ref = fused_cls(ours, **kwargs), torch_cls(theirs, foreach=False, **kwargs)
    for step in range(3):
        grads = grads_for(ours, step)
        give(ours, grads)
        give(theirs, grads)
        opt.step()
        ref.step()
    check_same(opt, ref, ours, theirs)
    assert len(launches) == 2 * 3


def test_layers_of_overlapping_memory():
    base = torch.zeros(100)
    a, b, c, d = base[:50], base[40:60], base[60:], torch.zeros(3)
    assert _plan.layers([[a], [b], [c], [d]]) == [0, 1, 0, 0]
    assert _plan.layers([[a], [a], [a]]) == [0, 1, 2]
    assert _plan.layers([[base[::2]], [c]]) == [0, 1]  # spans are conservative
    assert _plan.overlapping([a, d, b]) == (0, 2)
    assert _plan.overlapping([a, c, d]) is None


def test_state_sharing_memory_with_its_param_raises(device):
    """A state tensor that is (a view of) its own param: torch's in-place ops would refuse to
    write it; the kernel would read and write the same memory as two operands."""
    ours = make(device, [(6,)])
    opt = FusedAdam(ours, lr=0.01)
    give(ours, grads_for(ours, 0))
    opt.step()
    opt.state[ours[0]]["exp_avg_sq"] = opt.state[ours[0]]["exp_avg"]
    before = snapshot(opt, ours)
    with pytest.raises(RuntimeError, match="share memory"):
        opt.step()
    assert_unchanged(before, opt, ours)


def test_state_of_the_wrong_dtype_or_device_raises_like_torch(device):
    ours, theirs = twins(device, [(6,)])
    opt, ref = FusedAdam(ours, lr=0.01), torch.optim.Adam(theirs, lr=0.01)
    for step in range(2):
        grads = grads_for(ours, step)
        give(ours, grads)
        give(theirs, grads)
        opt.step()
        ref.step()
    for o, p in ((opt, ours[0]), (ref, theirs[0])):
        o.state[p]["exp_avg"] = o.state[p]["exp_avg"].double()
    before = snapshot(opt, ours)
    assert both_raise(opt.step, ref.step) is RuntimeError
    assert_unchanged(before, opt, ours)
    for o, p in ((opt, ours[0]), (ref, theirs[0])):
        o.state[p]["exp_avg"] = torch.zeros(6, device="meta")
        o.state[p]["step"] = 3.0
    assert both_raise(opt.step, ref.step) is RuntimeError


def test_pickled_optimizer_state_is_torchs():
    """``optimizer.state`` pickles and loads as torch's ``defaultdict(dict)``."""
    import pickle
    from collections import defaultdict

    params = make("cpu", [(4,)])
    opt = FusedSGD(params, lr=0.1, momentum=0.9)
    give(params, grads_for(params, 0))
    opt.step()
    state = pickle.loads(pickle.dumps(opt.state))
    assert type(state) is defaultdict and all(type(v) is dict for v in state.values())
    assert type(opt.state_dict()["state"][0]) is dict


# Found by the differential fuzzer (tests/test_fuzz.py), not on the list ------------------


def test_amsgrad_keeps_a_nan_in_its_max_as_torch(device):
    """torch's ``max_exp_avg_sq = maximum(max_exp_avg_sq, exp_avg_sq)`` keeps a NaN; the kernel
    kept the old maximum (a NaN grad left a finite max where torch's is NaN)."""
    ours, theirs = twins(device, [(5,)])
    opt, ref = FusedAdam(ours, lr=0.01, amsgrad=True), torch.optim.Adam(theirs, lr=0.01, amsgrad=True)
    for step in range(3):
        grads = grads_for(ours, step)
        if step == 1:
            grads[0][2] = float("nan")
        give(ours, grads)
        give(theirs, grads)
        opt.step()
        ref.step()
    assert ref.state[theirs[0]]["max_exp_avg_sq"][2].isnan()
    check_same(opt, ref, ours, theirs)


def test_kahan_compensation_of_an_infinite_param_stays_zero(triton_device):
    """A bf16 param element that became +-inf had a NaN compensation (inf - inf) and turned NaN at
    the next step, where torch's fp32 param stays +-inf."""
    (p,) = make(triton_device, [((6,), torch.bfloat16)])
    opt = FusedAdam([p], lr=0.01, kahan_summation=True)
    with torch.no_grad():
        p[1] = float("inf")
        p[3] = -float("inf")
    for step in range(2):
        give([p], grads_for([p], step))
        opt.step()
        assert p[1] == float("inf") and p[3] == -float("inf"), f"step {step}: {p}"
        assert opt.state[p]["kahan_compensation"][[1, 3]].eq(0).all()


@pytest.mark.parametrize(
    "options", [dict(state_dtype=torch.float32), dict(master_weights=True)], ids=["state_fp32", "master"]
)
def test_adagrad_sum_is_made_in_its_state_dtype_from_the_exact_value(options, device):
    """FusedAdagrad's ``sum`` (made by torch's constructor) stayed in the param's dtype until the
    first step, and started from bf16(initial_accumulator_value) with fp32 state."""
    (p,) = make(device, [((8,), torch.bfloat16)])
    opt = FusedAdagrad([p], lr=0.1, initial_accumulator_value=0.1, **options)
    total = opt.state_dict()["state"][0]["sum"]
    assert total.dtype == F32 and torch.equal(total, torch.full((8,), 0.1))
    q = torch.nn.Parameter(p.detach().float())
    ref = torch.optim.Adagrad([q], lr=0.1, initial_accumulator_value=0.1)
    give([p], grads_for([p], 0))
    give([q], [p.grad.float()])
    opt.step()
    ref.step()
    torch.testing.assert_close(opt.state[p]["sum"], ref.state[q]["sum"], rtol=0, atol=0)


def test_a_master_holding_nan_is_still_its_params_master(triton_device):
    """A NaN master was never "the param's master" (torch.equal), so it was re-seeded from the
    bf16 param when a plan was built: the fp32 values torch would hold were lost."""
    device = triton_device
    pair = [make(device, [((6,), torch.bfloat16)])[0] for _ in range(2)]
    opts = [FusedAdam([p], lr=0.01, master_weights=True) for p in pair]
    for p, opt in zip(pair, opts, strict=True):
        give([p], grads_for([p], 0))
        opt.step()
    with torch.no_grad():  # element 0 diverged in one of the two; elements are independent
        opts[0].state[pair[0]]["master_weight"][0] = float("nan")
        pair[0][0] = float("nan")
    for p, opt in zip(pair, opts, strict=True):
        opt.state[p]["master_weight"] = opt.state[p]["master_weight"].clone()  # a new plan
        give([p], grads_for([p], 1))
        opt.step()
    masters = [opt.state[p]["master_weight"] for p, opt in zip(pair, opts, strict=True)]
    assert masters[0][0].isnan()
    assert torch.equal(masters[0][1:], masters[1][1:])
    assert not torch.equal(masters[1], pair[1].float())  # fp32 values the param does not hold


@pytest.mark.parametrize(
    ("specs", "missing"), [([(6,)], 0), ([(6,), (4,)], 1)], ids=["same_param", "later_param"]
)
def test_a_missing_key_raises_key_error_before_a_size_error(specs, missing, device):
    """Two problems at once (the first param's state tensor of the wrong size, a state key
    deleted from it or from a later param's state): torch raises KeyError (it gathers the state
    of every param of a group before any math); fusedopt raised RuntimeError (the later param:
    it checked param by param, found by the fuzzer)."""
    ours, theirs = twins(device, specs)
    opt, ref = FusedAdam(ours, lr=0.01), torch.optim.Adam(theirs, lr=0.01)
    for o, params in ((opt, ours), (ref, theirs)):
        give(params, grads_for(params, 0))
        o.step()
        o.state[params[0]]["exp_avg"] = torch.zeros(3, device=device)
        del o.state[params[missing]]["exp_avg_sq"]
        give(params, grads_for(params, 1))
    snap = snapshot(opt, ours)
    assert both_raise(opt.step, ref.step) is KeyError
    assert_unchanged(snap, opt, ours)


def test_torch_state_dict_of_an_8bit_sgd_with_a_none_buffer(device):
    """``torch_state_dict()`` raised AttributeError for an 8-bit momentum_buffer of None (older
    torch's format) left beside its absmax."""
    (p,) = make(device, [(4096,)])
    opt = FusedSGD([p], lr=0.1, momentum=0.9, state_dtype="int8")
    give([p], grads_for([p], 0))
    opt.step()
    opt.state[p]["momentum_buffer"] = None
    sd = opt.torch_state_dict()
    assert sd["state"][0]["momentum_buffer"] is None
    q = torch.nn.Parameter(p.detach().clone())
    ref = torch.optim.SGD([q], lr=0.1, momentum=0.9)
    ref.load_state_dict(sd)
    give([p], grads_for([p], 1))
    give([q], grads_for([q], 1))
    opt.step()
    ref.step()  # a None buffer is a new one, in both
    torch.testing.assert_close(p, q)


@pytest.mark.parametrize("special", ["inf", "-inf", "nan"])
def test_8bit_state_of_a_non_finite_value_is_the_torch_quantizers(special, triton_device):
    """The kernel's quantizer stored +inf as -inf and a NaN as a finite code (the NaN left out of
    its block's absmax); torch's quantizer (the plain-torch path's and the tests' oracle) gives a
    NaN block. Both now keep the infinity's sign and poison the block (docs/low-precision.md)."""
    from fusedopt.optim import _quantize

    (p,) = make(triton_device, [(4096,)])
    q = torch.nn.Parameter(p.detach().clone())
    opt = FusedSGD([p], lr=0.1, momentum=0.9, state_dtype="int8")
    ref = torch.optim.SGD([q], lr=0.1, momentum=0.9)
    (g,) = grads_for([p], 0)
    g[5] = float(special)
    give([p], [g])
    give([q], [g])
    opt.step()
    ref.step()
    codes, absmax = _quantize.quantize(ref.state[q]["momentum_buffer"], q, True)
    assert torch.equal(opt.state[p]["momentum_buffer"].cpu(), codes.cpu())
    assert torch.equal(opt.state[p]["momentum_buffer_absmax"].cpu().nan_to_num(7), absmax.cpu().nan_to_num(7))
    value = _quantize.dequantize(codes, absmax, True)[5]
    assert value.isnan() if special == "nan" else value == float(special)


@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
def test_fp64_params_with_an_fp32_tensor_lr_step_as_torchs_fused(cls, device):
    """torch's for-loop step rounds the scalars it derives from an fp32 tensor lr (Adam's step
    size, AdamW's decay factor) to fp32, its fused step does not: fusedopt is torch's
    ``fused=True``, exactly (docs/options.md)."""
    ours, theirs = twins(device, [((7,), torch.float64)])
    lr = dict(lr=torch.tensor(0.0123), weight_decay=0.1)
    opt = getattr(fusedopt, "Fused" + cls)(ours, **lr)
    ref = getattr(torch.optim, cls)(theirs, fused=True, **lr)
    for step in range(3):
        give(ours, grads_for(ours, step))
        give(theirs, grads_for(theirs, step))
        opt.step()
        ref.step()
    assert torch.equal(ours[0], theirs[0])


@pytest.mark.skipif(not hasattr(torch.Tensor, "grad_dtype"), reason="p.grad_dtype: torch >= 2.13")
@pytest.mark.parametrize(
    "options",
    [dict(state_dtype=torch.bfloat16), dict(state_dtype="int8"), dict(master_weights=True)],
    ids=["state_bf16", "int8", "master"],
)
def test_a_grad_of_another_dtype_with_a_low_precision_option_is_refused(options, device):
    """torch's own step (which takes a param whose grad has another dtype) keeps none of the
    low-precision options: it stepped the bf16 state in bf16 math, the 8-bit codes as numbers,
    where the fp32 twin raises. Now refused, nothing changed (found by the fuzzer)."""
    (p,) = make(device, [(4096,)])
    opt = FusedAdam([p], lr=0.01, **options)
    give([p], grads_for([p], 0))
    opt.step()
    p.grad_dtype = None
    p.grad = grads_for([p], 1)[0].to(torch.bfloat16)
    snap = snapshot(opt, [p])
    with pytest.raises(RuntimeError, match=r"param 0 has a grad of dtype torch\.bfloat16"):
        opt.step()
    assert_unchanged(snap, opt, [p])


@pytest.mark.skipif(not hasattr(torch.Tensor, "grad_dtype"), reason="p.grad_dtype: torch >= 2.13")
def test_a_refused_torch_step_keeps_the_state_of_cached_plans(device):
    """A step torch's own path refuses (an fp32 grad of an fp64 Adam param) removed the state of
    every param whose cached plan had once created it: params of other groups lost their
    state (found by the fuzzer)."""
    params = make(device, [((3, 4), torch.float64)] * 3)
    opt = FusedAdam([{"params": params[:1]}, {"params": params[1:], "lr": 0.02}], lr=0.01)
    for p in params:
        p.grad_dtype = None
    give(params, grads_for(params, 0))
    opt.step()
    params[0].grad = grads_for(params[:1], 1)[0].float()
    snap = snapshot(opt, params)
    with pytest.raises(RuntimeError, match="expected dtype double"):
        opt.step()
    assert_unchanged(snap, opt, params)


def test_a_state_dict_of_another_dtype_loads_cast_as_torchs(device):
    """Without low-precision options, torch's load_state_dict casts state to the param's dtype;
    fusedopt kept the fp64 state of another model's (5,) param for an fp32 (3, 4) param: a
    state_dict() then differed from torch's (found by the fuzzer). Both refuse the step."""
    (src,) = make(device, [((5,), torch.float64)])
    source = torch.optim.Adam([src], lr=0.01)
    give([src], grads_for([src], 0))
    source.step()
    ours, theirs = twins(device, [(3, 4)])
    opt, ref = FusedAdam(ours, lr=0.01), torch.optim.Adam(theirs, lr=0.01)
    opt.load_state_dict(roundtrip(source.state_dict()))
    ref.load_state_dict(roundtrip(source.state_dict()))
    for key in ("exp_avg", "exp_avg_sq"):
        assert opt.state[ours[0]][key].dtype == ref.state[theirs[0]][key].dtype == F32
        assert torch.equal(opt.state[ours[0]][key], ref.state[theirs[0]][key])
    give(ours, grads_for(ours, 1))
    give(theirs, grads_for(theirs, 1))
    assert both_raise(opt.step, ref.step) is RuntimeError


@pytest.mark.parametrize("scaler", [False, True], ids=["plain", "grad_scaler"])
def test_a_grad_left_from_before_a_dtype_swap_steps_as_torch(scaler, device):
    """``p.data`` swapped to fp64 with the fp32 grad and state of before: torch steps it (its
    in-place ops accept the mix); fusedopt's torch step put the grad back with ``p.grad = g``,
    which torch's setter refuses for a grad of another dtype than the param's (found by the
    fuzzer). The grad is left as it was."""
    ours, theirs = twins(device, [(3, 4)])
    opt, ref = FusedAdam(ours, lr=0.01), torch.optim.Adam(theirs, lr=0.01)
    scalers = [torch.amp.GradScaler(device, init_scale=4.0) for _ in range(2)] if scaler else None
    for o, params in ((opt, ours), (ref, theirs)):
        give(params, grads_for(params, 0))
        o.step()
        params[0].data = params[0].data.double()
    for i, (o, params) in enumerate(((opt, ours), (ref, theirs))):
        grad = params[0].grad
        kept = grad.clone()
        if scaler:
            scalers[i].scale(torch.ones((), device=device))  # (the scale a loss would get)
            grad.mul_(4.0)
            scalers[i].step(o)
            scalers[i].update()
        else:
            o.step()
        assert params[0].grad is grad and params[0].grad.dtype == F32
        if not scaler:
            assert torch.equal(grad, kept)
    check_same(opt, ref, ours, theirs)
