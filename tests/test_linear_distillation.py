"""Fused linear distillation loss against its composition (``linear_distillation_reference``:
both heads' ``F.linear``, the divergence from their ``log_softmax``; issue 21 item 3).

The oracle is the composition in fp64 from the same values; fp32 results must be within the
linear-CE contract of it, bf16 results within twice the composition's own error in that dtype
(``fusedopt.tolerance.LINEAR_DISTILLATION_TOLERANCE``). On CPU the kernels run through the
Triton interpreter: shapes stay small, chunks of 4 tokens (the ``chunks`` fixture; the public
signature has no chunk argument) and column blocks of 64 (``small_blocks``), so that every case
runs several chunks, the last shorter, and rows of several blocks, the last partial.
"""

from __future__ import annotations

import pytest
import torch
from helpers import PeakMemory, Recorder

import fusedopt.losses._cross_entropy_launch as ce_launch
import fusedopt.losses._linear_distillation_launch as launch
from fusedopt import functional as FF
from fusedopt import nn as fnn
from fusedopt.losses.linear_distillation import linear_distillation_loss, linear_distillation_reference
from fusedopt.testing import run_linear_distillation
from fusedopt.tolerance import LINEAR_DISTILLATION_TOLERANCE, linear_ce_allowed_error

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

HS, HT, VOCAB = 24, 16, 157  # student and teacher hidden sizes differ; V: three blocks of 64
DIVERGENCES = {  # id: keywords
    "kl": dict(divergence="kl"),
    "reverse": dict(divergence="reverse_kl"),
    "jsd": dict(divergence="jsd", beta=0.3),
    "jsd-beta0": dict(divergence="jsd", beta=0.0),
    "jsd-beta1": dict(divergence="jsd", beta=1.0),
}


@pytest.fixture
def chunks(monkeypatch):
    """Token chunks of 4 rows."""
    monkeypatch.setattr(launch, "chunk_rows", lambda n, hidden, vocab: 4)


@pytest.fixture
def small_blocks(monkeypatch):
    """Column blocks of 64 in the distillation kernel (half the cross-entropy kernel's): rows of
    V = 157 span three."""
    monkeypatch.setattr(ce_launch, "MAX_BLOCK", 128)


