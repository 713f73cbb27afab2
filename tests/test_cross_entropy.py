"""Fused cross-entropy against ``torch.nn.functional.cross_entropy``.

On CPU the kernels run through the Triton interpreter (slow: shapes stay small, and most cases
shrink the column block so that rows span several blocks); on CUDA they run compiled. The
reference is torch in fp32 (fp64 for fp64) from the same, possibly low-precision, logits; the
tolerance is the loss contract (``fusedopt.tolerance.LOSS_TOLERANCE``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from helpers import Launches, compile_in_child, kernels_compiler, record_launches
from torch.utils._python_dispatch import TorchDispatchMode

import fusedopt.losses._cross_entropy_launch as launch
import fusedopt.losses.cross_entropy as ce
import fusedopt.nn
from fusedopt._multi_tensor import TL_DTYPE
from fusedopt.kernels import cross_entropy as kernels
from fusedopt.kernels.common import tanh
from fusedopt.losses.cross_entropy import (
    CrossEntropyFunction,
    cross_entropy,
    cross_entropy_composition,
    z_loss_composition,
)
from fusedopt.testing import assert_close
from fusedopt.tolerance import LOSS_TOLERANCE, OPTIM_TOLERANCE, TANH_EPS

# The interpreter computes with numpy, which warns about the intended inf - inf and 1 / 0.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


@dataclasses.dataclass(frozen=True)
class Options:
    weight: bool = False
    ignore_index: int = -100
    ignore_hits: bool = False  # some targets equal ignore_index
    label_smoothing: float = 0.0


OPTIONS = {
    "plain": Options(),
    "ignore": Options(ignore_hits=True),
    "weight": Options(weight=True, ignore_hits=True),
    "smooth": Options(label_smoothing=0.1, ignore_hits=True),
    # a real class as ignore_index, with weight and smoothing together
    "all": Options(weight=True, ignore_index=3, ignore_hits=True, label_smoothing=0.25),
}


@dataclasses.dataclass(frozen=True)
class Case:
    shape: tuple[int, ...]  # (C,), (N, C) or (N, C, d1, ...)
    dtype: torch.dtype
    reduction: str
    options: str
    block: int | None = 64  # MAX_BLOCK during the case (None: the default, 4096)
    tile: int | None = None  # MAX_TILE during the case (None: the default, 4096)

    @property
    def id(self) -> str:
        shape = "x".join(map(str, self.shape))
        dtype = str(self.dtype).removeprefix("torch.")
        tile = f"-t{self.tile}" if self.tile else ""
        return f"{shape}-{dtype}-{self.reduction}-{self.options}-b{self.block or 'default'}{tile}"


SMALL = [(7, 33), (33, 65), (4, 3, 129), (33,)]
REDUCTIONS = ["mean", "sum", "none"]
CASES = (
    [Case(s, torch.float32, r, o) for s in SMALL for r in REDUCTIONS for o in OPTIONS]
    + [
        Case(s, dt, r, o)
        for dt in (torch.float64, torch.bfloat16, torch.float16)
        for s in SMALL
        for r in REDUCTIONS
        for o in ("plain", "all")
    ]
    + [
        Case((16, 1000), dt, r, o, 256)
        for dt in (torch.float32, torch.bfloat16)
        for r in ("mean", "none")
        for o in ("plain", "all")
    ]
    + [Case((2, 33000), dt, "mean", "all", None) for dt in (torch.float32, torch.bfloat16)]
    + [
        Case((2, 33000), torch.float32, "none", "smooth", None),
        Case((2, 33000), torch.bfloat16, "sum", "ignore", None),
    ]
    # several programs of several rows each, the last one partly masked
    + [Case((33, 65), torch.float32, r, o, 64, 128) for r in REDUCTIONS for o in ("plain", "all")]
    + [Case((4, 3, 129), dt, "mean", "all", 64, 64) for dt in (torch.float32, torch.bfloat16)]
)


@pytest.fixture
def sizes(monkeypatch):
    """Set the row kernel's largest column block (small: rows span several blocks) and tile
    (small: more programs); None keeps the default."""

    def set_sizes(block: int | None, tile: int | None = None) -> None:
        if block is not None:
            monkeypatch.setattr(launch, "MAX_BLOCK", block)
        if tile is not None:
            monkeypatch.setattr(launch, "MAX_TILE", tile)

    return set_sizes


def make_inputs(shape, dtype, options: Options, device, seed=0, scale=4.0):
    """Logits, targets (some hitting ignore_index if asked) and keyword arguments."""
    gen = torch.Generator().manual_seed(seed)
    num_classes = shape[0] if len(shape) == 1 else shape[1]
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    target_shape = () if len(shape) == 1 else (shape[0], *shape[2:])
    target = torch.randint(0, num_classes, target_shape, generator=gen)
    if options.ignore_hits and target.dim():
        target.view(-1)[::4] = options.ignore_index
    kwargs = {"ignore_index": options.ignore_index, "label_smoothing": options.label_smoothing}
    if options.weight:
        kwargs["weight"] = (
            (torch.rand(num_classes, generator=gen, dtype=torch.float64) + 0.1).to(dtype).to(device)
        )
    return x.to(device), target.to(device), kwargs


def reference(x, target, grad_output=None, reduction="mean", **kwargs):
    """torch's loss and gradient of the logits, computed in fp32 (fp64 for fp64): its
    ``F.cross_entropy``, or with ``z_loss``/``softcap`` the composition
    (:func:`cross_entropy_composition`)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xr = x.detach().to(dtype).requires_grad_()
    if kwargs.get("weight") is not None:
        kwargs = dict(kwargs, weight=kwargs["weight"].to(dtype))
    loss = cross_entropy_composition(xr, target, reduction=reduction, **kwargs)
    go = torch.ones_like(loss) if grad_output is None else grad_output.to(loss.device, dtype)
    (grad,) = torch.autograd.grad(loss, xr, go)
    return loss.detach(), grad


def ours(x, target, grad_output=None, reduction="mean", **kwargs):
    """Our loss and gradient; ``x`` requires grad (a leaf or a view of one)."""
    loss = cross_entropy(x, target, reduction=reduction, **kwargs)
    go = torch.ones_like(loss) if grad_output is None else grad_output.to(loss.device, loss.dtype)
    (grad,) = torch.autograd.grad(loss, x, go)
    return loss.detach(), grad


