"""Fused ``mean`` and regression losses against ``torch.nn.functional``: values, gradients,
dtypes, shapes, warnings, errors, the saved-gradient backward and the ``nn`` faces.

Oracles: fp32/fp64 inputs are compared with torch's op run on the same tensors; bf16/fp16
inputs with torch's op run in fp32 on the same (upcast) values, rounded to the dtype (torch's
own low-precision losses compute differently, so they only give the expected dtype and shape).
"""

from __future__ import annotations

import inspect
import re
import warnings

import pytest
import torch
import torch.nn.functional as TF
from helpers import Launches, record_launches
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fusedopt.losses.pointwise
from fusedopt import functional as F
from fusedopt import nn as fnn
from fusedopt.kernels import losses as kernels
from fusedopt.testing import LOW_PRECISION, assert_close
from fusedopt.tolerance import LOSS_TOLERANCE

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
REDUCTIONS = ["mean", "sum", "none"]
OPS = ["mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss"]
WEIGHTED_OPS = ["mse_loss", "l1_loss", "huber_loss"]

# Shapes of the value/gradient matrix: 0-d, one element, odd sizes, empty, and "strided": an
# input that is a [:, ::2] view and a target that is a transposed matrix.
SHAPES = [(), (1,), (7,), (0, 3), (33, 65), (4, 3, 129), (1024, 17), "strided"]
GRAD_SCALE = -1.25  # grad_output of a reduced loss; exact in every dtype


# Helpers ---------------------------------------------------------------------------------------


def oracle_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in LOW_PRECISION else dtype


def make_pair(shape, dtype, device, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and target leaves requiring grad (``shape`` "strided": non-contiguous both)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return torch.randn(s, generator=gen).to(device=device, dtype=dtype)

    if shape == "strided":
        x, y = rnd(33, 130)[:, ::2], rnd(65, 33).t()
        assert not x.is_contiguous() and not y.is_contiguous()
    else:
        x, y = rnd(*shape), rnd(*shape)
    return x.requires_grad_(), y.requires_grad_()


def ref_leaf(t: torch.Tensor) -> torch.Tensor:
    """An independent leaf with ``t``'s values, in the oracle's dtype."""
    return t.detach().to(oracle_dtype(t.dtype)).clone().requires_grad_(t.requires_grad)


def backward_through(loss: torch.Tensor, g: torch.Tensor | None) -> None:
    """The loss inside a larger expression: grad_output is ``GRAD_SCALE`` (reduced) or ``g``."""
    if g is None:
        (GRAD_SCALE * loss).backward()
    else:
        (loss * g.to(loss.dtype)).sum().backward()


def compare_loss(name, x, y, reduction, what, **kwargs) -> None:
    """Our op and torch's on the same values: loss, dtype, shape, and both gradients."""
    xr, yr = ref_leaf(x), ref_leaf(y)
    ours = getattr(F, name)(x, y, reduction=reduction, **kwargs)
    expected = getattr(TF, name)(xr, yr, reduction=reduction, **kwargs)
    in_dtype = getattr(TF, name)(x.detach(), y.detach(), reduction=reduction, **kwargs)
    assert ours.dtype == in_dtype.dtype and ours.shape == in_dtype.shape, what
    assert_close(ours, expected, f"{what} loss", LOSS_TOLERANCE)
    g = None
    if reduction == "none":
        gen = torch.Generator().manual_seed(7)
        g = torch.randn(ours.shape, generator=gen).to(device=ours.device, dtype=ours.dtype)
    backward_through(ours, g)
    backward_through(expected, g)
    for mine, ref, which in ((x, xr, "input"), (y, yr, "target")):
        assert mine.grad is not None, f"{what}: no {which} grad"
        assert mine.grad.dtype == mine.dtype and mine.grad.shape == mine.shape, f"{what} {which} grad"
        assert_close(mine.grad, ref.grad, f"{what} {which} grad", LOSS_TOLERANCE)


def raised(fn, *args, **kwargs) -> BaseException:
    with pytest.raises(Exception) as info:  # the oracle's error, whatever it is
        fn(*args, **kwargs)
    return info.value


def assert_same_error(ours, theirs, *args, **kwargs) -> None:
    expected = raised(theirs, *args, **kwargs)
    with pytest.raises(type(expected), match=re.escape(str(expected))):
        ours(*args, **kwargs)


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.fixture
def loss_launches(monkeypatch) -> Launches:
    """The launches of every loss kernel; ``.counts`` by kernel name."""
    names = (
        "pointwise_loss_kernel",
        "sum_rows_kernel",
        "pointwise_loss_backward_kernel",
        "scale_grad_kernel",
    )
    return record_launches(monkeypatch, {name: getattr(kernels, name) for name in names})


# 1. Values and gradients -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", OPS)
def test_matches_torch(name, reduction, dtype, device):
    for shape in SHAPES:
        x, y = make_pair(shape, dtype, device)
        compare_loss(name, x, y, reduction, f"{name} {reduction} {dtype} {shape}")


# 2. Weights ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", WEIGHTED_OPS)
def test_weighted_matches_torch(name, reduction, dtype, triton_device):
    device = triton_device
    x, y = make_pair((33, 65), dtype, device)
    gen = torch.Generator().manual_seed(3)
    w = (torch.rand(33, 65, generator=gen) + 0.5).to(device=device, dtype=dtype)
    xr, yr, wr = ref_leaf(x), ref_leaf(y), w.to(oracle_dtype(dtype))
    ours = getattr(F, name)(x, y, reduction=reduction, weight=w)
    expected = getattr(TF, name)(xr, yr, reduction=reduction, weight=wr)
    in_dtype = getattr(TF, name)(x.detach(), y.detach(), reduction=reduction, weight=w)
    assert ours.dtype == in_dtype.dtype and ours.shape == in_dtype.shape
    assert_close(ours, expected, f"weighted {name} {reduction}", LOSS_TOLERANCE)
    g = None if reduction != "none" else torch.randn_like(ours)
    backward_through(ours, g)
    backward_through(expected, g)
    assert_close(x.grad, xr.grad, "input grad", LOSS_TOLERANCE)
    assert_close(y.grad, yr.grad, "target grad", LOSS_TOLERANCE)


@pytest.mark.parametrize("name", WEIGHTED_OPS)
def test_weight_of_another_dtype(name, device):
    """torch promotes the loss to the weight's dtype. (torch computes the unweighted loss in the
    input's fp32 first, fusedopt all in fp64: compare at fp32 precision.)"""
    x, y = make_pair((7,), torch.float32, device)
    w = torch.linspace(0.5, 2.0, 7, dtype=torch.float64, device=device)
    for reduction in REDUCTIONS:
        ours = getattr(F, name)(x, y, reduction=reduction, weight=w)
        expected = getattr(TF, name)(x, y, reduction=reduction, weight=w)
        assert ours.dtype == expected.dtype, f"{name} {reduction}"
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-7, msg=f"{name} {reduction}")


