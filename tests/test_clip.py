"""Fused global-norm clipping: ``fusedopt.clip_grad_norm_`` against torch.nn.utils', and the
optimizers' ``max_grad_norm`` against torch's clip-then-step (with and without GradScaler)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import (
    CountOps,
    assert_unchanged,
    case_id,
    check_same,
    close,
    grads_for,
    kernel_name,
    make,
    optimizer_kernels,
    record_launches,
    snapshot,
)
from torch import nn

import fusedopt
from fusedopt.kernels import clip as clip_kernels
from fusedopt.optim._amp import find_inf
from fusedopt.testing import OptimCase
from fusedopt.tolerance import OPTIM_TOLERANCE, allowed_error

# The interpreter evaluates log2(0) (the p-norm of a zero) and inf * 0 through numpy, which warns.
pytestmark = pytest.mark.filterwarnings(
    "ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning"
)

NORM_TYPES = [2.0, 1.0, math.inf, 3.5, 0.5]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
# 0-d, empty, one block and a ragged tail, a transposed (dense) grad, a strided slice (not dense).
SHAPES = [(), (0,), (4097,), (3, 5)]


@pytest.fixture
def clip_launches(monkeypatch):
    return record_launches(
        monkeypatch,
        {
            "partials": clip_kernels.norm_partials_kernel,
            "finish": clip_kernels.norm_finish_kernel,
            "scale": clip_kernels.scale_kernel,
            **optimizer_kernels(),
        },
    )


def _grads(device: str, dtype: torch.dtype, scale: float = 1.0, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = [(torch.randn(s, generator=gen) * scale).to(device, dtype) for s in SHAPES]
    out.append((torch.randn(5, 3, generator=gen) * scale).to(device, dtype).t())  # transposed
    out.append((torch.randn(6, 4, generator=gen) * scale).to(device, dtype)[::2, 1:])  # strided
    return out


def _same_layout(g: torch.Tensor) -> torch.Tensor:
    """A copy of ``g`` with its strides, a strided slice staying a strided slice."""
    if g.dim() == 2 and not g.is_contiguous() and not g.t().is_contiguous():
        base = torch.zeros(2 * g.shape[0], g.shape[1] + 1, device=g.device, dtype=g.dtype)
        return base[::2, 1:].copy_(g)
    return g.clone()


def _params_with(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    params = []
    for g in grads:
        p = torch.zeros(g.shape, device=g.device, dtype=g.dtype, requires_grad=True)
        p.grad = _same_layout(g)
        params.append(p)
    return params


def _both(grads):
    return _params_with(grads), _params_with(grads)


def _assert_matches(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    a, e = actual.double(), expected.double()
    finite = torch.isfinite(e)
    assert torch.equal(torch.isnan(a), torch.isnan(e)), what
    assert torch.equal(a[torch.isinf(e)], e[torch.isinf(e)]), what
    # The norm sums in another order than torch (and in fp32 for bf16): a few roundings apart.
    err = (a[finite] - e[finite]).abs()
    assert bool((err <= 4 * allowed_error(expected[finite], expected.dtype, OPTIM_TOLERANCE)).all()), (
        f"{what}: max error {err.max() if err.numel() else 0}"
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=str)
def test_clip_grad_norm_matches_torch(norm_type, dtype, triton_device, clip_launches):
    grads = _grads(triton_device, dtype, scale=3.0)
    if norm_type == math.inf:  # torch refuses the infinity norm of an empty tensor; so do we
        grads.pop(1)
    ours, theirs = _both(grads)
    total = fusedopt.clip_grad_norm_(ours, max_norm=1.0, norm_type=norm_type)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm=1.0, norm_type=norm_type)
    _assert_matches(total, expected, "total norm")
    for p, q in zip(ours, theirs, strict=True):
        _assert_matches(p.grad, q.grad, "clipped grad")
    counts = clip_launches.counts
    assert counts["partials"] == counts["scale"] == 1 and counts["finish"] == 1, counts


def test_clip_below_max_norm_leaves_grads_and_accepts_a_single_tensor(triton_device):
    (p,) = _params_with([torch.full((10,), 0.1, device=triton_device)])
    before = p.grad.clone()
    total = fusedopt.clip_grad_norm_(p, max_norm=5.0)
    torch.testing.assert_close(total, torch.linalg.vector_norm(before))
    # coef = 5 / (norm + 1e-6) clamped to 1: the grads are multiplied by exactly 1.
    assert torch.equal(p.grad, before)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 3.0])
def test_non_finite_grads_match_torch(bad, norm_type, triton_device):
    grads = [g for g in _grads(triton_device, torch.float32) if g.numel()]
    grads[1][7] = bad
    ours, theirs = _both(grads)
    total = fusedopt.clip_grad_norm_(ours, 1.0, norm_type)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
    _assert_matches(total, expected, "total norm")
    for p, q in zip(ours, theirs, strict=True):
        _assert_matches(p.grad, q.grad, "grad")


def test_error_if_nonfinite_raises_like_torch_and_changes_nothing(triton_device):
    grads = _grads(triton_device, torch.float32)
    grads[2][0] = math.nan
    ours, theirs = _both(grads)
    before = [p.grad.clone() for p in ours]
    with pytest.raises(RuntimeError) as mine:
        fusedopt.clip_grad_norm_(ours, 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError) as torchs:
        torch.nn.utils.clip_grad_norm_(theirs, 1.0, error_if_nonfinite=True)
    assert str(mine.value) == str(torchs.value)
    for p, b in zip(ours, before, strict=True):
        torch.testing.assert_close(p.grad, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("norm_type", [0.0, -math.inf, -1.0])
def test_other_orders_and_foreach_flags_run_torch(norm_type, triton_device, clip_launches):
    ours, theirs = _both([g for g in _grads(triton_device, torch.float32) if g.numel()])
    total = fusedopt.clip_grad_norm_(ours, 1.0, norm_type)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
    torch.testing.assert_close(total, expected)
    ours, theirs = _both(_grads(triton_device, torch.float32))
    torch.testing.assert_close(
        fusedopt.clip_grad_norm_(ours, 1.0, foreach=False), torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    )
    assert not clip_launches


def test_infinity_norm_of_an_empty_grad_raises_like_torch(triton_device):
    ours, theirs = _both(_grads(triton_device, torch.float32))
    outcomes = []
    for clip, params in ((fusedopt.clip_grad_norm_, ours), (torch.nn.utils.clip_grad_norm_, theirs)):
        with pytest.raises(RuntimeError) as e:
            clip(params, 1.0, math.inf)
        outcomes.append(str(e.value))
    assert outcomes[0] == outcomes[1]


def test_norm_is_deterministic_and_on_the_device(triton_device):
    grads = [torch.randn(3000 + i, device=triton_device) * 10 ** (i % 5) for i in range(9)]
    totals = []
    for _ in range(2):
        params = _params_with(grads)
        totals.append(fusedopt.clip_grad_norm_(params, 1e9))
    assert totals[0].device.type == torch.device(triton_device).type
    assert torch.equal(totals[0], totals[1])


def _count_clip(n: int, device: str, clip_launches) -> tuple[int, int]:
    grads = [torch.randn(17 + i % 5, device=device) for i in range(n)]
    params = _params_with(grads)
    fusedopt.clip_grad_norm_(params, 1.0)  # first call builds the tables
    clip_launches.clear()
    with CountOps() as ops:
        fusedopt.clip_grad_norm_(params, 1.0)
    return len(clip_launches), len(ops.ops)


def test_clip_launches_do_not_grow_with_tensor_count(triton_device, clip_launches):
    few, many = _count_clip(4, triton_device, clip_launches), _count_clip(64, triton_device, clip_launches)
    assert few == many, f"(Triton launches, torch ops): {few} for 4 tensors, {many} for 64"
    assert few[0] == 3


# max_grad_norm ----------------------------------------------------------------------------------

MAX_NORM_CASES = [
    OptimCase(fusedopt.FusedAdamW, torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
    OptimCase(fusedopt.FusedAdam, torch.optim.Adam, dict(lr=0.01, amsgrad=True)),
    OptimCase(fusedopt.FusedSGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
    # alpha=0.5: RMSprop's buffers grow by g / sqrt(v) ~ 1 / sqrt(1 - alpha) a step; near 0.99 they
    # reach ~40, where the 1-ulp different clip coefficient (the norm sums in another order) shows
    # above the table's atol wherever a buffer cancels.
    OptimCase(
        fusedopt.FusedRMSprop, torch.optim.RMSprop, dict(lr=0.01, alpha=0.5, momentum=0.5, centered=True)
    ),
    OptimCase(fusedopt.FusedAdagrad, torch.optim.Adagrad, dict(lr=0.1, lr_decay=0.01, weight_decay=0.1)),
]


def test_max_grad_norm_is_validated():
    p = make("cpu", [(2,)])
    for bad in (0.0, -1.0, math.inf, math.nan, "1"):
        with pytest.raises(ValueError, match="Invalid max_grad_norm value"):
            fusedopt.FusedAdamW(p, max_grad_norm=bad)
    assert fusedopt.FusedAdamW(p, max_grad_norm=1).max_grad_norm == 1.0
    assert fusedopt.FusedAdamW(p).max_grad_norm is None


def _clip_then_step_both(opt, ref, ours, theirs, grads, max_norm: float) -> None:
    """The same grads to both; ours steps (max_grad_norm), torch clips then steps."""
    for params in (ours, theirs):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
    opt.step()
    torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    ref.step()


@pytest.mark.parametrize("case", MAX_NORM_CASES, ids=case_id)
def test_max_grad_norm_matches_clip_then_step(case, triton_device, clip_launches):
    """7 steps over two groups: the norm is global (over both), as clip_grad_norm_(all params)."""
    specs = [(3, 4), (5,), (), (4097,), (0,)]
    ours, theirs = make(triton_device, specs), make(triton_device, specs)
    groups = [{"params": ours[:2]}, {"params": ours[2:], "lr": 0.02}]
    opt = case.fused_cls(groups, max_grad_norm=1.5, **case.kwargs)
    ref = case.torch_cls([{"params": theirs[:2]}, {"params": theirs[2:], "lr": 0.02}], **case.kwargs)
    for step in range(7):
        grads = [g * (4.0 if step % 2 else 0.01) for g in grads_for(ours, step)]  # clipped or not
        _clip_then_step_both(opt, ref, ours, theirs, grads, 1.5)
        # Our grads are never rewritten.
        assert all(torch.equal(p.grad, g) for p, g in zip(ours, grads, strict=True))
        check_same(opt, ref, ours, theirs)
    counts = clip_launches.counts  # per step: a norm pass and a step per group, one finish
    name = kernel_name(case)
    assert counts["partials"] == counts[name] == 14 and counts["finish"] == 7 and "scale" not in counts, (
        counts
    )


def test_max_grad_norm_with_a_group_on_torchs_step(triton_device):
    """A fused=False group is clipped in place (torch's step reads its grads); the norm is global."""
    device = triton_device
    ours, theirs = make(device, [(3,), (4,)]), make(device, [(3,), (4,)])
    opt = fusedopt.FusedAdam(
        [{"params": ours[:1]}, {"params": ours[1:], "fused": False}], lr=0.1, max_grad_norm=0.1
    )
    ref = torch.optim.Adam([{"params": theirs[:1]}, {"params": theirs[1:]}], lr=0.1)
    for step in range(3):
        _clip_then_step_both(opt, ref, ours, theirs, grads_for(ours, step), 0.1)
        for p, q in zip(ours, theirs, strict=True):
            close(p, q, "param")


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("case", MAX_NORM_CASES, ids=case_id)
def test_no_grads_match_torch(case, compiled, triton_device, clip_launches):
    """No param has a grad. ``clip_grad_norm_`` returns torch's 0-d zero (value, dtype, device)
    and leaves the grads None. A step with ``max_grad_norm`` (eager, or compiled: fusedopt's own
    norm pass, which has nothing to sum) is torch's clip-then-step: nothing changes, the same
    state, no launch; the next step, with grads, matches too."""
    torch._dynamo.reset()
    specs = [(3, 4), (5,), ()]
    ours, theirs = make(triton_device, specs), make(triton_device, specs)
    total = fusedopt.clip_grad_norm_(ours, 1.0)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert (total.dtype, total.device, total.shape) == (expected.dtype, expected.device, expected.shape)
    assert torch.equal(total, expected) and not expected.item()
    assert all(p.grad is None for p in ours)
    opt = case.fused_cls(ours, max_grad_norm=1.0, **case.kwargs)
    ref = case.torch_cls(theirs, **case.kwargs)
    step = torch.compile(opt.step, fullgraph=True, backend="aot_eager") if compiled else opt.step
    before = snapshot(opt, ours)
    step()
    torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    ref.step()
    assert_unchanged(before, opt, ours)
    check_same(opt, ref, ours, theirs)
    assert not clip_launches, "nothing to clip or step"
    grads = [g * 4.0 for g in grads_for(ours, 0)]  # a norm above max_grad_norm: clipped
    _clip_then_step_both(opt, ref, ours, theirs, grads, 1.0)
    check_same(opt, ref, ours, theirs)
    assert clip_launches.counts == {"partials": 1, "finish": 1, kernel_name(case): 1}


def _count_pipeline(n: int, device: str, clip_launches) -> tuple[int, int]:
    params = [torch.randn(17 + i % 5, device=device, requires_grad=True) for i in range(n)]
    opt = fusedopt.FusedAdamW(params, lr=1e-3, max_grad_norm=1.0)
    for _ in range(3):  # first steps create state and plans
        for p in params:
            p.grad = torch.randn_like(p)
        clip_launches.clear()
        with CountOps() as ops:
            opt.step()
    return len(clip_launches), len(ops.ops)


def test_clip_and_step_launches_do_not_grow_with_tensor_count(triton_device, clip_launches):
    few = _count_pipeline(4, triton_device, clip_launches)
    many = _count_pipeline(64, triton_device, clip_launches)
    assert few == many, f"(Triton launches, torch ops): {few} for 4 tensors, {many} for 64"
    assert few[0] == 3, "norm partials, norm finish, step"


# fusedopt.GradScaler: the whole AMP + clipping phase in two read-only passes -----------------


class AmpOps(CountOps):
    """Counts aten ops; ``unscales`` counts torch's inf-check/unscale passes over the grads."""

    @property
    def unscales(self) -> int:
        return sum("non_finite_check_and_unscale" in op for op in self.ops)


@pytest.mark.parametrize(
    "scaler_cls", [torch.amp.GradScaler, fusedopt.GradScaler], ids=lambda c: c.__module__
)
@pytest.mark.parametrize("max_grad_norm", [None, 0.5], ids=["no-clip", "max_grad_norm"])
@pytest.mark.parametrize("case", MAX_NORM_CASES[::2], ids=case_id)
def test_grad_scaler_and_max_grad_norm_match_torchs_recipe(
    case, max_grad_norm, scaler_cls, triton_device, clip_launches
):
    """``scaler.step(opt)`` with max_grad_norm against torch's GradScaler + unscale_ +
    clip_grad_norm_ + step, an inf injected at one step (nothing changes there, the scale backs
    off, training continues). The grads are never written. fusedopt.GradScaler: one norm pass
    (two launches) that is also the inf check, one step launch, no torch unscale pass;
    torch's GradScaler adds its own check-and-unscale pass."""
    device = triton_device
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(device)
    twin = copy.deepcopy(model)
    opt = case.fused_cls(model.parameters(), max_grad_norm=max_grad_norm, **case.kwargs)
    ref = case.torch_cls(twin.parameters(), **case.kwargs)
    scaler = scaler_cls(device, init_scale=2.0**6, growth_interval=2)
    ref_scaler = torch.amp.GradScaler(device, init_scale=2.0**6, growth_interval=2)
    ours, theirs = list(model.parameters()), list(twin.parameters())
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        x = torch.randn(5, 4, generator=gen).to(device) * 3
        for m, o, s in ((model, opt, scaler), (twin, ref, ref_scaler)):
            o.zero_grad()
            s.scale(m(x).square().mean()).backward()
            if step in (2, 4):
                m[2].weight.grad[0, 1] = float("inf" if step == 2 else "nan")
        before, grads = snapshot(opt, ours), [p.grad.clone() for p in ours]
        clip_launches.clear()
        with AmpOps() as ops:
            scaler.step(opt)
        scaler.update()
        ref_scaler.unscale_(ref)
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(theirs, max_grad_norm)
        ref_scaler.step(ref)
        ref_scaler.update()
        ours_check = scaler_cls is fusedopt.GradScaler
        assert ops.unscales == (0 if ours_check else 1)
        name = kernel_name(case)
        norm = ours_check or max_grad_norm is not None
        assert clip_launches.counts == ({"partials": 1, "finish": 1} if norm else {}) | {name: 1}
        for p, g in zip(ours, grads, strict=True):
            torch.testing.assert_close(p.grad, g, rtol=0, atol=0, equal_nan=True)
        if step in (2, 4):
            assert_unchanged(before, opt, ours)
        assert scaler.get_scale() == ref_scaler.get_scale()
        check_same(opt, ref, ours, theirs)


def test_fusedopt_grad_scaler_is_torchs_for_other_optimizers(triton_device):
    device = triton_device
    params, twins = make(device, [(4,)]), make(device, [(4,)])
    opts = [torch.optim.SGD(params, lr=0.1), torch.optim.SGD(twins, lr=0.1)]
    scalers = [fusedopt.GradScaler(device, init_scale=8.0), torch.amp.GradScaler(device, init_scale=8.0)]
    for step in range(3):
        for ps, o, s in zip((params, twins), opts, scalers, strict=True):
            s.scale(torch.ones((), device=device))
            ps[0].grad = torch.full((4,), 16.0 if step != 1 else math.inf, device=device)
            s.step(o)
            s.update()
        torch.testing.assert_close(params[0], twins[0], rtol=0, atol=0)
        assert scalers[0].get_scale() == scalers[1].get_scale()


@pytest.mark.parametrize(
    "scaler_cls", [fusedopt.GradScaler, torch.amp.GradScaler], ids=lambda c: c.__module__
)
def test_grad_scalers_with_sparse_sgd_match_torch(scaler_cls, device):
    """Sparse grads (torch's functional SGD) under either scaler: torch's inf check runs and
    the step unscales them, as torch's SGD under torch's GradScaler."""
    embeds = [nn.Embedding(10, 3, sparse=True).to(device) for _ in "ab"]
    embeds[1].load_state_dict(embeds[0].state_dict())
    opt = fusedopt.FusedSGD(embeds[0].parameters(), lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(embeds[1].parameters(), lr=0.1, momentum=0.9)
    scalers = [scaler_cls(device, init_scale=8.0), torch.amp.GradScaler(device, init_scale=8.0)]
    idx = torch.tensor([1, 4, 4, 7], device=device)
    for step in range(3):
        for e, o, s in zip(embeds, (opt, ref), scalers, strict=True):
            o.zero_grad()
            s.scale(e(idx).square().sum() * (math.inf if step == 1 else 1.0)).backward()
            s.step(o)
            s.update()
        torch.testing.assert_close(embeds[0].weight, embeds[1].weight)
        assert scalers[0].get_scale() == scalers[1].get_scale()


def test_a_norm_left_by_an_inf_check_without_its_step_is_not_reused(triton_device):
    """fusedopt.GradScaler's inf check keeps the norm for the step that follows; if that step
    never comes, a later plain step computes its own norm."""
    ours, theirs = make(triton_device, [(5,), (3, 2)]), make(triton_device, [(5,), (3, 2)])
    opt = fusedopt.FusedSGD(ours, lr=0.1, max_grad_norm=0.1)
    ref = torch.optim.SGD(theirs, lr=0.1)
    _set = [grads_for(ours, 0), grads_for(ours, 1)]
    for p, g in zip(ours, _set[0], strict=True):
        p.grad = g * 100
    find_inf(opt, torch.tensor(1.0, device=triton_device))  # as the scaler would; no step follows
    for params in (ours, theirs):
        for p, g in zip(params, _set[1], strict=True):
            p.grad = g.clone()
    opt.step()
    torch.nn.utils.clip_grad_norm_(theirs, 0.1)
    ref.step()
    for p, q in zip(ours, theirs, strict=True):
        close(p, q, "param")


def test_max_grad_norm_survives_pickle_and_deepcopy():
    import pickle

    opt = fusedopt.FusedAdamW(make("cpu", [(3,)]), max_grad_norm=0.25)
    for other in (pickle.loads(pickle.dumps(opt)), copy.deepcopy(opt)):
        assert other.max_grad_norm == 0.25
        assert other.param_groups[0].keys() == opt.param_groups[0].keys()