def make(lead, dtype, device, *, bias=True, ignore=True, seed=0, vocab=VOCAB, hs=HS, ht=HT):
    """``(xs, ws, xt, wt, target, bs, bt)``: a student and a teacher that disagree (logits of
    order 1-3), a target with every fourth token ignored (-100)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)

    xs, ws = rnd(*lead, hs), rnd(vocab, hs, scale=2 / hs**0.5)
    xt, wt = rnd(*lead, ht), rnd(vocab, ht, scale=3 / ht**0.5)
    bs, bt = (rnd(vocab), rnd(vocab)) if bias else (None, None)
    target = torch.randint(0, vocab, lead, generator=gen)
    if ignore:
        target.view(-1)[::4] = -100
    return xs, ws, xt, wt, target.to(device), bs, bt


def check(inputs, grad_output=None, **kwargs):
    """Ours against the composition: the value and every student gradient, their dtypes and
    shapes, within the contract; NaN where the oracle has NaN, and only there."""
    dtype = inputs[0].dtype
    if grad_output is not None:
        grad_output = grad_output.to(dtype)  # the values the op gets, for the fp64 oracle too
    ours = run_linear_distillation(linear_distillation_loss, *inputs, grad_output, **kwargs)
    theirs = run_linear_distillation(linear_distillation_reference, *inputs, grad_output, **kwargs)
    oracle = run_linear_distillation(
        linear_distillation_reference, *inputs, grad_output, torch.float64, **kwargs
    )
    for name, o, t, r in zip(
        ["value", "grad input", "grad weight", "grad bias"], ours, theirs, oracle, strict=False
    ):
        assert o.dtype == t.dtype and o.shape == t.shape, name
        assert torch.equal(o.isnan(), r.isnan()), name
        err = (o.double() - r).abs().nan_to_num(0).max().item() if r.numel() else 0.0
        allowed = linear_ce_allowed_error(r, t, dtype, LINEAR_DISTILLATION_TOLERANCE)
        assert err <= allowed, (name, err, allowed)
    return ours


# every divergence and reduction in fp32, 2-D and 3-D inputs in turn; bf16 for the three
# divergences (the JSD's limits are the KLs' kernel paths)
CASES = [
    pytest.param(
        divergence, lead, torch.float32, reduction, id=f"{divergence}-{len(lead) + 1}d-fp32-{reduction}"
    )
    for i, divergence in enumerate(DIVERGENCES)
    for j, reduction in enumerate(["mean", "sum", "none"])
    for lead in [[(13,), (2, 5)][(i + j) % 2]]
] + [
    pytest.param(divergence, (2, 5), torch.bfloat16, reduction, id=f"{divergence}-3d-bf16-{reduction}")
    for divergence, reduction in [("kl", "mean"), ("reverse", "none"), ("jsd", "mean"), ("jsd", "none")]
]


@pytest.mark.parametrize("divergence, lead, dtype, reduction", CASES)
def test_matches_composition(divergence, lead, dtype, reduction, triton_device, chunks, small_blocks):
    """Every divergence (the JSD at β = 0.3, 0 and 1), temperatures other than 1, biases on
    both heads, ignored tokens, grad_output != 1 (a random tensor for none)."""
    inputs = make(lead, dtype, triton_device)
    gen = torch.Generator().manual_seed(5)
    go = torch.randn(lead, generator=gen) if reduction == "none" else torch.tensor(-1.25)
    temperature = 2.0 if reduction == "sum" else 0.7
    check(
        inputs, go.to(triton_device), reduction=reduction, temperature=temperature, **DIVERGENCES[divergence]
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_without_target_or_bias(reduction, triton_device, chunks):
    inputs = make((9,), torch.float32, triton_device, bias=False)
    check((*inputs[:4], None, None, None), reduction=reduction, divergence="jsd", beta=0.6)


def test_fp16_non_contiguous_and_uint8_targets(triton_device, chunks, small_blocks):
    """fp16 within twice the composition's own error; a transposed student input and a
    strided teacher weight; uint8 targets, compared as integers (156 is not -100)."""
    xs, ws, xt, wt, target, bs, bt = make((5, 2), torch.float16, triton_device)
    target = torch.where(target == -100, 3, 156).to(torch.uint8)
    wt = torch.cat([wt, wt], 1)[:, ::2]
    check(
        (xs.transpose(0, 1), ws, xt.transpose(0, 1), wt, target.t(), bs, bt), divergence="jsd", ignore_index=3
    )
    for fn in (linear_distillation_loss, linear_distillation_reference):  # -100: no uint8 token ignored
        assert (fn(xs, ws, xt, wt, target, reduction="none") > 0).all()


def test_jsd_limits_are_the_kls(triton_device, chunks):
    """β = 0 is the forward KL and β = 1 the reverse KL (the JSD expression itself is 0 there):
    the same results as "kl" and "reverse_kl", and the limits of JSD / β and JSD / (1 - β) of
    the composition in fp64."""
    xs, ws, xt, wt, target, bs, bt = make((10,), torch.float64, triton_device)
    args = (xs, ws, xt, wt, target)
    kw = dict(student_bias=bs, teacher_bias=bt, reduction="none")
    for beta, kl in ((0.0, "kl"), (1.0, "reverse_kl")):
        jsd = linear_distillation_loss(*args, divergence="jsd", beta=beta, **kw)
        assert torch.equal(jsd, linear_distillation_loss(*args, divergence=kl, **kw))
        # JSD / β -> KL once β p_t / p_s << 1 for every class (ratios up to e^10 here)
        near = 1e-9 if beta == 0.0 else 1 - 1e-9
        limit = linear_distillation_reference(*args, divergence="jsd", beta=near, **kw) / 1e-9
        torch.testing.assert_close(jsd, limit, rtol=1e-4, atol=1e-9)
    assert (jsd > 0).sum() > 5  # the students and teachers disagree


def test_divergence_is_never_negative(triton_device):
    """A student that equals its teacher (the same head): every token's KL is exactly 0 (the
    JSD's log M is rounded: a few roundings above 0); one a few roundings away: never below 0
    (the sum of terms each >= 0, clamped only where rounding makes one negative), where the
    composition's ``Σ p (log p - log q)`` does go below 0."""
    xs, ws, _xt, _wt, target, bs, _bt = make((32,), torch.float32, triton_device, vocab=300)
    for options in DIVERGENCES.values():
        kw = dict(student_bias=bs, teacher_bias=bs, reduction="none", **options)
        same = linear_distillation_loss(xs, ws, xs, ws, target, **kw)
        assert (same >= 0).all() and same.max() < 1e-6, options
        if options.get("beta") not in (0.3,):  # the KLs
            assert torch.equal(same, torch.zeros_like(same)), options
        close = dict(student_bias=bs, teacher_bias=bs * (1 + 2**-22), reduction="none", **options)
        ours = linear_distillation_loss(xs, ws, xs, ws, target, **close)
        theirs = linear_distillation_reference(xs, ws, xs, ws, target, **close)
        assert (ours >= 0).all(), options
        assert ours.max() < 1e-6, options  # fp32 rounding of terms of order 1 / V
    assert (theirs < 0).any()  # the reverse KL composition, the last one


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_tokens_ignored(reduction, triton_device, chunks):
    """The mean of no token is NaN (0 / 0, as F.cross_entropy); sums and gradients are 0."""
    xs, ws, xt, wt, target, bs, bt = make((6,), torch.float32, triton_device)
    target.fill_(7)
    kwargs = dict(ignore_index=7, reduction=reduction, divergence="jsd", beta=0.4)
    ours = run_linear_distillation(linear_distillation_loss, xs, ws, xt, wt, target, bs, bt, **kwargs)
    theirs = run_linear_distillation(linear_distillation_reference, xs, ws, xt, wt, target, bs, bt, **kwargs)
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    assert ours[0].isnan().any().item() == (reduction == "mean")
    assert all(torch.equal(g, torch.zeros_like(g)) for g in ours[1:])