@pytest.mark.parametrize("name", WEIGHTED_OPS)
def test_weight_size_mismatch(name, device):
    x, y = make_pair((4, 5), torch.float32, device)
    for w in (torch.ones(5, device=device), torch.ones(4, 6, device=device)):
        assert_same_error(getattr(F, name), getattr(TF, name), x, y, weight=w)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", WEIGHTED_OPS)
def test_weight_requiring_grad_falls_back(name, reduction, device, loss_launches):
    x, y = make_pair((5, 7), torch.float32, device)
    w = torch.rand(5, 7, device=device).add_(0.5).requires_grad_()
    xr, yr, wr = ref_leaf(x), ref_leaf(y), ref_leaf(w)
    ours = getattr(F, name)(x, y, reduction=reduction, weight=w)
    expected = getattr(TF, name)(xr, yr, reduction=reduction, weight=wr)
    assert_close(ours, expected, "loss", LOSS_TOLERANCE)
    ours.sum().backward()
    expected.sum().backward()
    for mine, ref, which in ((x, xr, "input"), (y, yr, "target"), (w, wr, "weight")):
        assert_close(mine.grad, ref.grad, f"{which} grad", LOSS_TOLERANCE)
    assert len(loss_launches) == 0, "a weight requiring grad must go to torch's op"


# 3. Loss parameters and the points where the loss changes branch -----------------------------


def boundary_pair(param, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random pairs, plus differences of exactly +-param and 0 (target 0), and of +-param as
    near as the dtype allows (target +-1)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(61, generator=gen) * 2
    y = torch.randn(61, generator=gen)
    exact = torch.tensor([param, -param, 0.0, 0.0, param, -param], dtype=torch.float64)
    y_exact = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, -1.0], dtype=torch.float64)
    x = torch.cat([x.to(dtype), (exact + y_exact).to(dtype)]).to(device)
    y = torch.cat([y.to(dtype), y_exact.to(dtype)]).to(device)
    return x.requires_grad_(), y.requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("smooth_l1_loss", dict(beta=0.5)),
        ("smooth_l1_loss", dict(beta=1.0)),
        ("smooth_l1_loss", dict(beta=0.0)),
        ("huber_loss", dict(delta=0.3)),
        ("huber_loss", dict(delta=2.0)),
    ],
    ids=str,
)
def test_loss_parameters(name, kwargs, reduction, dtype, device):
    (param,) = kwargs.values()
    x, y = boundary_pair(param, dtype, device)
    if dtype != torch.bfloat16 and param in (0.5, 1.0, 2.0, 0.0):  # exactly representable
        d = (x - y).detach()[-6:]
        assert bool((d.abs()[[0, 1, 4, 5]] == param).all())
    compare_loss(name, x, y, reduction, f"{name}{kwargs} {reduction} {dtype}", **kwargs)


