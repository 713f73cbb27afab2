"""Fused linear + cross-entropy against the composition it replaces,
``F.cross_entropy(F.linear(input, W, b), target, ...)`` (``linear_cross_entropy_reference``).

The oracle is the composition in fp64 from the same values; fp32 results must be within the
loss contract of it, bf16/fp16 results within twice the composition's own error in that dtype
(``fusedopt.tolerance.LINEAR_CE_TOLERANCE``). On CPU the kernels run through the Triton
interpreter: shapes stay small, and ``chunk_rows`` is set low so that every case runs several
chunks (and a last, shorter one).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import CountOps, PeakMemory, Recorder

import fusedopt.losses._cross_entropy_launch as ce_launch
import fusedopt.losses._linear_cross_entropy_launch as launch
from fusedopt import functional as FF
from fusedopt import nn as fnn
from fusedopt.losses.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from fusedopt.testing import run_linear_cross_entropy
from fusedopt.tolerance import linear_ce_allowed_error

# The interpreter computes with numpy, which warns about the intended inf - inf and 1 / 0.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

HIDDEN, VOCAB = 24, 157  # V: no power of two, several column blocks of 64 (see the fixture below)


@dataclasses.dataclass(frozen=True)
class Options:
    bias: bool = False
    weight: bool = False  # class weights
    ignore_index: int = -100
    ignore_hits: bool = False  # some targets equal ignore_index
    label_smoothing: float = 0.0


OPTIONS = {
    "plain": Options(),
    "bias_ignore": Options(bias=True, ignore_hits=True),
    "weight": Options(weight=True, ignore_hits=True),
    "smooth": Options(label_smoothing=0.1, ignore_hits=True, bias=True),
    # a real class as ignore_index, with class weights, smoothing and bias together
    "all": Options(bias=True, weight=True, ignore_index=3, ignore_hits=True, label_smoothing=0.25),
}


def assert_linear_ce_close(ours, theirs, oracle, what):
    """The contract of ``LINEAR_CE_TOLERANCE``; NaN where the oracle has NaN, and only there."""
    if oracle.numel() == 0:
        return
    assert torch.equal(ours.isnan(), oracle.isnan()), what
    err = (ours.double() - oracle).abs().nan_to_num(0).max().item()
    allowed = linear_ce_allowed_error(oracle, theirs, ours.dtype)
    assert err <= allowed, (what, err, allowed)


# Token chunks of 4 rows, or the vocabulary order in blocks of 100 classes (two steps of the
# 64-column blocks of ``small_blocks``; V = 157: a second, shorter block).
ORDERS = {"tokens": dict(chunk_rows=4), "vocab": dict(chunk_classes=100)}


@pytest.fixture(params=list(ORDERS))
def order(request) -> dict:
    return ORDERS[request.param]


@pytest.fixture
def small_blocks(monkeypatch):
    """Column blocks of 64 in the cross-entropy row kernel: rows of V = 157 span three."""
    monkeypatch.setattr(ce_launch, "MAX_BLOCK", 64)


def make(lead, dtype, options: Options, device, seed=0, vocab=VOCAB, hidden=HIDDEN):
    """Inputs of the op: ``(input, linear_weight, target, linear_bias, kwargs)``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, hidden, generator=gen).to(device, dtype)
    w = (torch.randn(vocab, hidden, generator=gen) * 2 / hidden**0.5).to(device, dtype)
    b = torch.randn(vocab, generator=gen).to(device, dtype) if options.bias else None
    target = torch.randint(0, vocab, lead, generator=gen)
    if options.ignore_hits:
        target.view(-1)[::4] = options.ignore_index
    kwargs = dict(ignore_index=options.ignore_index, label_smoothing=options.label_smoothing)
    if options.weight:
        kwargs["weight"] = (torch.rand(vocab, generator=gen) + 0.5).to(device, dtype)
    return x, w, target.to(device), b, kwargs


def run(fn, x, w, target, b, grad_output=None, **kwargs):
    """Loss and gradients (input, weight, bias) of ``fn`` on leaf copies of the inputs."""
    loss, *grads = run_linear_cross_entropy(fn, x, w, target, b, grad_output, **kwargs)
    return loss, grads


def check(x, w, target, b, grad_output=None, **kwargs):
    """Ours against the composition: value and every gradient, and their dtypes."""
    if grad_output is not None:
        grad_output = grad_output.to(x.dtype)  # the values the op gets, for the fp64 oracle too
    ours = run_linear_cross_entropy(linear_cross_entropy, x, w, target, b, grad_output, **kwargs)
    kwargs.pop("chunk_rows", None), kwargs.pop("chunk_classes", None)
    theirs = run_linear_cross_entropy(linear_cross_entropy_reference, x, w, target, b, grad_output, **kwargs)
    oracle = run_linear_cross_entropy(
        linear_cross_entropy_reference, x, w, target, b, grad_output, torch.float64, **kwargs
    )
    names = ["value", "grad input", "grad weight", "grad bias"]
    for name, o, t, r in zip(names, ours, theirs, oracle, strict=False):  # no bias: 3
        assert o.dtype == t.dtype and o.shape == t.shape, name
        assert_linear_ce_close(o, t, r, name)