@pytest.mark.parametrize("lead", [(), (0,), (2, 0)], ids=["1d", "empty", "empty3d"])
def test_degenerate_inputs(lead, triton_device):
    """A single token (1-D inputs, 0-d target) and no token at all."""
    for reduction in ("mean", "sum", "none"):
        inputs = make(lead, torch.float32, triton_device, ignore=False)
        check(inputs, reduction=reduction, divergence="reverse_kl")


@pytest.mark.parametrize(
    "divergence, reduction", [("kl", "mean"), ("reverse", "none"), ("jsd", "mean"), ("jsd", "none")]
)
def test_gradcheck_fp64(divergence, reduction, triton_device, chunks, small_blocks):
    xs, ws, xt, wt, target, bs, bt = make((7,), torch.float64, triton_device, vocab=67, hs=5, ht=4)
    leaves = [t.clone().requires_grad_() for t in (xs, ws, bs)]

    def fn(xs, ws, bs):
        return linear_distillation_loss(
            xs, ws, xt, wt, target, student_bias=bs, teacher_bias=bt, reduction=reduction, temperature=1.5,
            **DIVERGENCES[divergence],
        )  # fmt: skip

    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)


def test_the_teacher_is_a_constant(triton_device, chunks):
    """Teacher tensors that require grad get none (the loss's graph does not reach them), and
    the student's gradients are those of a constant teacher; a student that does not require
    grad gives a loss without a graph."""
    xs, ws, xt, wt, target, bs, bt = make((9,), torch.float32, triton_device)
    teacher = [t.clone().requires_grad_() for t in (xt, wt, bt)]
    student = [t.clone().requires_grad_() for t in (xs, ws, bs)]
    loss = linear_distillation_loss(
        student[0],
        student[1],
        teacher[0],
        teacher[1],
        target,
        student_bias=student[2],
        teacher_bias=teacher[2],
    )
    loss.backward()
    assert all(t.grad is None for t in teacher)
    assert all(s.grad is not None for s in student)
    no_graph = linear_distillation_loss(xs, ws, teacher[0], teacher[1], target, teacher_bias=teacher[2])
    assert not no_graph.requires_grad


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph(reduction, triton_device, chunks):
    """No graph break; the forward (and none's backward) run as the fusedopt ops; loss and
    gradients as eager."""
    torch._dynamo.reset()
    xs, ws, xt, wt, target, bs, bt = make((2, 5), torch.float32, triton_device)

    def fn(xs, ws, xt, wt, target, student_bias, teacher_bias):
        return FF.linear_distillation_loss(
            xs, ws, xt, wt, target, student_bias=student_bias, teacher_bias=teacher_bias, reduction=reduction,
            divergence="jsd", beta=0.3, temperature=2.0,
        )  # fmt: skip

    recorder = Recorder()
    compiled = torch.compile(fn, backend=recorder.backend, fullgraph=True)
    go = torch.randn(2, 5).to(triton_device) if reduction == "none" else torch.tensor(0.5)
    ours = run_linear_distillation(compiled, xs, ws, xt, wt, target, bs, bt, go)
    eager = run_linear_distillation(fn, xs, ws, xt, wt, target, bs, bt, go)
    backward = {"fusedopt::linear_distillation_backward"} if reduction == "none" else set()
    assert recorder.graphs == [{"fusedopt::linear_distillation"}, backward]
    torch.testing.assert_close(ours, eager, rtol=1e-6, atol=1e-6)