@pytest.mark.parametrize(
    "name,kwargs", [("smooth_l1_loss", dict(beta=-1.0)), ("huber_loss", dict(delta=0.0))]
)
def test_bad_loss_parameter(name, kwargs, device):
    x, y = make_pair((3,), torch.float32, device)
    assert_same_error(getattr(F, name), getattr(TF, name), x, y, **kwargs)


# 4. Broadcasting -------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", OPS)
def test_broadcast_warns_and_matches(name, reduction, triton_device):
    device = triton_device
    for x_shape, y_shape in (((33, 65), (65,)), ((65,), (33, 65))):
        gen = torch.Generator().manual_seed(11)
        x = torch.randn(x_shape, generator=gen).to(device).requires_grad_()
        y = torch.randn(y_shape, generator=gen).to(device).requires_grad_()
        xr, yr = ref_leaf(x), ref_leaf(y)
        with warnings.catch_warnings(record=True) as theirs:
            warnings.simplefilter("always")
            expected = getattr(TF, name)(xr, yr, reduction=reduction)
        assert len(theirs) == 1
        with pytest.warns(UserWarning, match=re.escape(str(theirs[0].message))) as ours_w:
            ours = getattr(F, name)(x, y, reduction=reduction)
        assert [w.filename for w in ours_w] == [__file__], "the warning must point at the caller"
        what = f"{name} {reduction} {x_shape} vs {y_shape}"
        assert ours.shape == expected.shape, what
        assert_close(ours, expected, what, LOSS_TOLERANCE)
        g = None if reduction != "none" else torch.randn(ours.shape, generator=gen).to(device)
        backward_through(ours, g)
        backward_through(expected, g)
        assert_close(x.grad, xr.grad, f"{what} input grad", LOSS_TOLERANCE)
        assert_close(y.grad, yr.grad, f"{what} target grad", LOSS_TOLERANCE)


@pytest.mark.parametrize("name", OPS)
def test_not_broadcastable(name, device):
    x, y = torch.randn(33, 65, device=device), torch.randn(64, device=device)
    with pytest.warns(UserWarning):
        expected = raised(getattr(TF, name), x, y)
    assert isinstance(expected, RuntimeError)
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match=re.escape(str(expected))):
        getattr(F, name)(x, y)


# 5. Bad reduction ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,weighted", [(name, False) for name in OPS] + [(name, True) for name in WEIGHTED_OPS], ids=str
)
def test_bad_reduction(name, weighted, device):
    x, y = make_pair((3, 4), torch.float32, device)
    kwargs = {"weight": torch.ones(3, 4, device=device)} if weighted else {}
    for reduction in ("bad", "Mean", ""):
        assert_same_error(getattr(F, name), getattr(TF, name), x, y, reduction=reduction, **kwargs)


@pytest.mark.parametrize("name", OPS)
def test_deprecated_elementwise_mean(name, device):
    """torch still takes reduction="elementwise_mean": a warning, then the mean."""
    x, y = make_pair((4, 5), torch.float32, device)
    xr, yr = ref_leaf(x), ref_leaf(y)
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        expected = getattr(TF, name)(xr, yr, reduction="elementwise_mean")
    with warnings.catch_warnings(record=True) as ours_w:
        warnings.simplefilter("always")
        ours = getattr(F, name)(x, y, reduction="elementwise_mean")
    assert [str(w.message) for w in ours_w] == [str(w.message) for w in theirs]
    assert_close(ours, expected, "loss", LOSS_TOLERANCE)
    ours.backward()
    expected.backward()
    assert_close(x.grad, xr.grad, "input grad", LOSS_TOLERANCE)


@pytest.mark.parametrize("name", ["mse_loss", "l1_loss", "smooth_l1_loss"])
def test_legacy_reduction_arguments(name, device):
    x, y = make_pair((4, 5), torch.float32, device)
    for legacy in (dict(size_average=False), dict(reduce=False), dict(size_average=True, reduce=True)):
        with warnings.catch_warnings(record=True) as theirs:
            warnings.simplefilter("always")
            expected = getattr(TF, name)(x, y, **legacy)
        with warnings.catch_warnings(record=True) as ours_w:
            warnings.simplefilter("always")
            ours = getattr(F, name)(x, y, **legacy)
        assert [str(w.message) for w in ours_w] == [str(w.message) for w in theirs], legacy
        assert_close(ours, expected, f"{name} {legacy}", LOSS_TOLERANCE)


