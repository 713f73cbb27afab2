"""FusedLion: against its plain-torch reference (``fusedopt.optim.lion.Lion``, every case of
``OPTIM_CASES``), against the ``lion-pytorch`` package where it is installed (bit for bit in
fp32), its constructor and refusals. The contract every fused optimizer keeps (state_dict,
schedulers, closures, groups, GradScaler, torch.compile, launch counts) is tested with the
others': test_optim_api.py, test_torch_compile_optim.py, test_multi_tensor.py."""

from __future__ import annotations

import inspect

import pytest
import torch
from helpers import (
    DTYPES,
    F32,
    assert_unchanged,
    give,
    grads_for,
    make,
    outcome,
    parity_params,
    parity_tests,
    roundtrip,
    run_parity,
    snapshot,
    sparse_grad,
    step_both,
)

from fusedopt import FusedLion
from fusedopt.optim._fused import EXTENSIONS
from fusedopt.optim.lion import Lion
from fusedopt.testing import OPTIM_CASES, leaves

CASES = [c for c in OPTIM_CASES if c.group == "lion"]
# The low-precision options on the dtypes they change (fp64 params step as without them).
PLAIN = [c for c in CASES if not EXTENSIONS & c.kwargs.keys() - {"max_grad_norm"}]
OPTIONS = [c for c in CASES if c not in PLAIN]
KWARGS = dict(lr=0.01, betas=(0.8, 0.95), weight_decay=0.1)


@pytest.mark.parametrize(
    ("case", "dtype"), parity_params(PLAIN, DTYPES) + parity_params(OPTIONS, [torch.float32, torch.bfloat16])
)
def test_lion_matches_the_reference(case, dtype, device):
    run_parity(case, device, dtype)


# Without the interpreter: the reference on working copies (fp32, bf16).
_, test_cpu_path_matches_the_reference = parity_tests("lion")


def _lion_pytorch():
    return pytest.importorskip("lion_pytorch", reason="the lion-pytorch package is not installed").Lion


@pytest.mark.parametrize("path", ["kernel", "cpu"])
def test_bit_for_bit_with_lion_pytorch(path, device, request):
    """fp32: the package's results exactly, the kernel's (through the interpreter on CPU) and
    the CPU path's; its state dict loads into FusedLion and FusedLion's into it."""
    reference = _lion_pytorch()
    if path == "cpu":
        if device != "cpu":
            pytest.skip("the CPU path")
        request.getfixturevalue("plain_cpu")
    ours, theirs = make(device, [(3, 4), (5,), (), (4097,)]), make(device, [(3, 4), (5,), (), (4097,)])
    opt, ref = FusedLion(ours, **KWARGS), reference(theirs, **KWARGS)
    for step in range(5):
        step_both(opt, ref, ours, theirs, step)
        for p, q in zip(ours, theirs, strict=True):
            assert torch.equal(p, q), f"step {step}"
            assert torch.equal(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"]), f"step {step}"
    mine, expected = opt.state_dict(), ref.state_dict()
    assert {i: list(s) for i, s in mine["state"].items()} == {
        i: list(s) for i, s in expected["state"].items()
    }
    assert [{**g, "maximize": False} for g in expected["param_groups"]] == mine["param_groups"]
    a, b = leaves(ours), leaves(theirs)
    mine, theirs_again = FusedLion(a, **KWARGS), reference(b, **KWARGS)
    mine.load_state_dict(roundtrip(ref.state_dict()))
    theirs_again.load_state_dict(roundtrip(opt.state_dict()))
    for step in range(5, 8):
        step_both(mine, theirs_again, a, b, step)
        for p, q in zip(a, b, strict=True):
            assert torch.equal(p, q), f"step {step}"


def test_signature_defaults_and_validation():
    params = list(inspect.signature(FusedLion).parameters)
    assert params == [
        "params", "lr", "betas", "weight_decay", "maximize",
        "max_grad_norm", "master_weights", "kahan_summation", "stochastic_rounding", "state_dtype",
    ]  # fmt: skip
    opt = FusedLion(make("cpu", [(2,)]))
    assert opt.defaults == dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False)
    assert opt.param_groups[0].keys() == {"params", *opt.defaults}
    for kwargs, message in [
        (dict(lr=-0.1), "Invalid learning rate: -0.1"),
        (dict(betas=(1.5, 0.9)), "Invalid beta parameter at index 0: 1.5"),
        (dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1: -0.1"),
        (dict(weight_decay=-1.0), "Invalid weight_decay value: -1.0"),
        (dict(lr=torch.tensor([0.1, 0.2])), "Tensor lr must be 1-element"),
    ]:
        assert outcome(lambda kwargs=kwargs: FusedLion(make("cpu"), **kwargs)) == (ValueError, message)
        assert outcome(lambda kwargs=kwargs: Lion(make("cpu"), **kwargs)) == (ValueError, message)
    assert outcome(lambda: FusedLion([], lr=0.1)) == outcome(lambda: torch.optim.SGD([], lr=0.1))
    assert outcome(lambda: FusedLion(torch.zeros(3))) == outcome(lambda: torch.optim.SGD(torch.zeros(3)))
    with pytest.raises(TypeError):
        FusedLion(make("cpu"), foreach=True)  # no speed hint to ignore


def test_refusals_change_nothing(device):
    """Sparse grads (the reference's message) and integer params raise before any change."""
    ours = make(device, [(4, 3), (2,)])
    opt = FusedLion(ours, lr=0.1)
    give(ours, [sparse_grad(ours[0], 0), torch.ones(2, device=device)])
    before = snapshot(opt, ours)
    assert outcome(opt.step) == (RuntimeError, "Lion does not support sparse gradients")
    assert_unchanged(before, opt, ours)
    ints = make(device, [(3,), ((4,), torch.int64)])
    opt = FusedLion(ints, lr=0.1)
    give(ints, grads_for(ints, 0))
    with pytest.raises(NotImplementedError):
        opt.step()
    assert not opt.state


def test_stochastic_rounding_follows_the_fp32_run(triton_device):
    """bf16 params with stochastic rounding stay near the fp32 run where plain bf16 stalls
    (an update of lr = 1e-4 is below half a bf16 step of values near 1)."""
    start = torch.linspace(1.0, 2.0, 2048)
    runs = {}
    for name, dtype, kwargs in [("fp32", F32, {}), ("sr", torch.bfloat16, dict(stochastic_rounding=True)),
                                ("plain", torch.bfloat16, {})]:  # fmt: skip
        p = start.to(triton_device, dtype, copy=True).requires_grad_()
        opt = FusedLion([p], lr=1e-4, **kwargs)
        torch.manual_seed(0)
        for _ in range(10):
            p.grad = torch.ones_like(p)
            opt.step()
        runs[name] = p.detach().float().cpu()
    exact = start.to(torch.bfloat16).float() - 10 * 1e-4
    assert torch.equal(runs["plain"], start.to(torch.bfloat16).float()), "plain bf16 stalls"
    assert (runs["sr"].mean() - exact.mean()).abs() < 2e-4
    assert (runs["fp32"] - (start - 10 * 1e-4)).abs().max() < 1e-5