CASES = [
    (lead, dtype, reduction, options)
    for lead in [(19,), (3, 7)]
    for dtype in [torch.float32, torch.bfloat16]
    for reduction in ["mean", "sum", "none"]
    for options in OPTIONS
    if dtype == torch.float32 or options in ("plain", "all")
] + [((19,), torch.float16, reduction, "all") for reduction in ["mean", "none"]]


@pytest.mark.parametrize(
    "lead, dtype, reduction, options",
    CASES,
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v).removeprefix("torch."),
)
def test_matches_composition(lead, dtype, reduction, options, order, triton_device, small_blocks):
    x, w, target, b, kwargs = make(lead, dtype, OPTIONS[options], triton_device)
    gen = torch.Generator().manual_seed(5)
    go = torch.randn(lead, generator=gen).to(triton_device) if reduction == "none" else None
    check(x, w, target, b, go, reduction=reduction, **order, **kwargs)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", [(19,), (3, 7)], ids=["2d", "3d"])
def test_z_loss_matches_the_composition(lead, dtype, reduction, order, triton_device, small_blocks):
    """With ``z_loss`` (issue 21): the composition's value and gradients (its z-loss term from
    ``fusedopt.losses.cross_entropy.z_loss_composition``), class weights, smoothing and
    ignored tokens included, both loop orders."""
    x, w, target, b, kwargs = make(lead, dtype, OPTIONS["all"], triton_device)
    gen = torch.Generator().manual_seed(5)
    go = torch.randn(lead, generator=gen).to(triton_device) if reduction == "none" else None
    check(x, w, target, b, go, reduction=reduction, z_loss=0.02, **order, **kwargs)
    plain = linear_cross_entropy(x, w, target, b, reduction=reduction, **order, **kwargs)
    with_z = linear_cross_entropy(x, w, target, b, reduction=reduction, z_loss=0.02, **order, **kwargs)
    assert not torch.allclose(plain.float(), with_z.float()), "the z-loss changed nothing"


@pytest.mark.parametrize("chunks", [dict(chunk_rows=3), dict(chunk_classes=30)], ids=["tokens", "vocab"])
def test_z_loss_gradcheck_fp64_and_modules(chunks, triton_device, small_blocks):
    x, w, target, b, kwargs = make((7,), torch.float64, OPTIONS["all"], triton_device, vocab=67, hidden=5)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]

    def fn(x, w, b):
        return linear_cross_entropy(x, w, target, b, z_loss=0.1, **chunks, **kwargs)

    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)
    loss_module = fnn.FusedLinearCrossEntropyLoss(z_loss=0.1, **chunks)
    head = fnn.FusedLinearCrossEntropyHead(5, 67, z_loss=0.1, **chunks).to(triton_device, torch.float64)
    assert loss_module.z_loss == head.z_loss == 0.1 and "z_loss=0.1" in repr(head)
    expected = linear_cross_entropy_reference(x, head.weight, target, head.bias, z_loss=0.1)
    torch.testing.assert_close(head(x, target), expected)
    torch.testing.assert_close(
        loss_module(x, w, target, b), linear_cross_entropy_reference(x, w, target, b, z_loss=0.1)
    )
    with pytest.raises(ValueError, match="z_loss"):
        linear_cross_entropy(x, w, target, b, z_loss=-0.5)


SOFTCAP = 3.0  # make's logits (about 2 standard deviations, and a bias): many past the cap
# (input lead, dtype, options, reduction): each option set in each dtype, shape and reduction
SOFTCAP_CASES = {
    "2d-fp32-mean": ((19,), torch.float32, "plain", "mean"),
    "3d-fp32-z_loss-none": ((3, 7), torch.float32, "all_z_loss", "none"),
    "2d-fp32-z_loss-sum": ((19,), torch.float32, "all_z_loss", "sum"),
    "2d-bf16-z_loss-mean": ((19,), torch.bfloat16, "all_z_loss", "mean"),
    "3d-bf16-sum": ((3, 7), torch.bfloat16, "plain", "sum"),
    "3d-bf16-none": ((3, 7), torch.bfloat16, "plain", "none"),
}


@pytest.mark.parametrize("lead, dtype, variant, reduction", SOFTCAP_CASES.values(), ids=SOFTCAP_CASES)
def test_softcap_matches_the_composition(lead, dtype, variant, reduction, order, triton_device, small_blocks):
    """With ``softcap`` (issue 21): the fp64 composition's value and gradients (the logits
    capped, then cross-entropy; "all_z_loss": class weights, smoothing, bias, ignored tokens and
    a z-loss of the capped logits), grad_output != 1, both loop orders."""
    options = OPTIONS["all" if variant == "all_z_loss" else "plain"]
    x, w, target, b, kwargs = make(lead, dtype, options, triton_device)
    if variant == "all_z_loss":
        kwargs["z_loss"] = 0.02
    gen = torch.Generator().manual_seed(5)
    go = torch.randn(lead if reduction == "none" else (), generator=gen).to(triton_device)
    check(x, w, target, b, go, reduction=reduction, softcap=SOFTCAP, **order, **kwargs)
    uncapped = linear_cross_entropy_reference(x, w, target, b, reduction=reduction, **kwargs)
    capped = linear_cross_entropy_reference(x, w, target, b, reduction=reduction, softcap=SOFTCAP, **kwargs)
    assert not torch.allclose(uncapped.float(), capped.float(), rtol=0.01), "the cap changes little here"