# 6. gradcheck ----------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("mse_loss", {}),
        ("l1_loss", {}),
        ("smooth_l1_loss", {}),
        ("smooth_l1_loss", dict(beta=0.5)),
        ("huber_loss", {}),
        ("huber_loss", dict(delta=0.5)),
    ],
    ids=str,
)
def test_gradcheck(name, kwargs, reduction, device):
    gen = torch.Generator().manual_seed(2)
    y = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    # differences on both sides of every kink (0, +-0.5, +-1), none within 0.1 of one
    d = torch.tensor([[-2.1, -0.8, -0.2], [0.3, 0.7, 1.7]], dtype=torch.float64)
    x = (y + d).to(device).requires_grad_()
    y = y.to(device).requires_grad_()
    op = getattr(F, name)
    assert torch.autograd.gradcheck(lambda a, b: op(a, b, reduction=reduction, **kwargs), (x, y))


@pytest.mark.parametrize(
    "kwargs", [{}, dict(dim=1), dict(dim=-1, keepdim=True), dict(dim=(0, 2)), dict(dim=(2, -3), keepdim=True)]
)
def test_gradcheck_mean(kwargs, device):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 2, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    # fast mode (a random projection of the Jacobian): one row per kept element is slow to interpret
    assert torch.autograd.gradcheck(lambda a: F.mean(a, **kwargs), (x,), fast_mode=True)


# 7-8. mean -------------------------------------------------------------------------------------


def test_tutorial(device):
    x = torch.ones(2, 2, requires_grad=True, device=device)
    out = F.mean(3 * (x + 2) ** 2)
    assert out.shape == () and out.item() == 27.0
    out.backward()
    assert torch.equal(x.grad, torch.full((2, 2), 4.5, device=device))