def check_against_torch(x, target, grad_output=None, reduction="mean", **kwargs):
    """Loss (value, dtype, shape) and gradient (value, dtype, shape) against torch."""
    loss, grad = ours(x, target, grad_output, reduction, **kwargs)
    ref_loss, ref_grad = reference(x, target, grad_output, reduction, **kwargs)
    assert loss.dtype == x.dtype and loss.shape == ref_loss.shape
    assert grad.dtype == x.dtype and grad.shape == x.shape
    assert_close(loss, ref_loss, "loss", LOSS_TOLERANCE)
    assert_close(grad, ref_grad, "grad", LOSS_TOLERANCE)
    return loss, grad


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_torch(case: Case, triton_device, sizes):
    sizes(case.block, case.tile)
    x, target, kwargs = make_inputs(case.shape, case.dtype, OPTIONS[case.options], triton_device)
    grad_output = None
    if case.reduction == "none":  # elementwise upstream grads of the target's shape
        grad_output = torch.randn(target.shape, generator=torch.Generator().manual_seed(1)).to(triton_device)
    check_against_torch(x.requires_grad_(), target, grad_output, case.reduction, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_grad_output_not_one(dtype, reduction, triton_device, sizes):
    """The loss inside a larger expression: backward scales the stored gradient in place."""
    sizes(64)
    x, target, kwargs = make_inputs((9, 70), dtype, OPTIONS["all"], triton_device)
    x.requires_grad_()
    loss = cross_entropy(x, target, reduction=reduction, **kwargs)
    stored = loss.grad_fn.grad  # the forward's gradient buffer, for grad_output 1
    (grad,) = torch.autograd.grad(2.5 * loss - 1.0, x)
    assert grad.data_ptr() == stored.data_ptr()  # scaled in place, no new buffer
    _, ref_grad = reference(x, target, torch.tensor(2.5), reduction, **kwargs)
    assert_close(grad, ref_grad, "grad", LOSS_TOLERANCE)


def test_grad_output_one_returns_the_forward_gradient(triton_device):
    x, target, kwargs = make_inputs((5, 40), torch.float32, OPTIONS["smooth"], triton_device)
    x.requires_grad_()
    loss = cross_entropy(x, target, **kwargs)
    before = loss.grad_fn.grad.clone()
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.data_ptr() == loss.grad_fn.grad.data_ptr()
    assert torch.equal(grad, before)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_backward_twice_with_retain_graph(reduction, triton_device, sizes):
    sizes(64)
    x, target, kwargs = make_inputs((6, 100), torch.float32, OPTIONS["all"], triton_device)
    x.requires_grad_()
    go = (
        torch.full((6,), 1.0, device=triton_device)
        if reduction == "none"
        else torch.tensor(1.0, device=triton_device)
    )
    loss = cross_entropy(x, target, reduction=reduction, **kwargs)
    _, ref_grad = reference(x, target, go, reduction, **kwargs)

    (first,) = torch.autograd.grad(loss, x, 2.0 * go, retain_graph=True)
    first_copy = first.clone()
    (second,) = torch.autograd.grad(loss, x, 5.0 * go, retain_graph=True)
    (third,) = torch.autograd.grad(loss, x, 0.0 * go, retain_graph=True)
    assert_close(first, 2.0 * ref_grad, "grad, grad_output 2", LOSS_TOLERANCE)
    assert torch.equal(first, first_copy)  # a gradient already handed out does not change
    assert_close(second, 5.0 * ref_grad, "grad, grad_output 5", LOSS_TOLERANCE)
    assert torch.equal(third, torch.zeros_like(third))

    # accumulation into .grad over two backward calls of one graph
    x.grad = None
    loss.backward(go, retain_graph=True)
    loss.backward(3.0 * go)
    assert_close(x.grad, 4.0 * ref_grad, "accumulated grad", LOSS_TOLERANCE)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", ["ignore", "all"])
def test_all_rows_ignored(reduction, options, triton_device):
    x, target, kwargs = make_inputs((4, 2, 10), torch.float32, OPTIONS[options], triton_device)
    target.fill_(kwargs["ignore_index"])
    loss, grad = check_against_torch(x.requires_grad_(), target, None, reduction, **kwargs)
    if reduction == "mean":
        assert loss.isnan()
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", ["plain", "all"])
def test_extreme_logits(dtype, options, triton_device, sizes):
    """Logits of ±3e4 overflow a naive exp; -inf logits (masked classes) are allowed."""
    sizes(64)
    x, target, kwargs = make_inputs((8, 150), dtype, OPTIONS[options], triton_device, scale=1.0)
    x = torch.where(x > 0, 3e4, -3e4).to(dtype) + x  # huge and nearly tied logits
    loss, grad = check_against_torch(x.clone().requires_grad_(), target, None, "sum", **kwargs)
    assert loss.isfinite() and grad.isfinite().all()
    if options == "plain":  # -inf logits away from the target (with smoothing torch gives inf)
        masked = x.clone()
        masked[:, 140:] = -float("inf")
        check_against_torch(masked.requires_grad_(), target.clamp(0, 139), None, "mean", **kwargs)


@pytest.mark.parametrize(
    "layout", ["strided_columns", "transposed", "spatial_channels_last", "spatial_copy", "strided_target"]
)
def test_non_contiguous(layout, triton_device, sizes):
    sizes(64)
    gen = torch.Generator().manual_seed(3)
    options = OPTIONS["all"]
    if layout in ("strided_columns", "strided_target"):
        base = torch.randn(10, 2 * 77, generator=gen).to(triton_device).requires_grad_()
        x = base[:, ::2]  # column stride 2
        target = torch.randint(0, 77, (10, 2), generator=gen).to(triton_device)
        target = target[:, 1] if layout == "strided_target" else target[:, 1].contiguous()
    elif layout == "transposed":
        base = torch.randn(77, 10, generator=gen).to(triton_device).requires_grad_()
        x = base.t()  # row stride 1, column stride 10
        target = torch.randint(0, 77, (10,), generator=gen).to(triton_device)
    elif layout == "spatial_channels_last":
        base = torch.randn(3, 5, 6, 70, generator=gen).to(triton_device).requires_grad_()
        x = base.permute(0, 3, 1, 2)  # (N, C, d1, d2), classes innermost in memory
        target = torch.randint(0, 70, (3, 5, 6), generator=gen).to(triton_device)
    else:  # spatial dims that cannot be merged into one: the rows are copied
        base = torch.randn(2, 70, 5, 6, generator=gen).to(triton_device).requires_grad_()
        x = base.transpose(2, 3)
        target = torch.randint(0, 70, (2, 6, 5), generator=gen).to(triton_device)
        assert launch._rows_view(x, 2, 30, 70) is None
    target[..., 0] = options.ignore_index
    weight = torch.rand(x.shape[1], generator=gen).to(triton_device)
    for reduction in ("mean", "none"):
        go = torch.randn(target.shape, generator=gen).to(triton_device) if reduction == "none" else None
        check_against_torch(
            x, target, go, reduction, weight=weight, ignore_index=options.ignore_index, label_smoothing=0.2
        )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", ["plain", "all"])
def test_gradcheck_fp64(reduction, options, triton_device, sizes):
    sizes(8)  # fp64 halves it: 4 columns per block, 2 blocks per row
    x, target, kwargs = make_inputs((2, 5, 3), torch.float64, OPTIONS[options], triton_device, scale=2.0)
    torch.autograd.gradcheck(
        lambda logits: cross_entropy(logits, target, reduction=reduction, **kwargs), (x.requires_grad_(),)
    )


def test_empty_batch(triton_device):
    x = torch.randn(0, 7, device=triton_device, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long, device=triton_device)
    for reduction in ("mean", "sum", "none"):
        check_against_torch(x, target, None if reduction != "none" else torch.zeros(0), reduction)


def test_1d_input_with_1d_target_of_one_element(triton_device):
    """torch takes a (1,) target for (C,) logits (and then fails in its backward: the gradient is
    compared with torch's for a 0-d target)."""
    x = torch.randn(40, device=triton_device, requires_grad=True)
    target = torch.tensor([7], device=triton_device)
    for reduction in ("mean", "none"):
        grad_output = torch.tensor(0.5) if reduction == "none" else None
        loss, grad = ours(x, target, grad_output, reduction)
        ref_loss, ref_grad = reference(x, target.reshape(()), grad_output, reduction)
        assert loss.shape == F.cross_entropy(x, target, reduction=reduction).shape == ()
        assert_close(loss, ref_loss, f"{reduction} loss", LOSS_TOLERANCE)
        assert_close(grad, ref_grad, f"{reduction} grad", LOSS_TOLERANCE)


def test_uint8_targets(triton_device):
    x, target, kwargs = make_inputs((6, 40), torch.float32, OPTIONS["weight"], triton_device)
    target[target < 0] = 255
    kwargs["ignore_index"] = 255
    check_against_torch(x.requires_grad_(), target.to(torch.uint8), None, "mean", **kwargs)


def test_negative_or_nan_label_smoothing_is_no_smoothing(triton_device):
    x, target, _ = make_inputs((6, 40), torch.float32, OPTIONS["plain"], triton_device)
    for eps in (-0.3, float("nan")):
        check_against_torch(x.clone().requires_grad_(), target, None, "mean", label_smoothing=eps)


class Allocations(TorchDispatchMode):
    """Element counts of the tensors that factory ops create."""

    FACTORIES = ("empty", "zeros", "ones", "full", "clone", "_to_copy", "new_")

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(name in func.__name__ for name in self.FACTORIES) and isinstance(out, torch.Tensor):
            self.sizes.append(out.numel())
        return out


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradient_buffer_only_when_autograd_records(reduction, triton_device):
    x, target, _ = make_inputs((6, 50), torch.float32, OPTIONS["plain"], triton_device)
    numel = x.numel()

    def largest_allocation(fn) -> int:
        with Allocations() as allocations:
            fn()
        return max(allocations.sizes)

    with torch.no_grad():
        assert (
            largest_allocation(lambda: cross_entropy(x.requires_grad_(), target, reduction=reduction)) < numel
        )
    assert largest_allocation(lambda: cross_entropy(x.detach(), target, reduction=reduction)) < numel
    with torch.no_grad():
        assert (
            largest_allocation(lambda: CrossEntropyFunction.apply(x, target, None, -100, reduction, 0.0))
            < numel
        )
    recorded = largest_allocation(lambda: cross_entropy(x.requires_grad_(), target, reduction=reduction))
    if reduction == "mean":
        assert recorded == numel  # control: the forward writes the gradient
    else:
        assert recorded < numel  # none recomputes in backward: nothing (N, C) in the forward


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("options", ["plain", "all"])
def test_target_out_of_range_raises_index_error_as_torch(reduction, options, triton_device):
    """Issue 18: an out-of-range target raised ``RuntimeError`` where torch raises
    ``IndexError``: torch's type and message (the bad target); uint8 targets too (torch
    prints those as a character, and fails to decode one above 127: the number here)."""
    x, target, kwargs = make_inputs((5, 33), torch.float32, OPTIONS[options], triton_device)
    if triton_device == "cuda":
        pytest.skip("a device-side assert (torch's CUDA behaviour too) poisons the CUDA context")
    for bad, dtype in ((33, torch.int64), (-1, torch.int64), (1000, torch.int64), (200, torch.uint8)):
        wrong = target.clone()
        wrong[2] = bad
        wrong = wrong.to(dtype) if dtype == torch.int64 else wrong.clamp(0).to(dtype)
        if dtype == torch.int64:
            expected = raised(F.cross_entropy, x, wrong, reduction=reduction, **kwargs)
            assert isinstance(expected, IndexError) and str(expected) == f"Target {bad} is out of bounds."
        with pytest.raises(IndexError, match=rf"^Target {bad} is out of bounds\.$"):
            cross_entropy(x.clone().requires_grad_(), wrong, reduction=reduction, **kwargs)
    wrong = target.clone()
    wrong[1] = kwargs["ignore_index"]  # ignore_index is not out of range
    cross_entropy(x, wrong, **kwargs)


@pytest.mark.parametrize(
    "make_args, error",
    [
        (lambda x, t: dict(reduction="avg"), ValueError),
        (lambda x, t: dict(label_smoothing=1.5), RuntimeError),
        (lambda x, t: dict(weight=torch.ones(4, device=x.device)), RuntimeError),
        (lambda x, t: dict(weight=torch.ones(5, dtype=torch.float64, device=x.device)), RuntimeError),
        (lambda x, t: dict(target=t[:2]), ValueError),
        (lambda x, t: dict(target=t.int()), RuntimeError),
        (lambda x, t: dict(target=t[:, None]), RuntimeError),
        (lambda x, t: dict(input=x[:, :, None], target=t[:, None].expand(3, 2)), RuntimeError),
        (lambda x, t: dict(input=x[0], target=t), ValueError),
        (lambda x, t: dict(input=x[0], target=t[:, None]), RuntimeError),
    ],
)
def test_invalid_arguments_raise_as_torch(make_args, error, device):
    x = torch.randn(3, 5, device=device)
    t = torch.tensor([0, 4, 2], device=device)
    args = dict(input=x, target=t) | make_args(x, t)
    with pytest.raises(error) as ours_info:
        cross_entropy(**args)
    with pytest.raises(error) as torch_info:
        F.cross_entropy(**args)
    assert str(ours_info.value) == str(torch_info.value)


def raised(fn, *args, **kwargs) -> BaseException:
    with pytest.raises(Exception) as info:  # the oracle's error, whatever it is
        fn(*args, **kwargs)
    return info.value


def test_probability_targets_are_refused(triton_device):
    x = torch.randn(3, 5, device=triton_device)
    with pytest.raises(NotImplementedError, match="probability targets"):
        cross_entropy(x, torch.rand(3, 5, device=triton_device).softmax(1))


def test_weight_cannot_require_grad(device):
    x = torch.randn(3, 5, device=device, requires_grad=True)
    weight = torch.rand(5, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
        cross_entropy(x, torch.tensor([0, 1, 2], device=device), weight=weight)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_function_apply_directly(reduction, triton_device):
    """The autograd.Function itself, positional arguments as torch's functional passes them."""
    x, target, kwargs = make_inputs((6, 50), torch.float32, OPTIONS["all"], triton_device)
    x.requires_grad_()
    args = (kwargs["weight"], kwargs["ignore_index"], reduction, kwargs["label_smoothing"])
    loss = CrossEntropyFunction.apply(x, target, *args)
    ref = F.cross_entropy(x, target, reduction=reduction, **kwargs)
    assert_close(loss.detach(), ref.detach(), "loss", LOSS_TOLERANCE)
    grad_output = torch.rand_like(ref)
    (grad,) = torch.autograd.grad(loss, x, grad_output)
    (ref_grad,) = torch.autograd.grad(ref, x, grad_output)
    assert_close(grad, ref_grad, "grad", LOSS_TOLERANCE)


def test_deterministic(triton_device, sizes):
    sizes(64)
    x, target, kwargs = make_inputs((20, 300), torch.float32, OPTIONS["all"], triton_device)
    runs = [ours(x.clone().requires_grad_(), target, None, "mean", **kwargs) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.fixture
def ce_launches(monkeypatch) -> Launches:
    """Every launch of the cross-entropy kernels as ``(name, args, constexpr switches)``."""
    kernel_of = {"targets": kernels.cross_entropy_targets_kernel, "rows": kernels.cross_entropy_kernel}
    kernel_of |= {"sum": kernels.cross_entropy_sum_kernel, "scale": kernels.cross_entropy_scale_kernel}
    return record_launches(monkeypatch, kernel_of)


def test_kernels_ran(ce_launches, triton_device):
    x, target, _ = make_inputs((6, 50), torch.float32, OPTIONS["plain"], triton_device)
    x.requires_grad_()
    cross_entropy(x, target).backward()
    assert [name for name, _, _ in ce_launches] == ["targets", "rows", "sum", "scale"]
    rows = ce_launches[1][2]
    assert rows["LOSS"] and rows["GRAD"] and rows["DIVIDE_BY_TOTAL"]

    ce_launches.clear()
    cross_entropy(x, target, reduction="none").sum().backward()
    assert [name for name, _, _ in ce_launches] == ["targets", "rows", "rows"]
    forward, backward = ce_launches[1][2], ce_launches[2][2]
    assert forward["LOSS"] and forward["SAVE_LSE"] and not forward["GRAD"]
    assert backward["GRAD"] and backward["ROW_GRAD_OUTPUT"] and not backward["LOSS"]

    ce_launches.clear()
    with torch.no_grad():
        cross_entropy(x, target, reduction="sum")
    assert [name for name, _, _ in ce_launches] == ["targets", "rows", "sum"]
    assert not ce_launches[1][2]["GRAD"]


def test_other_devices_use_torch(ce_launches, monkeypatch, device):
    monkeypatch.setattr(ce, "runs_triton", lambda device: False)
    x, target, kwargs = make_inputs((6, 50), torch.float32, OPTIONS["all"], device)
    check_against_torch(x.requires_grad_(), target, None, "mean", **kwargs)
    assert not ce_launches


# -- compilation for an H100 (sm_90) without a GPU, in a child process without TRITON_INTERPRET ---------

CHILD = kernels_compiler("cross_entropy")

COMPUTE = {"fp32": "fp32", "bf16": "fp32", "fp16": "fp32", "fp64": "fp64"}
# row-kernel modes: forward with gradient (mean / sum), forward only, none's forward and backward
ROW_MODES = {
    "mean_grad": dict(LOSS=True, SAVE_LSE=False, GRAD=True, DIVIDE_BY_TOTAL=True, ROW_GRAD_OUTPUT=False),
    "sum_grad": dict(LOSS=True, SAVE_LSE=False, GRAD=True, DIVIDE_BY_TOTAL=False, ROW_GRAD_OUTPUT=False),
    "loss_only": dict(LOSS=True, SAVE_LSE=False, GRAD=False, DIVIDE_BY_TOTAL=False, ROW_GRAD_OUTPUT=False),
    "none_forward": dict(LOSS=True, SAVE_LSE=True, GRAD=False, DIVIDE_BY_TOTAL=False, ROW_GRAD_OUTPUT=False),
    "none_backward": dict(LOSS=False, SAVE_LSE=False, GRAD=True, DIVIDE_BY_TOTAL=False, ROW_GRAD_OUTPUT=True),
}


def _compile_variants() -> list:
    out = []
    for dt, ct in COMPUTE.items():
        for i, (mode, switches) in enumerate(ROW_MODES.items()):
            loss_dtype = dt if mode == "none_forward" else ct
            signature = {
                "logits": f"*{dt}", "target": "*i64", "weight": f"*{dt}", "stats": f"*{ct}", "lse": f"*{ct}",
                "loss": f"*{loss_dtype}", "grad": f"*{dt}", "grad_output": f"*{dt}", "R": "i32", "C": "i32",
                "col0": "i64", "K": "i32",
                "stride_xn": "i32", "stride_gn": "i32", "stride_t": "i32", "stride_go": "i32",
                "ignore_index": "i64", "label_smoothing": "fp64", "z_loss": "fp64", "softcap": "fp64",
            }  # fmt: skip
            spatial = mode == "none_backward"  # S and the spatial strides are runtime values
            if spatial:
                signature |= {"S": "i32", "stride_xs": "i32", "stride_gs": "i32"}
            block = 4096 if ct == "fp32" else 2048
            rows = 4 if mode == "sum_grad" else 1  # a tile of several rows of 1024 (512) columns
            constexprs = dict(
                switches, DTYPE=dt, COMPUTE=ct, LOSS_DTYPE=loss_dtype, ROWS=rows, BLOCK=block // rows,
                HAS_WEIGHT=i % 2 == 0, SMOOTHING=i < 3, Z_LOSS=i in (0, 3, 4), SOFTCAP=i in (1, 2, 4),
                stride_xc=1, stride_gc=1, SAME_SPLIT=i != 1,
            )  # fmt: skip
            if not spatial:
                constexprs |= {"S": 1, "stride_xs": 0, "stride_gs": 0}
            aligned = ["logits", "grad", "weight", "C", "stride_xn", "stride_gn", "stride_xs", "stride_gs"]
            aligned = [a for a in aligned if a in signature]
            out.append(["cross_entropy_kernel", signature, constexprs, aligned if dt != "fp16" else []])
        out.append([
            "cross_entropy_targets_kernel",
            {"target": "*u8" if dt == "fp16" else "*i64", "weight": f"*{dt}", "stats": f"*{ct}", "ok": "*i32",
             "R": "i32", "C": "i32", "stride_t": "i32", "ignore_index": "i64"},
            dict(COMPUTE=ct, HAS_WEIGHT=dt != "bf16", BLOCK=1024), [],
        ])  # fmt: skip
        out.append([
            "cross_entropy_sum_kernel", {"loss": f"*{ct}", "stats": f"*{ct}", "out": f"*{dt}", "R": "i32"},
            dict(DTYPE=dt, COMPUTE=ct, MEAN=dt != "fp16", BLOCK=1024), [],
        ])  # fmt: skip
        for first in (True, False):
            out.append([
                "cross_entropy_scale_kernel",
                {"src": f"*{dt}", "dst": f"*{dt}", "grad_output": f"*{dt}", "applied": f"*{ct}", "numel": "i32"},
                dict(DTYPE=dt, COMPUTE=ct, FIRST=first, BLOCK=4096, TAIL_BLOCK=1024), ["src", "dst"],
            ])  # fmt: skip
    return out


VARIANTS = _compile_variants()


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    return compile_in_child(CHILD, VARIANTS)


def test_kernels_compile_for_sm90(compiled):
    failures = [(v[0], v[2], r["error"]) for v, r in zip(VARIANTS, compiled, strict=True) if not r["ok"]]
    assert not failures


def test_aligned_rows_use_vector_loads(compiled):
    for variant, result in zip(VARIANTS, compiled, strict=True):
        if variant[0] == "cross_entropy_kernel" and variant[3]:
            assert result["vector_loads"] > 0, variant


def test_rows_of_any_length_use_vector_accesses():
    """Rows of GPT-2's 50,257 bf16 logits (no stride or size a multiple of 16, rows off 16-byte
    boundaries) are read and written with 128-bit accesses: before, every access was scalar."""
    signature = {
        "logits": "*bf16", "target": "*i64", "weight": "*bf16", "stats": "*fp32", "lse": "*fp32",
        "loss": "*fp32", "grad": "*bf16", "grad_output": "*bf16", "R": "i32", "C": "i32", "col0": "i64",
        "K": "i32", "stride_xn": "i32", "stride_gn": "i32", "stride_t": "i32", "stride_go": "i32",
        "ignore_index": "i64", "label_smoothing": "fp64", "z_loss": "fp64", "softcap": "fp64",
    }  # fmt: skip
    constexprs = dict(
        ROW_MODES["mean_grad"], DTYPE="bf16", COMPUTE="fp32", LOSS_DTYPE="fp32", ROWS=1, BLOCK=4096,
        HAS_WEIGHT=False, SMOOTHING=False, Z_LOSS=False, SOFTCAP=False, stride_xc=1, stride_gc=1, S=1, stride_xs=0, stride_gs=0, SAME_SPLIT=True,
    )  # fmt: skip
    variant = ["cross_entropy_kernel", signature, constexprs, ["logits", "grad", "weight"]]
    (result,) = compile_in_child(CHILD, [variant])
    assert result["ok"], result["error"]
    assert result["vector_loads"] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", ["plain", "all"])
def test_result_does_not_depend_on_the_rows_alignment(options, dtype, triton_device, sizes):
    """The same logits at any offset from a 16-byte boundary (rows read from their boundaries
    for 128-bit loads): the same loss and gradient, bit for bit, as a chunked linear
    cross-entropy needs (its chunks put a token's logits at different addresses)."""
    sizes(64)  # rows of 300 classes: several column blocks
    x, target, kwargs = make_inputs((5, 300), dtype, OPTIONS[options], triton_device)
    runs = []
    for offset in range(8):
        storage = torch.zeros(x.numel() + 8, dtype=dtype, device=triton_device)
        shifted = storage[offset : offset + x.numel()].view(x.shape).copy_(x).requires_grad_()
        runs.append(ours(shifted, target, None, "none", **kwargs))
    for loss, grad in runs[1:]:
        assert torch.equal(loss, runs[0][0]) and torch.equal(grad, runs[0][1])


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_autocast_returns_the_dtype_torch_returns(reduction, triton_device):
    """Under autocast torch runs cross-entropy in fp32: the loss is fp32, the gradient keeps the
    logits' dtype."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 33, generator=gen).to(triton_device, torch.bfloat16).requires_grad_()
    target = torch.randint(0, 33, (8,), generator=gen).to(triton_device)
    ref = x.detach().clone().requires_grad_()
    with torch.autocast(triton_device, dtype=torch.bfloat16):
        ours = cross_entropy(x, target, reduction=reduction)
        theirs = torch.nn.functional.cross_entropy(ref, target, reduction=reduction)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    ours.sum().backward()
    theirs.sum().backward()
    assert x.grad.dtype == ref.grad.dtype == torch.bfloat16
    # torch's autocast gradient is its fp32 gradient rounded to bf16: the contract's oracle.
    assert_close(x.grad, ref.grad, "grad", LOSS_TOLERANCE)


def test_module_face_trains_like_the_stock_module(triton_device):
    """fusedopt.nn.FusedCrossEntropyLoss is an nn.CrossEntropyLoss: same arguments, same
    training curve for a small classifier."""
    import fusedopt.nn

    assert issubclass(fusedopt.nn.FusedCrossEntropyLoss, torch.nn.CrossEntropyLoss)
    torch.manual_seed(0)
    x = torch.randn(64, 10, device=triton_device)
    target = torch.randint(0, 7, (64,), device=triton_device)
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 7)).to(
        triton_device
    )
    twin = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 7)).to(
        triton_device
    )
    twin.load_state_dict(model.state_dict())
    weight = torch.rand(7, device=triton_device) + 0.5
    kwargs = dict(weight=weight, ignore_index=3, label_smoothing=0.1)
    ours, theirs = fusedopt.nn.FusedCrossEntropyLoss(**kwargs), torch.nn.CrossEntropyLoss(**kwargs)
    opt, ref = torch.optim.SGD(model.parameters(), lr=0.5), torch.optim.SGD(twin.parameters(), lr=0.5)
    for _ in range(5):
        for m, crit, o in ((model, ours, opt), (twin, theirs, ref)):
            o.zero_grad()
            loss = crit(m(x), target)
            loss.backward()
            o.step()
        torch.testing.assert_close(ours(model(x), target), theirs(twin(x), target), rtol=1e-5, atol=1e-6)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert_close(p, q, "param", OPTIM_TOLERANCE)


# Issue 18: non-finite logits, create_graph, autocast with class weights, interpreter warnings --

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", ["plain", "all"])
def test_non_finite_logits_give_torch_nan(options, reduction, dtype, triton_device, sizes):
    """Issue 18: a NaN logit that was not the target was dropped from the log-sum-exp (a finite
    loss where torch's is NaN: a diverged model looked fine). Rows with a NaN (in the first and
    in the last of three column blocks), a +inf, only -inf, -inf beside finite logits, and a
    NaN in an ignored row: torch's loss and gradient, NaN exactly where torch's are."""
    sizes(16)  # rows of 37 classes span three column blocks
    x, target, kwargs = make_inputs((9, 37), dtype, OPTIONS[options], triton_device)
    target[[1, 2, 3, 5, 6, 7]] = torch.tensor([20, 4, 0, 30, 2, 9], device=triton_device)
    target[4] = kwargs["ignore_index"]
    x[1, 2], x[6, 36] = NAN, NAN  # not the target
    x[2, 30] = INF
    x[3] = -INF
    x[4, 11] = NAN  # an ignored row: loss 0, gradient NaN (torch's softmax backward)
    x[5, :10] = -INF  # masked classes: finite loss (inf with smoothing, as torch)
    grad_output = None
    if reduction == "none":
        grad_output = torch.randn(target.shape, generator=torch.Generator().manual_seed(1)).to(triton_device)
    loss, grad = check_against_torch(x.requires_grad_(), target, grad_output, reduction, **kwargs)
    assert loss.isnan().any() and grad[[1, 2, 3, 4, 6]].isnan().all()
    assert grad[[0, 5, 7, 8]].isfinite().all()


def hessian_vector_product(fn, x, v, grad_output):
    """The gradient with ``create_graph=True``, then the gradient of ``<gradient, v>``."""
    x = x.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(fn(x), x, grad_output, create_graph=True)
    (hv,) = torch.autograd.grad((g * v).sum(), x)
    return g, hv


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", ["plain", "all"])
@pytest.mark.parametrize("shape", [(6, 37), (3, 37, 2)], ids=str)
def test_create_graph_gives_torch_second_derivatives(shape, options, reduction, triton_device, sizes):
    """Issue 18: ``create_graph=True`` through the fused loss silently gave a first-order-only
    gradient (double backward, MAML, Hessian-vector products wrong). The gradient and a
    Hessian-vector product are torch's; the first-order backward of the same graph still runs
    the fused path (its stored gradient)."""
    sizes(16)
    x, target, kwargs = make_inputs(shape, torch.float32, OPTIONS[options], triton_device)
    gen = torch.Generator().manual_seed(2)
    v = torch.randn(shape, generator=gen).to(triton_device)
    go = torch.randn(target.shape if reduction == "none" else (), generator=gen).to(triton_device)
    ours = hessian_vector_product(lambda z: cross_entropy(z, target, reduction=reduction, **kwargs), x, v, go)
    theirs = hessian_vector_product(
        lambda z: F.cross_entropy(z, target, reduction=reduction, **kwargs), x, v, go
    )
    assert_close(ours[0], theirs[0], "grad", LOSS_TOLERANCE)
    assert_close(ours[1], theirs[1], "Hv", LOSS_TOLERANCE)
    z = x.clone().requires_grad_()
    loss = cross_entropy(z, target, reduction=reduction, **kwargs)
    torch.autograd.grad(loss, z, go, create_graph=True, retain_graph=True)
    (grad,) = torch.autograd.grad(loss, z, go)
    if reduction != "none":
        assert grad.data_ptr() == loss.grad_fn.grad.data_ptr()  # the stored gradient, scaled
    assert_close(grad, theirs[0], "first-order grad after a create_graph one", LOSS_TOLERANCE)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_create_graph_without_the_logits_raises_and_keeps_no_logits(reduction, triton_device):
    """mean/sum keep no logits alive (only the gradient): a second derivative through logits the
    caller no longer holds raises a clear error; through a view of held logits it is torch's."""
    x, target, _ = make_inputs((6, 5), torch.float32, OPTIONS["plain"], triton_device)
    x = x.detach()
    w = torch.randn(5, 5, device=triton_device, requires_grad=True)
    loss = cross_entropy(x @ w, target, reduction=reduction)  # x @ w: held by nobody
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(loss, w, create_graph=True)
    logits = (x @ w).view(2, 3, 5)
    ours = torch.autograd.grad(
        cross_entropy(logits.view(6, 5), target, reduction=reduction), w, create_graph=True
    )
    theirs = torch.autograd.grad(
        F.cross_entropy(logits.view(6, 5), target, reduction=reduction), w, create_graph=True
    )
    assert_close(ours[0], theirs[0], "grad", LOSS_TOLERANCE)
    (ours_hv,) = torch.autograd.grad(ours[0].square().sum(), w, retain_graph=True)
    (theirs_hv,) = torch.autograd.grad(theirs[0].square().sum(), w)
    assert_close(ours_hv, theirs_hv, "second derivative", LOSS_TOLERANCE)


@pytest.mark.parametrize("logits_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_class_weight_under_autocast_as_torch(weight_dtype, logits_dtype, triton_device):
    """Issue 18: class-weighted ``FusedCrossEntropyLoss`` raised under autocast ("expected
    scalar type BFloat16 but found Float") where torch casts logits and weight to fp32. torch's
    value, dtype and gradient, or its error (an fp64 weight)."""
    import fusedopt.nn

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, 37, generator=gen).to(triton_device, logits_dtype).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    target = torch.randint(0, 37, (8,), generator=gen).to(triton_device)
    weight = (torch.rand(37, generator=gen) + 0.5).to(triton_device, weight_dtype)
    kwargs = dict(weight=weight, ignore_index=3, label_smoothing=0.1)
    with torch.autocast(triton_device, dtype=torch.bfloat16):
        if weight_dtype == torch.float64:
            expected = raised(torch.nn.CrossEntropyLoss(**kwargs), xr, target)
            with pytest.raises(type(expected), match=str(expected)):
                fusedopt.nn.FusedCrossEntropyLoss(**kwargs)(x, target)
            return
        ours = fusedopt.nn.FusedCrossEntropyLoss(**kwargs)(x, target)
        theirs = torch.nn.CrossEntropyLoss(**kwargs)(xr, target)
    assert ours.dtype == theirs.dtype == torch.float32
    assert_close(ours, theirs, "loss", LOSS_TOLERANCE)
    ours.backward()
    theirs.backward()
    assert x.grad.dtype == xr.grad.dtype == logits_dtype
    assert_close(x.grad, xr.grad, "grad", LOSS_TOLERANCE)


@pytest.mark.parametrize("softcap", [None, 2.0], ids=["uncapped", "softcap"])
def test_kernels_raise_no_runtime_warning(softcap, triton_device, sizes):
    """Issue 18: the interpreter printed "RuntimeWarning: invalid value encountered in subtract"
    from the cross-entropy kernels (-inf - (-inf) on masked lanes) in user code. Ordinary
    calls, masked (-inf) classes and a partly masked last tile included, forward and backward,
    with RuntimeWarning an error; also with a softcap (the lanes past the rows stay -inf)."""
    sizes(16, 64)  # rows of 37 classes: three column blocks; 2 rows per program, 7 rows
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for options in OPTIONS:
            for reduction in ("mean", "sum", "none"):
                x, target, kwargs = make_inputs((7, 37), torch.float32, OPTIONS[options], triton_device)
                x[:, 33:] = -INF  # masked classes, no target among them
                target[target >= 33] = 1
                loss = cross_entropy(
                    x.requires_grad_(), target, reduction=reduction, softcap=softcap, **kwargs
                )
                loss.sum().backward()
                assert x.grad.isfinite().all()


# z_loss (issue 21): each target not ignored adds z_loss lse² to its loss -------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", ["plain", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(6, 37), (3, 37, 2)], ids=["2d", "3d"])
def test_z_loss_matches_the_composition(reduction, options, dtype, shape, triton_device, sizes):
    """Values and gradients (grad_output != 1) against :func:`z_loss_composition`, with class
    weights, label smoothing and ignored targets ("all"), rows spanning several blocks."""
    sizes(16)
    x, target, kwargs = make_inputs(shape, dtype, OPTIONS[options], triton_device)
    x.requires_grad_()
    gen = torch.Generator().manual_seed(3)
    loss = cross_entropy(x, target, reduction=reduction, z_loss=1e-2, **kwargs)
    go = torch.rand(loss.shape, generator=gen).to(triton_device, loss.dtype) + 0.5
    (grad,) = torch.autograd.grad(loss, x, go)
    ref_loss, ref_grad = reference(x, target, go, reduction, z_loss=1e-2, **kwargs)
    plain = cross_entropy(x.detach(), target, reduction=reduction, **kwargs)
    assert not torch.allclose(loss.detach().float(), plain.float()), "the z-loss changed nothing"
    assert loss.dtype == x.dtype and loss.shape == ref_loss.shape
    assert_close(loss.detach(), ref_loss, "loss", LOSS_TOLERANCE)
    assert_close(grad, ref_grad, "grad", LOSS_TOLERANCE)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_z_loss_gradcheck_fp64(reduction, triton_device, sizes):
    sizes(8)
    x, target, kwargs = make_inputs((2, 5, 3), torch.float64, OPTIONS["all"], triton_device, scale=2.0)
    torch.autograd.gradcheck(
        lambda logits: cross_entropy(logits, target, reduction=reduction, z_loss=0.1, **kwargs),
        (x.requires_grad_(),),
    )


def test_z_loss_all_ignored_and_errors(triton_device):
    x = torch.randn(4, 5, device=triton_device, requires_grad=True)
    target = torch.full((4,), -100, device=triton_device)
    loss = cross_entropy(x, target, reduction="sum", z_loss=0.5)
    loss.backward()
    assert loss.item() == 0 and torch.equal(x.grad, torch.zeros_like(x))
    for bad in (-1.0, float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(ValueError, match="z_loss"):
            cross_entropy(x, target, z_loss=bad)
    module = fusedopt.nn.FusedCrossEntropyLoss(label_smoothing=0.1, z_loss=0.25)
    assert module.z_loss == 0.25 and module.label_smoothing == 0.1
    with pytest.raises(ValueError, match="z_loss"):
        fusedopt.nn.FusedCrossEntropyLoss(z_loss=-1)


def test_z_loss_without_triton_is_the_composition(monkeypatch):
    """Tensors the kernels do not take run the composition (torch's ops)."""
    monkeypatch.setattr(ce, "runs_triton", lambda device: False)
    x, target, kwargs = make_inputs((5, 9), torch.float32, OPTIONS["all"], "cpu")
    got = cross_entropy(x, target, z_loss=0.3, **kwargs)
    expected = z_loss_composition(x, target, kwargs["weight"], kwargs["ignore_index"], "mean", 0.25, 0.3)
    assert torch.equal(got, expected)


def test_z_loss_with_an_ignore_index_beyond_the_classes(triton_device):
    """An ``ignore_index`` outside ``[0, C)`` with class weights: the composition's mean divisor
    never indexes the weights with it, and the kernels agree with it."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(6, 5, generator=gen).to(triton_device).requires_grad_()
    target = torch.tensor([0, 5, 2, 5, 4, 1]).to(triton_device)  # 5 == C: ignored
    weight = (torch.rand(5, generator=gen) + 0.5).to(triton_device)
    ours = cross_entropy(x, target, weight=weight, ignore_index=5, z_loss=0.1)
    expected = z_loss_composition(x.detach().double(), target, weight.double(), 5, "mean", 0.0, 0.1)
    assert_close(ours.detach(), expected.float(), "loss", LOSS_TOLERANCE)


# softcap (issue 21): every logit z read as c tanh(z / c) before the softmax (Gemma 2) -------------

SOFTCAP = 3.0  # make_inputs' logits (scale 4): many within c, many past it
# option set and extra keywords: plain, and everything with a z-loss (its lse the capped logits')
SOFTCAP_VARIANTS = {"plain": ("plain", {}), "all_z_loss": ("all", dict(z_loss=1e-2))}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("variant", SOFTCAP_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(6, 37), (3, 37, 2)], ids=["2d", "3d"])
def test_softcap_matches_the_composition(reduction, variant, dtype, shape, triton_device, sizes):
    """Values and gradients (grad_output != 1) against the fp64 composition (the logits capped,
    then ``F.cross_entropy`` or the z-loss composition), with class weights, label smoothing,
    ignored targets and a z-loss ("all_z_loss"), rows spanning several blocks."""
    sizes(16)
    options, extra = SOFTCAP_VARIANTS[variant]
    x, target, kwargs = make_inputs(shape, dtype, OPTIONS[options], triton_device)
    kwargs |= extra
    x.requires_grad_()
    loss = cross_entropy(x, target, reduction=reduction, softcap=SOFTCAP, **kwargs)
    gen = torch.Generator().manual_seed(3)
    go = torch.rand(loss.shape, generator=gen).to(triton_device, loss.dtype) + 0.5
    (grad,) = torch.autograd.grad(loss, x, go)
    ref_loss, ref_grad = reference(x.double(), target, go, reduction, softcap=SOFTCAP, **kwargs)
    uncapped, _ = reference(x.double(), target, go, reduction, **kwargs)
    assert not torch.allclose(ref_loss, uncapped, rtol=0.01), "the cap changes little here"
    assert loss.dtype == x.dtype and loss.shape == ref_loss.shape
    assert_close(loss.detach(), ref_loss, "loss", LOSS_TOLERANCE)
    assert_close(grad, ref_grad, "grad", LOSS_TOLERANCE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softcap_of_large_and_tiny_logits(dtype, triton_device, sizes):
    """Logits far past the cap (up to 1e30 and ±inf: ±c, their gradient 0, the loss finite as the
    composition's), around the tanh's switch between its series and its exponential form
    (|z / c| = 0.25 and 2^-5), and tiny ones (down to 1e-30 c): loss, lse (through the z-loss)
    and gradient of the fp64 composition, both passes and the target's logit capped."""
    sizes(16)
    c = 2.0
    ratios = [1e30, 1e4, 50.0, 8.0, 0.2501, 0.2499, 0.25, 0.03126, 0.03124, 0.03125, 1e-3, 1e-8, 1e-30, 0.0]
    row = torch.tensor([0.7, INF, -INF] + ratios + [-r for r in ratios], dtype=torch.float64) * c
    x = torch.stack([row, row.roll(5), row.flip(0), -row]).to(triton_device, dtype)
    target = torch.tensor([0, 1, 3, 10], device=triton_device)  # 0.7 c, inf -> c, 1e30 c, 0.25 c
    for kwargs in (dict(reduction="none"), dict(reduction="sum", z_loss=0.1, label_smoothing=0.1)):
        loss, grad = ours(x.clone().requires_grad_(), target, None, softcap=c, **kwargs)
        ref_loss, ref_grad = reference(x.double(), target, None, softcap=c, **kwargs)
        assert loss.isfinite().all() and grad.isfinite().all()
        assert_close(loss, ref_loss, "loss", LOSS_TOLERANCE)
        assert_close(grad, ref_grad, "grad", LOSS_TOLERANCE)
        assert torch.equal(grad[x.abs() >= 1e4 * c], torch.zeros_like(grad[x.abs() >= 1e4 * c]))


@triton.jit
def _tanh_kernel(x, out, n, COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    v = tl.load(x + offs, mask=offs < n, other=0).to(COMPUTE)
    tl.store(out + offs, tanh(v, COMPUTE), mask=offs < n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tanh_from_exp_is_accurate(dtype, triton_device):
    """``kernels.common.tanh`` (the softcap's; libdevice's returns None under the interpreter)
    within ``TANH_EPS`` of the exact tanh, relative, from the smallest normal numbers through
    both sides of its switch to the series (0.25, 2^-5) to saturation; ±inf, 0 and NaN as
    torch's."""
    eps = torch.finfo(dtype).eps
    magnitudes = torch.logspace(math.log10(torch.finfo(dtype).tiny), 3, 3001, dtype=torch.float64)
    edges = torch.tensor([0.25, 2.0**-5], dtype=torch.float64)
    edges = torch.cat([edges * (1 + k * eps) for k in (-2, -1, 0, 1, 2)])
    values = torch.cat([magnitudes, edges]).to(dtype)
    values = torch.cat([values, -values, torch.tensor([INF, -INF, 0.0, NAN], dtype=dtype)]).to(triton_device)
    out = torch.empty_like(values)
    _tanh_kernel[(1,)](values, out, values.numel(), COMPUTE=TL_DTYPE[dtype], BLOCK=8192)
    exact = torch.tanh(values.double())
    torch.testing.assert_close(out[-4:], exact[-4:].to(dtype), equal_nan=True, rtol=0, atol=0)
    nonzero = exact.isfinite() & (exact != 0)
    errors = ((out.double() - exact).abs() / exact.abs())[nonzero] / eps
    assert errors.max() <= TANH_EPS[dtype], (errors.max().item(), values[nonzero][errors.argmax()].item())


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_softcap_gradcheck_fp64(reduction, triton_device, sizes):
    sizes(8)
    x, target, kwargs = make_inputs((2, 5, 3), torch.float64, OPTIONS["all"], triton_device, scale=2.0)
    torch.autograd.gradcheck(
        lambda logits: cross_entropy(logits, target, reduction=reduction, softcap=1.5, z_loss=0.1, **kwargs),
        (x.requires_grad_(),),
        fast_mode=True,
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_softcap_create_graph_differentiates_the_composition(reduction, triton_device, sizes):
    sizes(16)
    x, target, kwargs = make_inputs((6, 37), torch.float64, OPTIONS["all"], triton_device)
    gen = torch.Generator().manual_seed(2)
    v = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(triton_device)
    go = torch.randn(target.shape if reduction == "none" else (), generator=gen, dtype=x.dtype)
    go = go.to(triton_device)
    options = dict(kwargs, reduction=reduction, softcap=SOFTCAP, z_loss=0.05)
    ours = hessian_vector_product(lambda z: cross_entropy(z, target, **options), x, v, go)
    theirs = hessian_vector_product(lambda z: cross_entropy_composition(z, target, **options), x, v, go)
    assert_close(ours[0], theirs[0], "grad", LOSS_TOLERANCE)
    assert_close(ours[1], theirs[1], "Hv", LOSS_TOLERANCE)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_softcap_all_ignored(reduction, triton_device):
    x = torch.randn(4, 5, device=triton_device, requires_grad=True)
    target = torch.full((4,), -100, device=triton_device)
    loss, grad = ours(x, target, None, reduction, softcap=1.0, z_loss=0.5)
    ref_loss, ref_grad = reference(x.double(), target, None, reduction, softcap=1.0, z_loss=0.5)
    assert_close(loss, ref_loss, "loss", LOSS_TOLERANCE)  # NaN for mean, 0 for sum, as the composition
    assert torch.equal(grad, torch.zeros_like(grad)) and torch.equal(ref_grad, torch.zeros_like(ref_grad))


def test_softcap_errors_and_module(triton_device):
    x = torch.randn(4, 5, device=triton_device, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3], device=triton_device)
    for bad in (0, 0.0, -1.0, NAN, INF, True, "30"):
        with pytest.raises(ValueError, match="softcap"):
            cross_entropy(x, target, softcap=bad)
        with pytest.raises(ValueError, match="softcap"):
            fusedopt.nn.FusedCrossEntropyLoss(softcap=bad)
    assert torch.equal(cross_entropy(x, target, softcap=None), cross_entropy(x, target))
    module = fusedopt.nn.FusedCrossEntropyLoss(label_smoothing=0.1, z_loss=0.25, softcap=30)
    assert module.softcap == 30.0 and fusedopt.nn.FusedCrossEntropyLoss().softcap is None
    expected = cross_entropy(x, target, label_smoothing=0.1, z_loss=0.25, softcap=30.0)
    assert torch.equal(module(x, target), expected)


def test_softcap_without_triton_is_the_composition(monkeypatch):
    """Tensors the kernels do not take run the composition (torch's ops)."""
    monkeypatch.setattr(ce, "runs_triton", lambda device: False)
    x, target, kwargs = make_inputs((5, 9), torch.float32, OPTIONS["all"], "cpu")
    got = cross_entropy(x, target, softcap=2.0, **kwargs)
    capped = 2.0 * torch.tanh(x / 2.0)
    assert torch.equal(got, F.cross_entropy(capped, target, **kwargs))