def test_softcap_gradcheck_fp64(triton_device, small_blocks):
    """The vocabulary order (its lse from the log-sum-exp kernel, the gradient from the row
    kernel's pass 2 as in the token order)."""
    x, w, target, b, kwargs = make((4,), torch.float64, OPTIONS["all"], triton_device, vocab=40, hidden=5)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]

    def fn(x, w, b):
        return linear_cross_entropy(x, w, target, b, z_loss=0.1, softcap=1.5, chunk_classes=16, **kwargs)

    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)


@pytest.mark.parametrize("chunks", [dict(chunk_rows=3), dict(chunk_classes=30)], ids=["tokens", "vocab"])
def test_softcap_modules_and_errors(chunks, triton_device, small_blocks):
    x, w, target, b, _ = make((7,), torch.float64, OPTIONS["plain"], triton_device, vocab=67, hidden=5)
    loss_module = fnn.FusedLinearCrossEntropyLoss(softcap=1.5, **chunks)
    head = fnn.FusedLinearCrossEntropyHead(5, 67, softcap=2, **chunks).to(triton_device, torch.float64)
    assert loss_module.softcap == 1.5 and head.softcap == 2.0 and "softcap=2.0" in repr(head)
    assert fnn.FusedLinearCrossEntropyLoss().softcap is None
    expected = linear_cross_entropy_reference(x, head.weight, target, head.bias, softcap=2.0)
    torch.testing.assert_close(head(x, target), expected)
    torch.testing.assert_close(
        loss_module(x, w, target, b), linear_cross_entropy_reference(x, w, target, b, softcap=1.5)
    )
    for bad in (0.0, -1.0, float("inf"), float("nan"), True, "2"):
        with pytest.raises(ValueError, match="softcap"):
            linear_cross_entropy(x, w, target, b, softcap=bad)
        with pytest.raises(ValueError, match="softcap"):
            fnn.FusedLinearCrossEntropyHead(5, 67, softcap=bad)
        with pytest.raises(ValueError, match="softcap"):
            fnn.FusedLinearCrossEntropyLoss(softcap=bad)


def test_softcap_without_triton_is_the_composition(monkeypatch):
    """Where the kernels do not run: the logits capped, then torch's cross-entropy."""
    import fusedopt.losses.linear_cross_entropy as module

    monkeypatch.setattr(module, "runs_triton", lambda device: False)
    x, w, target, b, kwargs = make((5,), torch.float32, OPTIONS["all"], "cpu")
    capped = 1.5 * torch.tanh(F.linear(x, w, b) / 1.5)
    expected = F.cross_entropy(capped, target, **kwargs)
    torch.testing.assert_close(linear_cross_entropy(x, w, target, b, softcap=1.5, **kwargs), expected)


def test_softcap_all_tokens_ignored_and_large_logits(order, triton_device, small_blocks):
    """Every token ignored (the mean: NaN, as the composition's); then logits far past the cap
    (x scaled by 1e4: tanh saturated, their gradients through the cap 0) and ±inf ones (±c)."""
    x, w, target, b, kwargs = make((6,), torch.float64, OPTIONS["all"], triton_device)
    options = dict(softcap=SOFTCAP, z_loss=0.01, **order, **kwargs)
    ignored = torch.full_like(target, kwargs["ignore_index"])
    ours = run(linear_cross_entropy, x, w, ignored, b, **options)
    options.pop("chunk_rows", None), options.pop("chunk_classes", None)
    theirs = run(linear_cross_entropy_reference, x, w, ignored, b, **options)
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    x = x * 1e4
    x[2, 0] = float("inf")  # logits ±inf where w[:, 0] != 0
    check(x, w, target, b, None, **options, **order)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_output_not_one(reduction, dtype, order, triton_device, small_blocks):
    x, w, target, b, kwargs = make((13,), dtype, OPTIONS["all"], triton_device)
    go = torch.tensor(-1.25, device=triton_device)
    check(x, w, target, b, go, reduction=reduction, **order, **kwargs)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunks", [dict(chunk_rows=3), dict(chunk_classes=30)], ids=["tokens", "vocab"])