MEAN_CASES = [
    ((4, 3, 129), {}),
    ((7,), {}),
    ((), {}),
    ((), dict(dim=0)),
    ((), dict(dim=-1, keepdim=True)),
    ((33, 65), dict(dim=1)),
    ((33, 65), dict(dim=0, keepdim=True)),
    ((4, 3, 129), dict(dim=-1)),
    ((4, 3, 129), dict(dim=(0, 2))),
    ((4, 3, 129), dict(dim=(-1, 0), keepdim=True)),
    ((4, 3, 5), dict(dim=[1])),  # one row per kept element: small, the interpreter is slow
    ((2, 3, 4), dict(dim=())),  # torch: every dimension
    ((1024, 17), dict(dim=0)),
    ((7,), dict(dtype=torch.float64)),
    ((33, 65), dict(dim=1, keepdim=True, dtype=torch.float64)),
    ((0,), {}),  # NaN
    ((0, 3), dict(dim=0)),  # NaN per column
    ((3, 0), dict(dim=0)),  # empty result
    ((3, 0), dict(dim=1)),  # NaN per row
    ("strided", dict(dim=0)),
    ("strided", {}),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,kwargs", MEAN_CASES, ids=str)
def test_mean_matches_torch(shape, kwargs, dtype, device):
    gen = torch.Generator().manual_seed(1)
    if shape == "strided":  # not dense: every other row of a matrix, transposed
        x = torch.randn(130, 33, generator=gen).to(device=device, dtype=dtype)[::2].t()
        assert x.stride() == (1, 66)
    else:
        x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    x.requires_grad_()
    # With dtype= torch upcasts first: its own op in that dtype is the oracle.
    xr = x.detach().clone().requires_grad_() if "dtype" in kwargs else ref_leaf(x)
    ours = F.mean(x, **kwargs)
    expected = torch.mean(xr, **kwargs)
    in_dtype = torch.mean(x.detach(), **kwargs)
    assert ours.dtype == in_dtype.dtype and ours.shape == in_dtype.shape
    assert_close(ours, expected, "mean", LOSS_TOLERANCE)
    g = torch.randn(ours.shape, generator=gen).to(device=device, dtype=ours.dtype)
    (ours * g).sum().backward()
    (expected * g.to(expected.dtype)).sum().backward()
    assert x.grad.dtype == x.dtype and x.grad.shape == x.shape
    assert_close(x.grad, xr.grad, "mean grad", LOSS_TOLERANCE)


@pytest.mark.parametrize(
    "make,kwargs",
    [
        (lambda d: torch.arange(6, device=d), {}),  # int without dtype
        (lambda d: torch.arange(6, device=d).reshape(2, 3), dict(dim=1)),
        (lambda d: torch.randn(2, 3, device=d), dict(dim=2)),
        (lambda d: torch.randn(2, 3, device=d), dict(dim=(0, -2))),
        (lambda d: torch.randn(2, 3, device=d), dict(dim=(1, 1))),
        (lambda d: torch.randn((), device=d), dict(dim=1)),
    ],
)
def test_mean_errors(make, kwargs, device):
    assert_same_error(F.mean, torch.mean, make(device), **kwargs)


def test_mean_int_with_dtype(device):
    x = torch.arange(6, device=device).reshape(2, 3)
    assert torch.equal(F.mean(x, dim=1, dtype=torch.float32), torch.mean(x, dim=1, dtype=torch.float32))


def test_mean_backward_writes_no_memory(triton_device):
    """A full mean's gradient is ``grad / K`` broadcast: every stride 0, no buffer of K elements."""
    x = torch.randn(33, 65, device=triton_device, requires_grad=True)
    (g,) = torch.autograd.grad(F.mean(x), x)
    assert g.stride() == (0, 0)
    assert torch.equal(g, torch.full_like(x, 1 / x.numel()))


# 9. No gradient buffer unless autograd will use it ---------------------------------------------


class Allocations(TorchDispatchMode):
    """Sizes of the tensors allocated by aten's factory and copy ops while the mode is on."""

    OPS = frozenset(
        getattr(torch.ops.aten, name)
        for name in (
            "empty",
            "empty_like",
            "empty_strided",
            "new_empty",
            "new_empty_strided",
            "zeros",
            "zeros_like",
            "ones_like",
            "full_like",
            "clone",
            "_to_copy",
        )
    )

    def __init__(self):
        super().__init__()
        self.numels: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in self.OPS:
            self.numels.append(out.numel())
        return out


def input_sized_allocations(fn, x) -> int:
    with Allocations() as log:
        fn()
    return log.numels.count(x.numel())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", OPS)
def test_no_gradient_buffer_without_autograd(name, reduction, triton_device):
    x, y = make_pair((33, 65), torch.float32, triton_device)
    op = getattr(F, name)

    def forward(a, b):
        return lambda: op(a, b, reduction=reduction)

    # Control: the method sees the buffer when autograd needs it (input, or only target, needs grad).
    assert input_sized_allocations(forward(x, y), x) == 1
    assert input_sized_allocations(forward(x.detach(), y), x) == 1
    with torch.no_grad():
        assert input_sized_allocations(forward(x, y), x) == 0, "no_grad"
    with torch.inference_mode():
        assert input_sized_allocations(forward(x, y), x) == 0, "inference_mode"
    assert input_sized_allocations(forward(x.detach(), y.detach()), x) == 0, "nothing requires grad"
    # "none" stores nothing ahead: the only input-sized tensor is the loss itself.
    assert input_sized_allocations(lambda: op(x, y, reduction="none"), x) == 1


# 10. The saved gradient and grad_output --------------------------------------------------------


def test_scale_saved_grad_skips_unit_factor(triton_device):
    """With grad_output == 1 the kernel stores nothing: a NaN payload, which any arithmetic
    (even * 1) would change, survives bit for bit."""
    bits = torch.full((3000,), 0x7F800001, dtype=torch.int32)  # signalling NaN
    bits[::2] = torch.arange(1500, dtype=torch.int32) + 0x3F800000  # 1.0, 1.0000001, ...
    for grad_output, changes in ((1.0, False), (3.0, True)):
        grad = bits.clone().view(torch.float32).to(triton_device)
        fusedopt.losses.pointwise.scale_saved_grad(grad, torch.tensor(grad_output, device=triton_device))
        after = grad.cpu().view(torch.int32)
        assert torch.equal(after, bits) != changes, grad_output
        if changes:
            expected = bits.view(torch.float32)[::2] * 3.0
            assert torch.equal(grad.cpu()[::2], expected)


def test_unit_grad_output_scales_nothing(triton_device, monkeypatch):
    seen = []
    original = fusedopt.losses.pointwise.scale_saved_grad

    def spy(grad, grad_output):
        before = grad.clone()
        out = original(grad, grad_output)
        seen.append((before, grad.clone()))
        return out

    monkeypatch.setattr(fusedopt.losses.pointwise, "scale_saved_grad", spy)
    x, y = make_pair((33, 65), torch.float32, triton_device)
    expected = (2 * (x - y) / x.numel()).detach()

    F.mse_loss(x, y).backward()
    (before, after) = seen[-1]
    assert_close(before, expected, "gradient written by forward", LOSS_TOLERANCE)
    assert torch.equal(before, after), "grad_output 1 must leave the saved gradient alone"
    assert_close(x.grad, expected, "input grad", LOSS_TOLERANCE)

    x.grad = y.grad = None
    (3 * F.mse_loss(x, y)).backward()
    assert len(seen) == 2
    (before, after) = seen[-1]
    assert_close(before, expected, "gradient written by forward", LOSS_TOLERANCE)
    assert not torch.equal(before, after)
    assert_close(after, 3 * expected, "scaled gradient", LOSS_TOLERANCE)
    assert_close(x.grad, 3 * expected, "input grad", LOSS_TOLERANCE)
    assert_close(y.grad, -3 * expected, "target grad", LOSS_TOLERANCE)


@pytest.mark.parametrize(
    "factors", [(1.0, 2.5, 1.0, -0.5, 3.0), (2.0, 0.0, 3.0), (0.0, 1.0)], ids=["nonzero", "zero", "zero-one"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", OPS)
def test_retain_graph_backward_twice(name, reduction, dtype, factors, device):
    x, y = make_pair((33, 65), dtype, device)
    xr, yr = ref_leaf(x), ref_leaf(y)
    ours = getattr(F, name)(x, y, reduction=reduction)
    expected = getattr(TF, name)(xr, yr, reduction=reduction)
    for i, c in enumerate(factors):
        last = i == len(factors) - 1
        gx, gy = torch.autograd.grad(c * ours, (x, y), retain_graph=not last)
        rx, ry = torch.autograd.grad(c * expected, (xr, yr), retain_graph=not last)
        assert_close(gx, rx, f"input grad, backward {i} (grad_output {c})", LOSS_TOLERANCE)
        assert_close(gy, ry, f"target grad, backward {i} (grad_output {c})", LOSS_TOLERANCE)


def test_grad_does_not_alias_saved_buffer(device):
    """x.grad from the first backward must not change when a second backward rescales the
    buffer that forward wrote."""
    x, y = make_pair((33, 65), torch.float32, device)
    loss = F.mse_loss(x, y, reduction="sum")
    loss.backward(retain_graph=True)
    first_x, first_y = x.grad.clone(), y.grad.clone()
    torch.autograd.grad(4 * loss, (x, y))
    assert torch.equal(x.grad, first_x) and torch.equal(y.grad, first_y)


# 11. nn faces ----------------------------------------------------------------------------------

MODULES = [
    (nn.MSELoss, fnn.FusedMSELoss, {}),
    (nn.L1Loss, fnn.FusedL1Loss, {}),
    (nn.SmoothL1Loss, fnn.FusedSmoothL1Loss, dict(beta=0.5)),
    (nn.SmoothL1Loss, fnn.FusedSmoothL1Loss, dict(size_average=False)),
    (nn.HuberLoss, fnn.FusedHuberLoss, dict(delta=0.7)),
    (nn.HuberLoss, fnn.FusedHuberLoss, dict(reduction="sum", delta=2.0)),
]


@pytest.mark.parametrize("stock,fused,kwargs", MODULES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_module_in_training_loop(stock, fused, kwargs, device):
    assert issubclass(fused, stock) and fused is not stock
    assert inspect.signature(fused) == inspect.signature(stock), "same constructor arguments"
    criteria = [quiet(stock, **kwargs), quiet(fused, **kwargs)]
    assert vars(criteria[0]).keys() == vars(criteria[1]).keys()
    for key in ("reduction", "beta", "delta"):
        assert getattr(criteria[0], key, None) == getattr(criteria[1], key, None)
    gen = torch.Generator().manual_seed(9)
    data = torch.randn(32, 5, generator=gen).to(device)
    target = torch.randn(32, 3, generator=gen).to(device)
    runs = []
    for criterion in criteria:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        losses = []
        for _ in range(5):
            opt.zero_grad()
            loss = criterion(model(data), target)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        runs.append((torch.stack(losses), [p.detach() for p in model.parameters()]))
    (ref_losses, ref_params), (losses, params) = runs
    assert_close(losses, ref_losses, "losses", LOSS_TOLERANCE)
    for i, (p, q) in enumerate(zip(params, ref_params, strict=True)):
        assert_close(p, q, f"param {i}", LOSS_TOLERANCE)


# 12. The kernels run (and the fallbacks do not) ------------------------------------------------


@pytest.mark.parametrize("name", OPS)
def test_kernels_launched(name, triton_device, loss_launches):
    x, y = make_pair((33, 65), torch.float32, triton_device)
    op = getattr(F, name)
    (2 * op(x, y)).backward()
    assert loss_launches.counts == {"pointwise_loss_kernel": 1, "sum_rows_kernel": 1, "scale_grad_kernel": 1}
    loss_launches.clear()
    (op(x, y, reduction="none") * 2).sum().backward()
    assert loss_launches.counts == {"pointwise_loss_kernel": 1, "pointwise_loss_backward_kernel": 1}


def test_mean_kernels_launched(triton_device, loss_launches):
    x = torch.randn(4, 3, 129, device=triton_device, requires_grad=True)
    F.mean(x, dim=(0, 2)).sum().backward()
    assert loss_launches.counts == {"pointwise_loss_kernel": 1, "sum_rows_kernel": 1}


class Tagged(torch.Tensor):
    """A tensor subclass: the fused ops leave it to torch."""


@pytest.mark.parametrize("name", OPS)
def test_fallbacks_launch_nothing(name, device, loss_launches):
    op, ref = getattr(F, name), getattr(TF, name)
    ints = torch.arange(6, device=device), torch.arange(6, device=device).flip(0)
    assert_same_error(op, ref, *ints)
    cplx = (
        torch.randn(6, dtype=torch.complex64, device=device),
        torch.zeros(6, dtype=torch.complex64, device=device),
    )
    if name == "l1_loss":  # torch takes complex here
        assert torch.equal(op(*cplx), ref(*cplx))
    else:
        assert_same_error(op, ref, *cplx)
    x, y = make_pair((6,), torch.float32, device)
    tx = x.detach().as_subclass(Tagged)
    ours, expected = op(tx, y.detach()), ref(tx, y.detach())
    assert type(ours) is type(expected) is Tagged
    assert torch.equal(ours.as_subclass(torch.Tensor), expected.as_subclass(torch.Tensor))
    assert len(loss_launches) == 0


def test_mixed_dtypes(device):
    """fp32 input, fp64 target: torch's result dtype and value."""
    x, y = make_pair((7,), torch.float32, device)
    y = y.detach().double()
    for name in OPS:
        for reduction in REDUCTIONS:
            ours = getattr(F, name)(x, y, reduction=reduction)
            expected = getattr(TF, name)(x, y, reduction=reduction)
            assert ours.dtype == expected.dtype, f"{name} {reduction}: {ours.dtype} vs {expected.dtype}"
            assert_close(ours, expected, f"{name} {reduction}", LOSS_TOLERANCE)


# 13. Determinism -------------------------------------------------------------------------------


def test_deterministic(device):
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(100_000, generator=gen).to(device).requires_grad_()
    y = torch.randn(100_000, generator=gen).to(device)
    for fn in (lambda: F.mse_loss(x, y), lambda: F.mean(x)):
        first, second = fn(), fn()
        assert torch.equal(first.view(torch.int32), second.view(torch.int32))


# 14. Non-finite values, loss parameters, create_graph, autocast, dtype= (issue 18) -------------

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("huber_loss", {}),
        ("huber_loss", dict(delta=0.5)),
        ("smooth_l1_loss", dict(beta=0.5)),
        ("mse_loss", {}),
        ("l1_loss", {}),
    ],
    ids=str,
)
def test_nan_input_gets_torch_gradient_not_delta(name, kwargs, reduction, triton_device):
    """Issue 18: the Huber loss gave a NaN input the gradient ±delta (its clamp was a min/max,
    which drops NaN); torch's is NaN. NaN and ±inf inputs and targets: torch's loss and both
    gradients, for every loss."""
    x = torch.tensor([0.5, NAN, -3.0, INF, 2.0, -INF, NAN, 0.25], device=triton_device)
    y = torch.tensor([0.0, 1.0, NAN, 0.0, INF, 1.0, -2.0, 0.0], device=triton_device)
    compare_loss(name, x.requires_grad_(), y.requires_grad_(), reduction, f"{name} {reduction}", **kwargs)


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("huber_loss", dict(delta=NAN)),
        ("smooth_l1_loss", dict(beta=NAN)),
        ("huber_loss", dict(delta=-0.5)),
        ("smooth_l1_loss", dict(beta=-0.5)),
    ],
    ids=str,
)
def test_nan_or_negative_delta_or_beta_raises_as_torch(name, kwargs, device):
    """Issue 18: ``delta=nan`` (Huber) and ``beta=nan`` (SmoothL1) were accepted (a NaN loss);
    torch raises. The functional and the module faces raise torch's error type and message."""
    x, y = make_pair((3,), torch.float32, device)
    assert_same_error(getattr(F, name), getattr(TF, name), x, y, **kwargs)
    fused, stock = {"huber_loss": (fnn.FusedHuberLoss, nn.HuberLoss)}.get(
        name, (fnn.FusedSmoothL1Loss, nn.SmoothL1Loss)
    )
    assert_same_error(fused(**kwargs), stock(**kwargs), x, y)