def test_opcheck(triton_device):
    xs, ws, xt, wt, target, bs, bt = make((6,), torch.float32, triton_device)
    utils = ("test_schema", "test_faketensor")
    f32 = torch.float32
    args = (xs, ws, bs, xt, wt, bt, target, "jsd", 0.3, 2.0, -100, "mean", 4, True, True, True, f32, f32)
    torch.library.opcheck(launch.forward.op, args, test_utils=utils)
    stats = launch.forward(*args[:11], "none", *args[12:])[4]
    back = (
        xs,
        ws,
        bs,
        xt,
        wt,
        bt,
        target,
        stats,
        torch.randn(6),
        "jsd",
        0.3,
        2.0,
        -100,
        4,
        True,
        True,
        True,
        f32,
    )
    torch.library.opcheck(launch.backward_none.op, back, test_utils=utils)


def hessian_vector_products(fn, inputs, v, grad_output, **kwargs):
    xs, ws, xt, wt, target, _bs, _bt = inputs
    xs, ws = xs.detach().clone().requires_grad_(), ws.detach().clone().requires_grad_()
    gx, gw = torch.autograd.grad(
        fn(xs, ws, xt, wt, target, **kwargs), (xs, ws), grad_output, create_graph=True
    )
    hx, hw = torch.autograd.grad((gx * v[0]).sum() + (gw * v[1]).sum(), (xs, ws))
    return gx, gw, hx, hw


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_create_graph_gives_the_composition_second_derivatives(reduction, triton_device, chunks):
    inputs = make((9,), torch.float64, triton_device, vocab=13)
    gen = torch.Generator().manual_seed(3)
    v = [torch.randn(t.shape, generator=gen, dtype=t.dtype).to(triton_device) for t in inputs[:2]]
    go = torch.randn(9, generator=gen, dtype=torch.float64) if reduction == "none" else torch.tensor(0.5)
    kwargs = dict(reduction=reduction, divergence="reverse_kl", temperature=1.5)
    ours = hessian_vector_products(linear_distillation_loss, inputs, v, go.to(triton_device), **kwargs)
    theirs = hessian_vector_products(linear_distillation_reference, inputs, v, go.to(triton_device), **kwargs)
    for o, t, what in zip(ours, theirs, ("grad input", "grad weight", "Hv input", "Hv weight"), strict=True):
        torch.testing.assert_close(o, t, rtol=1e-9, atol=1e-12, msg=what)


def test_autocast_matches_the_composition(triton_device, chunks):
    """Under autocast: bf16 matmuls, an fp32 loss from the same bf16 logits, gradients in each
    tensor's own dtype."""
    inputs = make((3, 5), torch.float32, triton_device)
    with torch.autocast(triton_device, dtype=torch.bfloat16):
        ours = run_linear_distillation(linear_distillation_loss, *inputs, divergence="jsd")
        theirs = run_linear_distillation(linear_distillation_reference, *inputs, divergence="jsd")
    assert ours[0].dtype == theirs[0].dtype == torch.float32
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
    for g, r in zip(ours[1:], theirs[1:], strict=True):
        assert g.dtype == r.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=2**-7, atol=2**-7 * r.abs().max().item())


def test_other_devices_use_the_composition(monkeypatch, device):
    import fusedopt.losses.linear_distillation as module

    monkeypatch.setattr(module, "runs_triton", lambda device: False)
    inputs = make((5,), torch.float32, device)
    ours = run_linear_distillation(linear_distillation_loss, *inputs, divergence="jsd")
    theirs = run_linear_distillation(linear_distillation_reference, *inputs, divergence="jsd")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_backward_twice_with_retain_graph(triton_device, chunks):
    xs, ws, xt, wt, target, _bs, _bt = make((10,), torch.float32, triton_device)
    for reduction in ("mean", "none"):
        s, w = xs.clone().requires_grad_(), ws.clone().requires_grad_()
        loss = linear_distillation_loss(s, w, xt, wt, target, reduction=reduction, divergence="reverse_kl")
        go = torch.full_like(loss, 0.5)
        first = [g.clone() for g in torch.autograd.grad(loss, (s, w), go, retain_graph=True)]
        for g1, g2 in zip(first, torch.autograd.grad(loss, (s, w), 2 * go), strict=True):
            torch.testing.assert_close(g2, 2 * g1)