def test_gradcheck_fp64(reduction, chunks, triton_device, small_blocks):
    x, w, target, b, kwargs = make((7,), torch.float64, OPTIONS["all"], triton_device, vocab=67, hidden=5)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]

    def fn(x, w, b):
        return linear_cross_entropy(x, w, target, b, reduction=reduction, **chunks, **kwargs)

    # fast mode: the Jacobian checked along random directions (2 evaluations per direction in
    # the interpreter, instead of one per input element)
    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_chunk_equals_many(reduction, dtype, triton_device):
    """The chunk size changes the order of the weight gradient's fp32 sum, nothing else."""
    x, w, target, b, kwargs = make((37,), dtype, OPTIONS["all"], triton_device)
    go = torch.randn(37).to(triton_device) if reduction == "none" else None
    chunks = [dict(chunk_rows=37), dict(chunk_rows=5), dict(chunk_rows=1), dict(chunk_classes=37)]
    results = [
        run(linear_cross_entropy, x, w, target, b, go, reduction=reduction, **c, **kwargs) for c in chunks
    ]
    for loss, grads in results[1:]:
        torch.testing.assert_close(
            loss, results[0][0], rtol=1e-6, atol=1e-6
        )  # the logits' matmuls differ in shape
        for g, g0 in zip(grads, results[0][1], strict=True):
            if dtype == torch.float32:
                torch.testing.assert_close(g, g0, rtol=1e-5, atol=1e-6)
            else:  # the fp32 sums differ in order; their bf16 rounding by at most one step
                torch.testing.assert_close(g, g0, rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_tokens_ignored(reduction, order, triton_device):
    x, w, target, b, kwargs = make((6,), torch.float32, OPTIONS["all"], triton_device)
    target.fill_(kwargs["ignore_index"])
    ours = run(linear_cross_entropy, x, w, target, b, reduction=reduction, **order, **kwargs)
    theirs = run(linear_cross_entropy_reference, x, w, target, b, reduction=reduction, **kwargs)
    torch.testing.assert_close(ours[0], theirs[0], equal_nan=True)  # mean: 0 / 0 = NaN, as torch
    for g, r in zip(ours[1], theirs[1], strict=True):
        torch.testing.assert_close(g, r, equal_nan=True)


@pytest.mark.parametrize("lead", [(), (0,), (2, 0)], ids=["1d", "empty", "empty3d"])
def test_degenerate_inputs(lead, order, triton_device):
    """A single token (1-D input, 0-d target) and no token at all."""
    for reduction in ("mean", "sum", "none"):
        x, w, target, b, kwargs = make(lead, torch.float32, OPTIONS["bias_ignore"], triton_device)
        check(x, w, target, b, reduction=reduction, **order, **kwargs)


def test_non_contiguous_operands(order, triton_device, small_blocks):
    x, w, target, b, kwargs = make((9, 2), torch.float32, OPTIONS["all"], triton_device)
    x = x.transpose(0, 1)  # (2, 9, H) with strided rows
    w = torch.cat([w, w], 1)[:, ::2]  # strided columns
    check(x, w, target.t(), b, **order, **kwargs)


def test_deterministic(order, triton_device):
    x, w, target, b, kwargs = make((29,), torch.bfloat16, OPTIONS["all"], triton_device)
    first, again = (run(linear_cross_entropy, x, w, target, b, **order, **kwargs) for _ in range(2))
    assert torch.equal(first[0], again[0])
    assert all(torch.equal(g, h) for g, h in zip(first[1], again[1], strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_logits_buffers_padding_never_reaches_a_result(
    dtype, order, triton_device, small_blocks, monkeypatch
):
    """The logits buffer's rows are padded to 16 elements and the weight-gradient matmul reads
    them to the padding: uninitialized memory there (NaN here) must not reach any result."""
    new_empty = torch.Tensor.new_empty

    def poisoned(self, *args, **kwargs):
        out = new_empty(self, *args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned)
    x, w, target, b, kwargs = make((11,), dtype, OPTIONS["all"], triton_device)  # V = 157: 3 padding columns
    check(x, w, target, b, reduction="sum", **order, **kwargs)


def test_weight_gradient_accumulates_in_fp32(triton_device):
    """bf16 weights: the gradient is the fp32 sum over the chunks rounded once, not a bf16 sum
    rounded at every chunk (which a 1-row chunk would make 16 roundings)."""
    x, w, target, _b, _kwargs = make((16,), torch.bfloat16, Options(), triton_device)
    _, (_, gw) = run(linear_cross_entropy, x, w, target, None, chunk_rows=1)
    _, (_, gw_one) = run(linear_cross_entropy, x, w, target, None, chunk_rows=16)
    exact = run(linear_cross_entropy_reference, x.double(), w.double(), target, None)[1][1]
    err_many = (gw.double() - exact).abs().max()
    err_one = (gw_one.double() - exact).abs().max()
    assert err_many <= 1.5 * err_one + 1e-6, (err_many, err_one)


class CountMatmuls(CountOps):
    def matmuls(self) -> int:
        return sum(op.split(".")[1] in ("mm", "addmm", "addmm_") for op in self.ops)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("chunks", [dict(chunk_rows=4), dict(chunk_classes=60)], ids=["tokens", "vocab"])
def test_gradients_only_when_autograd_records(reduction, chunks, triton_device):
    """Per chunk (of 4 rows, or of 60 classes): one matmul for the logits; two more for the
    gradients only when autograd records, and only those of the tensors that require grad.
    Recomputed logits: one more per chunk in the backward of none (token order), and in the
    gradient pass of the vocabulary order."""
    x, w, target, _b, _kwargs = make((12,), torch.float32, OPTIONS["plain"], triton_device)
    chunks_run = 3  # 12 rows / 4, or 157 classes / 60

    def count(grad_mode: bool, *requires: bool) -> tuple[int, torch.Tensor]:
        xs, ws = (t.detach().clone().requires_grad_(r) for t, r in zip((x, w), requires, strict=True))
        with torch.set_grad_enabled(grad_mode), CountMatmuls() as ops:
            loss = linear_cross_entropy(xs, ws, target, reduction=reduction, **chunks)
            if loss.requires_grad:
                loss.sum().backward()
        return ops.matmuls()

    assert count(False, True, True) == chunks_run
    assert count(True, False, False) == chunks_run
    recomputed = chunks_run if reduction == "none" or "chunk_classes" in chunks else 0
    assert count(True, True, True) == 3 * chunks_run + recomputed
    assert count(True, False, True) == 2 * chunks_run + recomputed


@pytest.mark.parametrize(
    "x_dtype, w_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)],
    ids=["fp32-params", "bf16-all", "bf16-hidden-fp32-params"],
)
def test_autocast_matches_the_composition(x_dtype, w_dtype, triton_device):
    """Under autocast: bf16 matmuls, an fp32 loss (from the same bf16 logits), gradients in
    each tensor's own dtype."""
    x, w, target, b, kwargs = make((3, 5), torch.float32, OPTIONS["all"], triton_device)
    x, w, b = x.to(x_dtype), w.to(w_dtype), b.to(w_dtype)
    with torch.autocast(triton_device, dtype=torch.bfloat16):
        ours = run(linear_cross_entropy, x, w, target, b, chunk_rows=4, **kwargs)
        theirs = run(linear_cross_entropy_reference, x, w, target, b, **kwargs)
    assert ours[0].dtype == theirs[0].dtype == torch.float32
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    for g, r in zip(ours[1], theirs[1], strict=True):
        assert g.dtype == r.dtype
        # torch rounds the logits' gradient to bf16 as we do, and its weight gradient once more
        # for bf16 weights; ours sums it in fp32
        torch.testing.assert_close(g.float(), r.float(), rtol=2**-7, atol=2**-7 * r.abs().max().item())


def test_backward_twice_with_retain_graph(triton_device):
    x, w, target, _b, kwargs = make((10,), torch.float32, OPTIONS["all"], triton_device)
    for reduction in ("mean", "none"):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = linear_cross_entropy(xs, ws, target, reduction=reduction, chunk_rows=4, **kwargs)
        go = torch.full_like(loss, 0.5)
        first = torch.autograd.grad(loss, (xs, ws), go, retain_graph=True)
        first = [g.clone() for g in first]
        second = torch.autograd.grad(loss, (xs, ws), 2 * go)
        for g1, g2 in zip(first, second, strict=True):
            torch.testing.assert_close(g2, 2 * g1)


@pytest.mark.parametrize(
    "make_args, error",
    [
        (lambda d: (torch.randn(4, 5), torch.randn(7, 6), torch.zeros(4, dtype=torch.long)), RuntimeError),
        (
            lambda d: (torch.randn(4, 5), torch.randn(7, 5).bfloat16(), torch.zeros(4, dtype=torch.long)),
            RuntimeError,
        ),
        (lambda d: (torch.randn(4, 5), torch.randn(7, 5), torch.zeros(3, dtype=torch.long)), ValueError),
        (
            lambda d: (torch.randn(2, 3, 5), torch.randn(7, 5), torch.zeros(2, 4, dtype=torch.long)),
            RuntimeError,
        ),
        (lambda d: (torch.randn(4, 5), torch.randn(7, 5), torch.zeros(4)), RuntimeError),
        (lambda d: (torch.randn(()), torch.randn(7, 5), torch.zeros((), dtype=torch.long)), RuntimeError),
    ],
    ids=["hidden-mismatch", "dtype-mismatch", "batch-mismatch", "target-shape", "float-target", "0d-input"],
)
def test_invalid_arguments_raise_as_the_composition(make_args, error, triton_device):
    args = [t.to(triton_device) for t in make_args(triton_device)]
    with pytest.raises(error):
        linear_cross_entropy_reference(*args)
    with pytest.raises(error):
        linear_cross_entropy(*args)


def test_invalid_options(triton_device):
    x, w, target, _b, _kwargs = make((4,), torch.float32, Options(), triton_device)
    with pytest.raises(ValueError, match="is not a valid value for reduction"):
        linear_cross_entropy(x, w, target, reduction="avg")
    with pytest.raises(RuntimeError, match="label_smoothing must be between"):
        linear_cross_entropy(x, w, target, label_smoothing=1.5)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk_rows"):
            linear_cross_entropy(x, w, target, chunk_rows=bad)
        with pytest.raises(ValueError, match="chunk_classes"):
            linear_cross_entropy(x, w, target, chunk_classes=bad)
    with pytest.raises(ValueError, match="not both"):
        linear_cross_entropy(x, w, target, chunk_rows=2, chunk_classes=8)


@pytest.mark.parametrize("bad", [VOCAB, -1])
def test_target_out_of_range_raises_index_error_as_the_composition(bad, order, triton_device):
    """Issue 18: an out-of-range target raised ``RuntimeError`` where the composition (torch)
    raises ``IndexError``: its type and message, in both loop orders."""
    if triton_device == "cuda":
        pytest.skip("a device-side assert (torch's CUDA behaviour too) poisons the CUDA context")
    x, w, target, _b, _kwargs = make((4,), torch.float32, Options(), triton_device)
    target[1] = bad
    with pytest.raises(IndexError) as theirs:
        linear_cross_entropy_reference(x, w, target)
    with pytest.raises(IndexError, match=rf"^{re.escape(str(theirs.value))}$"):
        linear_cross_entropy(x.requires_grad_(), w, target, **order)


def test_default_chunk_rule():
    """About N H / V rows (the chunk's logits the size of the input), in multiples of 256."""
    assert launch.chunk_rows(8192, 4096, 128256) == 512
    assert launch.chunk_rows(8192, 4096, 32000) == 1280
    assert launch.chunk_rows(100, 64, 50000) == 100  # never more than N
    assert launch.chunk_rows(4096, 16, 32000) == 256


def test_other_devices_use_the_composition(monkeypatch, device):
    """Where the kernels do not run, the op is the composition (and takes its errors)."""
    import fusedopt.losses.linear_cross_entropy as module

    monkeypatch.setattr(module, "runs_triton", lambda device: False)
    x, w, target, b, kwargs = make((5,), torch.float32, OPTIONS["all"], device)
    with CountOps() as ops:
        ours = run(linear_cross_entropy, x, w, target, b, **kwargs)
    assert any("log_softmax" in op for op in ops.ops)
    theirs = run(linear_cross_entropy_reference, x, w, target, b, **kwargs)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


# Faces ---------------------------------------------------------------------------------------


def test_loss_module(triton_device):
    x, w, target, b, kwargs = make((8,), torch.float32, OPTIONS["all"], triton_device)
    module = fnn.FusedLinearCrossEntropyLoss(
        kwargs["weight"], ignore_index=kwargs["ignore_index"], label_smoothing=kwargs["label_smoothing"],
        reduction="sum", chunk_rows=3,
    )  # fmt: skip
    stock = torch.nn.CrossEntropyLoss(
        kwargs["weight"], ignore_index=kwargs["ignore_index"], label_smoothing=kwargs["label_smoothing"],
        reduction="sum",
    )  # fmt: skip
    assert dict(module.named_buffers()).keys() == dict(stock.named_buffers()).keys()
    torch.testing.assert_close(module(x, w, target, b), stock(F.linear(x, w, b), target))
    assert FF.linear_cross_entropy is linear_cross_entropy


@pytest.mark.parametrize("chunks", [dict(chunk_rows=5), dict(chunk_classes=50)], ids=["tokens", "vocab"])
def test_head_module_is_a_linear(chunks, triton_device):
    torch.manual_seed(0)
    head = fnn.FusedLinearCrossEntropyHead(HIDDEN, VOCAB, device=triton_device, label_smoothing=0.1, **chunks)
    linear = torch.nn.Linear(HIDDEN, VOCAB, device=triton_device)
    linear.load_state_dict(head.state_dict())  # same parameters and keys
    x = torch.randn(2, 6, HIDDEN, device=triton_device)
    target = torch.randint(0, VOCAB, (2, 6), device=triton_device)
    torch.testing.assert_close(head(x), linear(x))  # no target: the logits
    ref = F.cross_entropy(linear(x).movedim(-1, 1), target, label_smoothing=0.1)
    torch.testing.assert_close(head(x, target), ref)


def test_small_language_model_trains_like_the_unfused_one(triton_device, small_blocks):
    """Embedding → MLP → head, AdamW for 6 steps: losses and every parameter as the unfused
    model (nn.Linear + nn.CrossEntropyLoss)."""
    vocab, width = 97, 16

    def model(head):
        torch.manual_seed(0)
        trunk = torch.nn.Sequential(
            torch.nn.Embedding(vocab, width), torch.nn.Linear(width, width), torch.nn.GELU()
        )
        return trunk.to(triton_device), head.to(triton_device)

    torch.manual_seed(0)
    fused = model(fnn.FusedLinearCrossEntropyHead(width, vocab, chunk_rows=7))
    plain = model(torch.nn.Linear(width, vocab))
    plain[1].load_state_dict(fused[1].state_dict())
    plain[0].load_state_dict(fused[0].state_dict())
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (4, 9), generator=gen).to(triton_device)
    losses = {}
    for name, (trunk, head) in {"fused": fused, "plain": plain}.items():
        params = [*trunk.parameters(), *head.parameters()]
        opt = torch.optim.AdamW(params, lr=1e-2)
        losses[name] = []
        for _ in range(6):
            hidden = trunk(tokens[:, :-1])
            if name == "fused":
                loss = head(hidden, tokens[:, 1:])
            else:
                loss = F.cross_entropy(head(hidden).movedim(-1, 1), tokens[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    torch.testing.assert_close(losses["fused"], losses["plain"], rtol=1e-5, atol=1e-5)
    assert losses["fused"][-1] < losses["fused"][0] - 0.1  # it trains
    for p, q in zip(
        [*fused[0].parameters(), *fused[1].parameters()],
        [*plain[0].parameters(), *plain[1].parameters()],
        strict=True,
    ):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


# Memory --------------------------------------------------------------------------------------


def test_never_holds_more_than_a_chunk_of_logits(triton_device, monkeypatch, capsys):
    """N = 1024 tokens, V = 32000 classes, fp32: the composition holds its N x V logits (and
    their log-softmax and gradient); the fused op one chunk of them (the default chunk: 256
    rows here, a quarter of the tokens), plus the gradients it returns. Whole column rows per
    program in the interpreter (one block of 32768) keep this test to seconds."""
    monkeypatch.setattr(ce_launch, "MAX_BLOCK", 32768)
    monkeypatch.setattr(ce_launch, "MAX_TILE", 32768)
    n, hidden, vocab = 1024, 16, 32000
    x, w, target, b, kwargs = make(
        (n,), torch.float32, OPTIONS["bias_ignore"], triton_device, vocab=vocab, hidden=hidden
    )
    logits_bytes = n * vocab * 4
    chunk = launch.chunk_rows(n, hidden, vocab)
    peaks = {}
    for name, fn in (("fused", linear_cross_entropy), ("composition", linear_cross_entropy_reference)):
        with PeakMemory() as mem:
            loss, grads = run(fn, x, w, target, b, **kwargs)
            del loss, grads
        peaks[name] = mem.peak
    grads_bytes = (n * hidden + vocab * hidden + vocab) * 4
    assert peaks["fused"] <= 1.25 * chunk * vocab * 4 + 2 * grads_bytes + 8 * n * 4, peaks
    assert peaks["composition"] >= 2 * logits_bytes
    with capsys.disabled():
        print(
            f"\npeak memory, N={n} H={hidden} V={vocab} fp32: fused {peaks['fused'] / 2**20:.1f} MiB "
            f"(chunk {chunk} rows: {chunk * vocab * 4 / 2**20:.1f} MiB of logits), composition "
            f"{peaks['composition'] / 2**20:.1f} MiB; ratio {peaks['fused'] / peaks['composition']:.3f}"
        )


def test_vocabulary_order_holds_no_weight_sized_fp32_buffer(triton_device, capsys):
    """bf16, N = 256, H = 128, V = 4096: token chunks sum the weight's gradient in a V x H fp32
    buffer (twice the bf16 gradient); the vocabulary order writes each block's gradient once and
    holds at most N x block logits and an N x H fp32 sum of the input's gradient."""
    n, hidden, vocab, block = 256, 128, 4096, 256
    x, w, target, _b, _kwargs = make(
        (n,), torch.bfloat16, Options(), triton_device, vocab=vocab, hidden=hidden
    )
    peaks, largest = {}, {}
    for name, chunks in (("tokens", {}), ("vocab", dict(chunk_classes=block))):
        with PeakMemory() as mem:
            loss, grads = run(linear_cross_entropy, x, w, target, None, **chunks)
            del loss, grads
        peaks[name], largest[name] = mem.peak, mem.largest
    accumulator = vocab * hidden * 4
    assert largest["tokens"] == accumulator
    assert largest["vocab"] == vocab * hidden * 2  # the bf16 gradient itself
    leaves = grads = (n * hidden + vocab * hidden) * 2  # the copies run() differentiates; the gradients
    assert peaks["vocab"] <= leaves + grads + n * block * 2 + n * hidden * 4 + 16 * n * 4, peaks
    assert peaks["vocab"] < peaks["tokens"] - accumulator / 2, peaks
    with capsys.disabled():
        print(
            f"\npeak memory, N={n} H={hidden} V={vocab} bf16: token chunks {peaks['tokens'] / 2**20:.1f} MiB, "
            f"vocabulary order (blocks of {block}) {peaks['vocab'] / 2**20:.1f} MiB"
        )


# torch.compile ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reduction, extra",
    [("mean", {}), ("none", {}), ("none", dict(softcap=SOFTCAP, z_loss=0.01))],
    ids=["mean", "none", "none-softcap_z_loss"],
)
def test_compile_fullgraph(reduction, extra, order, triton_device):
    """No graph break; the forward (and none's backward) run as the fusedopt ops; loss and
    gradients as eager."""
    torch._dynamo.reset()
    x, w, target, b, kwargs = make((2, 5), torch.float32, OPTIONS["all"], triton_device)
    kwargs |= extra

    def fn(x, w, target, b):
        return FF.linear_cross_entropy(x, w, target, b, reduction=reduction, **order, **kwargs)

    recorder = Recorder()
    compiled = torch.compile(fn, backend=recorder.backend, fullgraph=True)
    go = torch.randn(2, 5).to(triton_device) if reduction == "none" else None
    ours = run(compiled, x, w, target, b, go)
    eager = run(fn, x, w, target, b, go)
    backward = {"fusedopt::linear_cross_entropy_backward"} if reduction == "none" else set()
    assert recorder.graphs == [{"fusedopt::linear_cross_entropy"}, backward]
    torch.testing.assert_close(ours, eager, rtol=1e-6, atol=1e-6)


def test_compiled_head_module(triton_device):
    """A model whose head is FusedLinearCrossEntropyHead compiles whole (fullgraph), as eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.ModuleDict(
        {
            "embed": torch.nn.Embedding(VOCAB, HIDDEN),
            "head": fnn.FusedLinearCrossEntropyHead(HIDDEN, VOCAB, chunk_rows=5),
        }
    ).to(triton_device)
    tokens = torch.randint(0, VOCAB, (2, 9), device=triton_device)

    def step(tokens):
        return model["head"](model["embed"](tokens[:, :-1]), tokens[:, 1:])

    recorder = Recorder()
    results = []
    for fn in (torch.compile(step, backend=recorder.backend, fullgraph=True), step):
        loss = fn(tokens)
        results.append([loss, *torch.autograd.grad(loss, list(model.parameters()))])
    assert recorder.graphs == [{"fusedopt::linear_cross_entropy"}, set()]
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-6)


def test_opcheck(triton_device):
    x, w, target, b, kwargs = make((6,), torch.float32, OPTIONS["all"], triton_device)
    utils = ("test_schema", "test_faketensor")
    f32 = torch.float32
    for block in (0, 100):  # token chunks of 4 rows; blocks of 100 classes
        args = (
            x,
            w,
            b,
            target,
            kwargs["weight"],
            3,
            "mean",
            0.25,
            0.01,
            2.5,
            4,
            block,
            True,
            True,
            True,
            f32,
            f32,
        )
        torch.library.opcheck(launch.forward.op, args, test_utils=utils)
        _, _, _, _, stats, lse = launch.forward(*args[:6], "none", *args[7:])
        go = torch.randn(6).to(triton_device)
        back = (
            x,
            w,
            b,
            target,
            kwargs["weight"],
            stats,
            lse,
            go,
            3,
            0.25,
            0.01,
            2.5,
            4,
            block,
            True,
            True,
            True,
            f32,
        )
        torch.library.opcheck(launch.backward_none.op, back, test_utils=utils)


# CUDA only -------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("chunks", [{}, dict(chunk_classes=4096)], ids=["tokens", "vocab"])
def test_cuda_no_host_sync_and_a_fraction_of_the_peak_memory(reduction, chunks):
    """bf16, N = 8192, H = 512, V = 32000: forward + backward without a host sync, and a peak
    (above the inputs) under a quarter of the composition's."""
    x, w, target, b, kwargs = make(
        (8192,), torch.bfloat16, OPTIONS["bias_ignore"], "cuda", vocab=32000, hidden=512
    )
    go = torch.randn(8192, device="cuda") if reduction == "none" else None
    peaks = {}
    fused = functools.partial(linear_cross_entropy, **chunks)
    for name, fn in (("fused", fused), ("composition", linear_cross_entropy_reference)):
        run(fn, x, w, target, b, go, reduction=reduction, **kwargs)  # warm up (compiles the kernels)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        if name == "fused":
            torch.cuda.set_sync_debug_mode("error")
        try:
            run(fn, x, w, target, b, go, reduction=reduction, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
    assert peaks["fused"] < 0.25 * peaks["composition"], peaks


# Issue 18: non-finite logits, create_graph, interpreter warnings -------------------------------

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("options", ["plain", "all"])
def test_non_finite_logits_give_the_composition_nan(options, reduction, order, triton_device, small_blocks):
    """Issue 18: a NaN logit that was not the target was dropped from the log-sum-exp: a
    finite loss where the composition's is NaN, in both loop orders. A NaN weight row (a NaN
    logit in every token), then NaN/+inf/-inf hidden states in single tokens: the
    composition's loss and gradients, NaN exactly where its are."""
    x, w, target, b, kwargs = make((10,), torch.float64, OPTIONS[options], triton_device)
    target[target == 150] = 0
    w[150, 3] = NAN  # logit 150 of every token: not a target
    check(x, w, target, b, None, reduction=reduction, **order, **kwargs)
    w[150, 3] = 0.0
    x[1, 0], x[6, 2] = NAN, INF  # every logit of those tokens NaN or ±inf
    x[8] = 0.0
    w[7] = -INF  # logit 7 of token 8 is NaN (0 * -inf); -inf for the others with x[:, k] > 0
    target[target == 7] = 2
    check(x, w, target, b, None, reduction=reduction, **order, **kwargs)


def hessian_vector_products(fn, x, w, v, vw, target, grad_output, **kwargs):
    """Both gradients with ``create_graph=True``, then the gradient of ``<g_x, v> + <g_w, vw>``."""
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    gx, gw = torch.autograd.grad(fn(x, w, target, **kwargs), (x, w), grad_output, create_graph=True)
    hx, hw = torch.autograd.grad((gx * v).sum() + (gw * vw).sum(), (x, w))
    return gx, gw, hx, hw


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_create_graph_gives_the_composition_second_derivatives(reduction, order, triton_device):
    """Issue 18: ``create_graph=True`` through the fused loss silently gave first-order-only
    gradients (double backward, MAML, Hessian-vector products wrong). Gradients and a
    Hessian-vector product w.r.t. input and weight, both loop orders, against the composition."""
    x, w, target, _b, kwargs = make((9,), torch.float64, OPTIONS["weight"], triton_device, vocab=13)
    gen = torch.Generator().manual_seed(3)
    v, vw = (
        torch.randn(x.shape, generator=gen, dtype=x.dtype),
        torch.randn(w.shape, generator=gen, dtype=x.dtype),
    )
    go = torch.randn(target.shape, generator=gen, dtype=x.dtype) if reduction == "none" else torch.tensor(0.5)
    args = (x, w, v.to(triton_device), vw.to(triton_device), target, go.to(triton_device))
    ours = hessian_vector_products(linear_cross_entropy, *args, reduction=reduction, **order, **kwargs)
    theirs = hessian_vector_products(linear_cross_entropy_reference, *args, reduction=reduction, **kwargs)
    for o, t, what in zip(ours, theirs, ("grad input", "grad weight", "Hv input", "Hv weight"), strict=True):
        torch.testing.assert_close(o, t, rtol=1e-9, atol=1e-12, msg=what)


def test_kernels_raise_no_runtime_warning(order, triton_device, small_blocks):
    """Issue 18: the interpreter printed "RuntimeWarning: invalid value encountered in subtract"
    from the cross-entropy kernels (-inf - (-inf) on masked lanes; in the vocabulary order also
    a log of 0). Every option set and reduction, forward and backward, in both loop orders,
    with RuntimeWarning an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for options in OPTIONS:
            for reduction in ("mean", "none"):
                x, w, target, b, kwargs = make((7,), torch.float32, OPTIONS[options], triton_device)
                loss = linear_cross_entropy(
                    x.requires_grad_(), w, target, b, reduction=reduction, **order, **kwargs
                )
                loss.sum().backward()
                assert x.grad.isfinite().all()