HVP_CASES = [
    ("mse_loss", {}),
    ("mse_loss", dict(weight=True)),
    ("l1_loss", {}),
    ("smooth_l1_loss", dict(beta=0.5)),
    ("huber_loss", dict(delta=0.7)),
    ("huber_loss", dict(delta=0.7, weight=True)),
]


def hessian_vector_products(op, x, y, v, grad_output, **kwargs):
    """``(g_x, g_y, H v)``: both gradients with ``create_graph=True``, then the gradient of
    ``<g_x, v> + <g_y, -v>`` w.r.t. both (a Hessian-vector product)."""
    x, y = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    gx, gy = torch.autograd.grad(op(x, y, **kwargs), (x, y), grad_output, create_graph=True)
    hx, hy = torch.autograd.grad((gx * v).sum() - (gy * v).sum(), (x, y))
    return gx, gy, hx, hy


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name,kwargs", HVP_CASES, ids=str)
def test_create_graph_hessian_vector_product_matches_torch(name, kwargs, reduction, triton_device):
    """Issue 18: ``create_graph=True`` through a fused loss gave first-order-only gradients (no
    graph: double backward, MAML and Hessian-vector products went wrong or raised). The
    gradients and a Hessian-vector product w.r.t. input and target, against torch's."""
    gen = torch.Generator().manual_seed(18)
    x, y, v = (torch.randn(5, 7, generator=gen).to(triton_device) for _ in range(3))
    kwargs = dict(kwargs, reduction=reduction)
    if kwargs.pop("weight", False):
        kwargs["weight"] = torch.rand(5, 7, generator=gen).to(triton_device) + 0.5
    go = (
        torch.randn(5, 7, generator=gen).to(triton_device)
        if reduction == "none"
        else torch.tensor(GRAD_SCALE)
    )
    ours = hessian_vector_products(getattr(F, name), x, y, v, go, **kwargs)
    theirs = hessian_vector_products(getattr(TF, name), x, y, v, go, **kwargs)
    for o, t, what in zip(ours, theirs, ("grad input", "grad target", "Hv input", "Hv target"), strict=True):
        assert_close(o, t, f"{name} {reduction} {what}", LOSS_TOLERANCE)