ERRORS = {
    "vocab": (lambda a: (a[0], a[1], a[2], a[3][:-1]), {}, ValueError, "vocabulary"),
    "tokens": (lambda a: (a[0], a[1], a[2][:-1], a[3]), {}, ValueError, "same tokens"),
    "hidden": (lambda a: (a[0], a[1][:, :-1], a[2], a[3]), {}, RuntimeError, "cannot be multiplied"),
    "dtype": (lambda a: (a[0], a[1], a[2].double(), a[3].double()), {}, RuntimeError, "teacher's dtype"),
    "float-target": (lambda a: (*a[:4], a[4].float()), {}, RuntimeError, "integer"),
    "target-shape": (lambda a: (*a[:4], a[4][:-1]), {}, ValueError, "tokens' shape"),
    "divergence": (lambda a: a[:5], dict(divergence="js"), ValueError, "divergence must be"),
    "beta": (lambda a: a[:5], dict(divergence="jsd", beta=1.5), ValueError, "beta"),
    "temperature": (lambda a: a[:5], dict(temperature=0.0), ValueError, "temperature"),
    "reduction": (lambda a: a[:5], dict(reduction="avg"), ValueError, "reduction"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_invalid_arguments(case, triton_device):
    """Clear errors, the same from the fused op and the composition."""
    pick, kwargs, error, match = ERRORS[case]
    args = pick(make((4,), torch.float32, triton_device))
    for fn in (linear_distillation_loss, linear_distillation_reference):
        with pytest.raises(error, match=match):
            fn(*args, **kwargs)


def test_module(triton_device, chunks):
    xs, ws, xt, wt, target, bs, bt = make((8,), torch.float32, triton_device)
    options = dict(divergence="jsd", beta=0.25, temperature=2.0, ignore_index=-100, reduction="sum")
    module = fnn.FusedLinearDistillationLoss(**options)
    assert "divergence='jsd', beta=0.25, temperature=2.0" in repr(module)
    expected = linear_distillation_reference(
        xs, ws, xt, wt, target, student_bias=bs, teacher_bias=bt, **options
    )
    torch.testing.assert_close(module(xs, ws, xt, wt, target, bs, bt), expected)
    assert FF.linear_distillation_loss is linear_distillation_loss
    with pytest.raises(ValueError, match="beta"):
        fnn.FusedLinearDistillationLoss(beta=-0.1)


def test_peak_memory_is_a_fraction_of_the_composition(triton_device, monkeypatch, capsys):
    """N = 256 tokens, V = 8000 classes, fp32, chunks of 16 tokens (1/16 of them; the default
    rule gives 256 of the 8,192 tokens of an LLM batch, 1/32, see below): the composition holds
    N x V logits of both heads, their log-softmaxes and more; the fused op two chunks of logits
    (the student's, the teacher's) and the gradients it returns. Rows of one block, 8 a program,
    keep the interpreter to a second."""
    monkeypatch.setattr(ce_launch, "MAX_BLOCK", 16384)  # blocks of 8192
    monkeypatch.setattr(ce_launch, "MAX_TILE", 131072)
    assert launch.chunk_rows(8192, 4096, 128256) == 256  # two buffers of 256 x V: about N H elements
    chunk = 16
    monkeypatch.setattr(launch, "chunk_rows", lambda n, hidden, vocab: chunk)
    n, vocab, hs = 256, 8000, 16
    inputs = make((n,), torch.float32, triton_device, vocab=vocab, hs=hs, ht=8)
    peaks = {}
    for name, fn in (("fused", linear_distillation_loss), ("composition", linear_distillation_reference)):
        with PeakMemory() as mem:
            result = run_linear_distillation(fn, *inputs, divergence="jsd")
            del result
        peaks[name] = mem.peak
    assert peaks["fused"] <= 0.25 * peaks["composition"], peaks
    leaves = grads = (
        n * hs + vocab * hs + vocab
    ) * 4  # the student copies run() differentiates; their gradients
    assert peaks["fused"] <= 2 * chunk * vocab * 4 + leaves + grads + 4 * vocab * 4 + 64 * n, peaks
    assert peaks["composition"] >= 4 * n * vocab * 4, peaks
    with capsys.disabled():
        print(
            f"\npeak memory, N={n} H={hs}/8 V={vocab} fp32: fused {peaks['fused'] / 2**20:.1f} MiB (chunks of "
            f"{chunk}), composition {peaks['composition'] / 2**20:.1f} MiB; ratio "
            f"{peaks['fused'] / peaks['composition']:.3f}"
        )