AUTOCAST_PAIRS = {"same": (None, None), "target fp32": (None, torch.float32), "weighted": (None, None)}


@pytest.mark.parametrize("pair", list(AUTOCAST_PAIRS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", OPS)
def test_autocast_runs_the_loss_in_fp32_as_torch(name, reduction, dtype, pair, triton_device):
    """Issue 18: under autocast mse/l1/smooth_l1/huber returned bf16/fp16 where torch (they are
    on autocast's fp32 list) returns fp32, and an fp16 ``reduction="sum"`` overflowed to inf.
    Loss dtype and value as torch's under the same autocast; gradients in the inputs' dtypes,
    torch's fp32 gradient rounded to them."""
    if pair == "weighted" and name == "smooth_l1_loss":
        pytest.skip("smooth_l1_loss takes no weight")
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(33, 65, generator=gen) * 300).to(triton_device, dtype)  # squares beyond fp16
    y = torch.randn(33, 65, generator=gen).to(triton_device, AUTOCAST_PAIRS[pair][1] or dtype)
    kwargs = dict(reduction=reduction)
    if pair == "weighted":
        kwargs["weight"] = (torch.rand(33, 65, generator=gen) + 0.5).to(triton_device)  # fp32
    x, y = x.requires_grad_(), y.requires_grad_()
    xr, yr = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    with torch.autocast(triton_device, dtype=dtype):
        ours = getattr(F, name)(x, y, **kwargs)
        theirs = getattr(TF, name)(xr, yr, **kwargs)
    assert ours.dtype == theirs.dtype == torch.float32 and ours.shape == theirs.shape
    if pair != "weighted" or name == "huber_loss":  # torch's weighted MSE / L1 overflow in fp16
        assert ours.isfinite().all()
    assert_close(ours, theirs, "loss", LOSS_TOLERANCE)
    g = torch.randn(ours.shape, generator=gen).to(triton_device) if reduction == "none" else GRAD_SCALE
    (ours * g).sum().backward()
    (theirs * g).sum().backward()
    for mine, ref, which in ((x, xr, "input"), (y, yr, "target")):
        assert mine.grad.dtype == mine.dtype, which
        assert_close(mine.grad, ref.grad, f"{which} grad", LOSS_TOLERANCE)


@pytest.mark.parametrize(
    "in_dtype,dtype",
    [
        (torch.float64, torch.bfloat16),
        (torch.float64, torch.float16),
        (torch.float64, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float16, torch.bfloat16),
    ],
    ids=str,
)
def test_mean_dtype_narrower_than_input_as_torch(in_dtype, dtype, device):
    """Issue 18: ``mean(fp64_tensor, dtype=torch.bfloat16)`` failed in the kernel (an fp64
    sum stored as bf16). torch takes the mean of the input's values and rounds it once to
    ``dtype`` (it does not round the values first, whatever its docs say), and its gradient is
    ``grad_output / K`` in ``dtype`` cast to the input's: torch's dtype, shape and gradient
    (bit for bit), the value within the contract of the exact mean."""
    gen = torch.Generator().manual_seed(6)
    x = (torch.randn(5, 37, generator=gen, dtype=torch.float64) * 3).to(device, in_dtype).requires_grad_()
    for kwargs in ({}, dict(dim=1), dict(dim=0, keepdim=True)):
        xr = x.detach().clone().requires_grad_()
        ours, theirs = F.mean(x, dtype=dtype, **kwargs), torch.mean(xr, dtype=dtype, **kwargs)
        assert ours.dtype == theirs.dtype == dtype and ours.shape == theirs.shape, kwargs
        assert_close(ours, torch.mean(x.detach().double(), **kwargs), f"mean {kwargs}", LOSS_TOLERANCE)
        g = torch.randn(ours.shape, generator=gen).to(device, dtype)
        x.grad = None
        (ours * g).sum().backward()
        (theirs * g).sum().backward()
        assert x.grad.dtype == in_dtype
        assert torch.equal(x.grad, xr.grad), kwargs
