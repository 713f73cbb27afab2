"""Fused linear log-probs and entropy against the composition they replace
(``linear_log_probs_reference``: ``log_softmax(F.linear(input, W, b) / T)[target]`` and
``-(softmax · log_softmax).sum(-1)`` in fp32).

The oracle is the composition in fp64 from the same values; results are held to the linear
cross-entropy's contract (``fusedopt.tolerance.LINEAR_LOG_PROBS_TOLERANCE``: within twice the
composition's own error in the inputs' dtype). On CPU the kernels run through the Triton
interpreter: shapes stay small, chunks of 8 tokens and column blocks of 64 make every case run
several chunks (and a shorter last one) and several blocks per row.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from helpers import CountOps, PeakMemory, Recorder, compile_in_child, kernels_compiler, record_launches

import fusedopt.losses._cross_entropy_launch as ce_launch
import fusedopt.losses._linear_log_probs_launch as launch
from fusedopt import functional as FF
from fusedopt.kernels import log_probs as kernels
from fusedopt.losses._linear_cross_entropy_launch import chunk_rows as default_chunk_rows
from fusedopt.losses.linear_log_probs import linear_log_probs, linear_log_probs_reference
from fusedopt.tolerance import LINEAR_LOG_PROBS_TOLERANCE, linear_ce_allowed_error

# The interpreter computes with numpy, which warns about the intended inf - inf and 1 / 0.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

HIDDEN, VOCAB = 24, 157  # V: no power of two, three column blocks of 64
OUTPUTS = {  # which outputs are returned and back-propagated
    "log_probs": dict(return_entropy=False, grads=(True, False)),
    "entropy": dict(return_entropy=True, grads=(False, True)),
    "both": dict(return_entropy=True, grads=(True, True)),
}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 8 tokens; column blocks of 64 in the row kernels (rows of V = 157 span three)."""
    monkeypatch.setattr(launch, "chunk_rows", lambda tokens, hidden, vocab: 8)
    monkeypatch.setattr(ce_launch, "MAX_BLOCK", 64)


def make(lead, dtype, device, *, bias=True, ignore=True, seed=0, vocab=VOCAB, hidden=HIDDEN):
    """``(input, linear_weight, target, linear_bias)``: logits of order 1; every fourth target
    -100 if ``ignore``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, hidden, generator=gen).to(device, dtype)
    w = (torch.randn(vocab, hidden, generator=gen) * 2 / hidden**0.5).to(device, dtype)
    b = torch.randn(vocab, generator=gen).to(device, dtype) if bias else None
    target = torch.randint(0, vocab, lead, generator=gen)
    if ignore:
        target.view(-1)[::4] = -100
    return x, w, target.to(device), b


def upstream(lead, outputs: str, device, seed=5) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Random upstream grads of the outputs back-propagated (None for the others)."""
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(lead, generator=gen).to(device) for _ in range(2)]
    return tuple(g if on else None for g, on in zip(grads, OUTPUTS[outputs]["grads"], strict=True))


def run(fn, x, w, target, b, grads, dtype=None, requires=(True, True, True), **kwargs) -> list:
    """``[log_probs, entropy or None, grad_input, grad_weight, grad_bias]`` (None where not
    asked) of ``fn`` on leaf copies of ``x``, ``w``, ``b`` (cast to ``dtype`` if given), the
    outputs back-propagated with ``grads`` (None: that output is not)."""
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    leaves = [
        cast(t).detach().clone().requires_grad_(r) if t is not None else None
        for t, r in zip((x, w, b), requires, strict=True)
    ]
    out = fn(leaves[0], leaves[1], target, leaves[2], **kwargs)
    out = list(out) if isinstance(out, tuple) else [out, None]
    used = [(o, g.to(o.dtype)) for o, g in zip(out, grads, strict=True) if g is not None]
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    grads_in = iter(torch.autograd.grad([o for o, _ in used], wanted, [g for _, g in used]) if wanted else [])
    return [*out, *(next(grads_in) if t is not None and t.requires_grad else None for t in leaves)]


def check(x, w, target, b, grads, requires=(True, True, True), **kwargs) -> list:
    """Ours against the composition: outputs and gradients, dtypes and shapes, within the
    contract of the fp64 oracle. Returns ours."""
    ours = run(linear_log_probs, x, w, target, b, grads, requires=requires, **kwargs)
    theirs = run(linear_log_probs_reference, x, w, target, b, grads, requires=requires, **kwargs)
    oracle = run(linear_log_probs_reference, x, w, target, b, grads, torch.float64, requires, **kwargs)
    names = ["log_probs", "entropy", "grad input", "grad weight", "grad bias"]
    for name, o, t, r in zip(names, ours, theirs, oracle, strict=True):
        assert (o is None) == (t is None), name
        if o is None:
            continue
        assert o.dtype == t.dtype and o.shape == t.shape, (name, o.dtype, t.dtype, o.shape, t.shape)
        assert torch.equal(o.isnan(), r.isnan()), name
        err = (o.double() - r).abs().nan_to_num(0).max().item() if r.numel() else 0.0
        allowed = linear_ce_allowed_error(r, t, x.dtype, LINEAR_LOG_PROBS_TOLERANCE)
        assert err <= allowed, (name, err, allowed)
    return ours


CASES = [
    (lead, dtype, outputs, temperature, bias)
    for lead, dtype in [((19,), torch.float32), ((3, 7), torch.bfloat16)]
    for outputs, temperature, bias in [("both", 0.7, True), ("log_probs", 1.0, False), ("entropy", 2.5, True)]
] + [
    ((19,), torch.bfloat16, "both", 0.7, False),
    ((3, 7), torch.float32, "both", 1.0, True),
    ((19,), torch.float16, "both", 1.3, True),
]


@pytest.mark.parametrize(
    "lead, dtype, outputs, temperature, bias",
    CASES,
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v).removeprefix("torch."),
)
def test_matches_composition(lead, dtype, outputs, temperature, bias, triton_device):
    x, w, target, b = make(lead, dtype, triton_device, bias=bias)
    grads = upstream(lead, outputs, triton_device)
    check(x, w, target, b, grads, temperature=temperature, return_entropy=OUTPUTS[outputs]["return_entropy"])


@pytest.mark.parametrize(
    "requires", [(True, False, False), (False, True, False), (False, False, True), (False, True, True)]
)
def test_any_subset_requires_grad(requires, triton_device):
    x, w, target, b = make((9,), torch.float32, triton_device)
    check(
        x, w, target, b, upstream((9,), "both", triton_device), requires, temperature=0.8, return_entropy=True
    )


def test_no_gradient_and_no_grad_mode(triton_device):
    """Nothing requires grad, or grad mode off: the forward alone, no lse kept."""
    x, w, target, b = make((9,), torch.bfloat16, triton_device)
    check(x, w, target, b, (None, None), (False, False, False), temperature=0.8, return_entropy=True)
    with torch.no_grad():
        out = linear_log_probs(x.requires_grad_(), w, target, b, return_entropy=True)
    ref = linear_log_probs_reference(x, w, target, b, return_entropy=True)
    torch.testing.assert_close(out, tuple(r.detach() for r in ref), rtol=1e-5, atol=1e-5)


def test_all_targets_ignored(triton_device):
    """Every log-prob 0, no gradient from them; the entropies are still the distributions'."""
    x, w, target, b = make((6,), torch.float32, triton_device)
    target.fill_(-100)
    ours = check(x, w, target, b, upstream((6,), "both", triton_device), return_entropy=True)
    assert torch.equal(ours[0], torch.zeros_like(ours[0])) and (ours[1] > 0).all()
    only_log_probs = run(linear_log_probs, x, w, target, b, upstream((6,), "log_probs", triton_device))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in only_log_probs[2:])


@pytest.mark.parametrize("lead", [(), (0,), (2, 0)], ids=["1d", "empty", "empty3d"])
def test_degenerate_inputs(lead, triton_device):
    """A single token (1-D input, 0-d target: 0-d outputs) and no token at all."""
    x, w, target, b = make(lead, torch.float32, triton_device, ignore=False)
    check(x, w, target, b, upstream(lead, "both", triton_device), temperature=0.5, return_entropy=True)


def test_gradcheck_fp64(triton_device):
    x, w, target, b = make((7,), torch.float64, triton_device, vocab=67, hidden=5)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]

    def fn(x, w, b):
        return linear_log_probs(x, w, target, b, temperature=0.6, return_entropy=True)

    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)


def test_create_graph_gives_the_composition_second_derivatives(triton_device):
    """A backward with ``create_graph=True`` differentiates the composition: gradients and a
    Hessian-vector product, through both outputs."""
    x, w, target, b = make((9,), torch.float64, triton_device, vocab=13)
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(triton_device)
    grads = upstream((9,), "both", triton_device)
    results = []
    for fn in (linear_log_probs, linear_log_probs_reference):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = fn(xs, ws, target, b, temperature=0.7, return_entropy=True)
        gx, gw = torch.autograd.grad(out, (xs, ws), [g.double() for g in grads], create_graph=True)
        results.append([gx, gw, *torch.autograd.grad((gx * v).sum() + gw.square().sum(), (xs, ws))])
    for o, t, what in zip(*results, ("grad input", "grad weight", "Hv input", "Hv weight"), strict=True):
        torch.testing.assert_close(o, t, rtol=1e-9, atol=1e-12, msg=what)


def test_no_work_for_an_output_without_grad(triton_device, monkeypatch):
    """The backward kernel propagates only the outputs whose grads are not None; none at all
    when neither is used."""
    launches = record_launches(monkeypatch, {"backward": kernels.log_probs_backward_kernel})
    x, w, target, b = make((6,), torch.float32, triton_device)
    for outputs in OUTPUTS:
        launches.clear()
        run(linear_log_probs, x, w, target, b, upstream((6,), outputs, triton_device), return_entropy=True)
        switches = {(kw["LOG_PROB"], kw["ENTROPY"]) for _, _, kw in launches}
        assert switches == {OUTPUTS[outputs]["grads"]}, (outputs, switches)


def test_signs_and_dtypes_at_a_llama_vocabulary(triton_device, monkeypatch):
    """V = 128,256, bf16 inputs: fp32 log-probs never positive and entropies never negative,
    also where a naive formula rounds across zero: tokens whose distribution is one class
    (log-prob of that class 0, entropy 0), and near-uniform ones."""
    monkeypatch.setattr(ce_launch, "MAX_BLOCK", 4096)
    vocab, hidden = 128256, 8
    x, w, target, b = make(
        (6,), torch.bfloat16, triton_device, bias=False, ignore=False, vocab=vocab, hidden=hidden
    )
    x[0], w[77] = 1.0, 16.0  # token 0: logit 77 = 128 above the others (order 1)
    x[1], target[0] = 0.0, 77  # token 1: every logit 0 (uniform)
    x[2] = 2.0**-9  # token 2: logits near 0 (near-uniform)
    target[1] = 5
    for temperature in (1.0, 0.3):
        log_prob, entropy, *_ = check(
            x, w, target, b, (None, None), (False,) * 3, temperature=temperature, return_entropy=True
        )
        assert log_prob.dtype == entropy.dtype == torch.float32
        assert (log_prob <= 0).all() and (entropy >= 0).all(), (log_prob, entropy)
        assert log_prob[0] == 0 and entropy[0] == 0  # one class: exactly
        torch.testing.assert_close(
            entropy[1].item(), float(torch.tensor(vocab).double().log()), rtol=1e-6, atol=0
        )


@pytest.mark.parametrize("outputs", ["log_probs", "both"])
def test_compile_fullgraph(outputs, triton_device):
    """No graph break: the forward and the backward run as the fusedopt ops; outputs and
    gradients as eager."""
    torch._dynamo.reset()
    x, w, target, b = make((2, 5), torch.float32, triton_device)
    kwargs = dict(temperature=0.9, return_entropy=OUTPUTS[outputs]["return_entropy"])

    def fn(x, w, target, b, **kwargs):
        return FF.linear_log_probs(x, w, target, b, **kwargs)

    recorder = Recorder()
    compiled = torch.compile(fn, backend=recorder.backend, fullgraph=True)
    grads = upstream((2, 5), outputs, triton_device)
    ours = run(compiled, x, w, target, b, grads, **kwargs)
    eager = run(fn, x, w, target, b, grads, **kwargs)
    assert recorder.graphs == [{"fusedopt::linear_log_probs"}, {"fusedopt::linear_log_probs_backward"}]
    torch.testing.assert_close(ours, eager, rtol=1e-6, atol=1e-6)


def test_opcheck(triton_device):
    x, w, target, b = make((6,), torch.float32, triton_device)
    utils = ("test_schema", "test_faketensor")
    f32 = torch.float32
    args = (x, w, b, target, 0.7, 4, True, True, f32)
    torch.library.opcheck(launch.forward.op, args, test_utils=utils)
    _, entropy, lse = launch.forward(*args)
    glp, gh = (torch.randn(6).to(triton_device) for _ in range(2))
    back = (x, w, b, target, lse, entropy, glp, gh, 0.7, 4, True, True, True, f32)
    torch.library.opcheck(launch.backward.op, back, test_utils=utils)
    torch.library.opcheck(launch.backward.op, (*back[:6], None, gh, *back[8:]), test_utils=utils)


def test_autocast(triton_device):
    """Under autocast: bf16 matmuls, fp32 outputs from the same bf16 logits, gradients in each
    tensor's dtype."""
    x, w, target, b = make((3, 5), torch.float32, triton_device)
    grads = upstream((3, 5), "both", triton_device)
    with torch.autocast(triton_device, dtype=torch.bfloat16):
        ours = run(linear_log_probs, x, w, target, b, grads, temperature=0.7, return_entropy=True)
        theirs = run(linear_log_probs_reference, x, w, target, b, grads, temperature=0.7, return_entropy=True)
    for o, t in zip(ours, theirs, strict=True):
        assert o.dtype == t.dtype == torch.float32
        torch.testing.assert_close(o, t, rtol=2**-7, atol=2**-7 * t.abs().max().item())


def test_non_finite_hidden_states_give_the_composition_nan(triton_device):
    """NaN and +inf hidden states: NaN log-probs and entropies of those tokens only (a
    log-prob 0 where the target is ignored), NaN gradients where the composition's are."""
    x, w, target, b = make((8,), torch.float64, triton_device)
    x[1, 0], x[6, 2], target[4] = float("nan"), float("inf"), 3
    x[4, 1], target[4] = float("nan"), -100
    ours = check(x, w, target, b, upstream((8,), "both", triton_device), return_entropy=True)
    assert ours[0][4] == 0 and ours[0][[1, 6]].isnan().all() and ours[1][[1, 4, 6]].isnan().all()


def test_kernels_raise_no_runtime_warning(triton_device):
    """The interpreter computes every lane of a ``tl.where``: no ``0 * inf`` or ``inf - inf``
    there either (masked lanes, the entropy's rescaling), forward and backward, with
    RuntimeWarning an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for dtype in (torch.float32, torch.bfloat16):
            x, w, target, b = make((11,), dtype, triton_device)
            ours = run(
                linear_log_probs, x, w, target, b, upstream((11,), "both", triton_device), return_entropy=True
            )
            assert all(t.isfinite().all() for t in ours)


def test_the_logits_buffers_padding_never_reaches_a_result(triton_device, monkeypatch):
    """The logits buffer (uninitialized, its rows padded: NaN here) is written by a matmul
    whose beta is 0 when there is no bias: nothing of it may reach a result."""
    new_empty = torch.Tensor.new_empty

    def poisoned(self, *args, **kwargs):
        out = new_empty(self, *args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned)
    x, w, target, _ = make((11,), torch.bfloat16, triton_device, bias=False)
    check(x, w, target, None, upstream((11,), "both", triton_device), temperature=0.5, return_entropy=True)


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ({}, dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
        ({}, dict(temperature=-1.0), ValueError, "temperature"),
        ({}, dict(temperature=float("inf")), ValueError, "temperature"),
        ({}, dict(temperature=float("nan")), ValueError, "temperature"),
        ({}, dict(temperature=True), ValueError, "temperature"),
        ({}, dict(return_entropy=1), TypeError, "return_entropy must be a bool"),
        (dict(w=torch.randn(7, 6)), {}, RuntimeError, "mat1 and mat2 shapes cannot be multiplied"),
        (dict(w=torch.randn(2, 7, 5)), {}, RuntimeError, "linear_log_probs: linear_weight must be 2-D"),
        (dict(w=torch.randn(7, 5).double()), {}, RuntimeError, "same dtype"),
        (dict(b=torch.randn(6)), {}, RuntimeError, r"linear_log_probs: linear_bias must have shape \(7,\)"),
        (dict(target=torch.zeros(3, dtype=torch.long)), {}, ValueError, "batch_size"),
        (dict(target=torch.zeros(4, 1, dtype=torch.long)), {}, RuntimeError, "target"),
        (dict(target=torch.zeros(4)), {}, RuntimeError, "expected target dtype to be Long or Byte"),
        (dict(target=torch.tensor([0, 7, 1, 2])), {}, IndexError, re.escape("Target 7 is out of bounds.")),
    ],
)
def test_argument_errors(args, kwargs, error, match, triton_device):
    given = (
        dict(x=torch.randn(4, 5), w=torch.randn(7, 5), target=torch.zeros(4, dtype=torch.long), b=None) | args
    )
    given = {k: v.to(triton_device) if v is not None else None for k, v in given.items()}
    with pytest.raises(error, match=match):
        linear_log_probs(given["x"], given["w"], given["target"], given["b"], **kwargs)


def test_other_devices_use_the_composition(monkeypatch, device):
    """Where the kernels do not run (or a tensor subclass such as DTensor), the op is the
    composition."""
    import fusedopt.losses.linear_cross_entropy as module

    monkeypatch.setattr(module, "runs_triton", lambda device: False)
    x, w, target, b = make((5,), torch.float32, device)
    grads = upstream((5,), "both", device)
    with CountOps() as ops:
        ours = run(linear_log_probs, x, w, target, b, grads, temperature=0.5, return_entropy=True)
    assert any("log_softmax" in op for op in ops.ops)
    theirs = run(linear_log_probs_reference, x, w, target, b, grads, temperature=0.5, return_entropy=True)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert FF.linear_log_probs is linear_log_probs


def test_peak_memory_is_a_fraction_of_the_composition(triton_device, monkeypatch, capsys):
    """N = 1024 tokens, V = 16,000, fp32, both outputs back-propagated: the composition holds
    its N x V logits several times over (fp32 copy, log-softmax, softmax and their gradients);
    the fused op one chunk of them (the default: 256 rows here) per pass, the gradients and 8
    bytes a token. (Under the interpreter the forward's chunk stays alive until the garbage
    collector runs: the interpreter keeps a kernel's arguments in a reference cycle.) Whole
    rows in one block, 64 rows per program, keep the interpreter to seconds."""
    monkeypatch.setattr(launch, "chunk_rows", default_chunk_rows)
    monkeypatch.setattr(ce_launch, "MAX_BLOCK", 16384)
    monkeypatch.setattr(ce_launch, "MAX_TILE", 2**20)
    n, hidden, vocab = 1024, 16, 16000
    x, w, target, b = make((n,), torch.float32, triton_device, vocab=vocab, hidden=hidden)
    grads = upstream((n,), "both", triton_device)
    peaks, largest = {}, {}
    for name, fn in (("fused", linear_log_probs), ("composition", linear_log_probs_reference)):
        with PeakMemory() as mem:
            out = run(fn, x, w, target, b, grads, temperature=0.7, return_entropy=True)
            del out
        peaks[name], largest[name] = mem.peak, mem.largest
    assert largest["fused"] == default_chunk_rows(n, hidden, vocab) * vocab * 4  # one chunk of logits
    assert peaks["fused"] <= 0.25 * peaks["composition"], peaks
    with capsys.disabled():
        print(
            f"\npeak memory, N={n} H={hidden} V={vocab} fp32: fused {peaks['fused'] / 2**20:.1f} MiB, composition "
            f"{peaks['composition'] / 2**20:.1f} MiB; ratio {peaks['fused'] / peaks['composition']:.3f}"
        )


# -- compilation for an H100 (sm_90) without a GPU (the bf16 / fp32 launches at a vocabulary's
# blocks are the sm_90 bench's scenarios): fp64, tiles of many short rows, blocks below 2 vectors


def _compile_variants() -> list:
    out = []
    for dt, rows, block in [("fp64", 1, 2048), ("bf16", 64, 64), ("fp16", 4, 8)]:
        ct = "fp64" if dt == "fp64" else "fp32"
        sizes = {"R": "i32", "C": "i32", "col0": "i64", "K": "i32", "stride_x": "i32", "stride_t": "i32"}
        forward = {
            "logits": f"*{dt}",
            "target": "*i64",
            "log_prob": f"*{ct}",
            "entropy": f"*{ct}",
            "lse": f"*{ct}",
            "state": f"*{ct}",
        }
        backward = {"logits": f"*{dt}", "target": "*i64", "lse": f"*{ct}", "entropy": f"*{ct}"}
        backward |= {"grad_log_prob": f"*{ct}", "grad_entropy": f"*{ct}"}
        tile = dict(DTYPE=dt, COMPUTE=ct, ROWS=rows, BLOCK=block)
        aligned = ["logits", "stride_x"]
        entropy = dt != "bf16"  # bf16: log-probs alone
        out.append([
            "log_probs_kernel", forward | sizes | {"ignore_index": "i64"},
            tile | dict(ENTROPY=entropy, SAVE_LSE=True, WINDOW=dt == "fp16", FROM_STATE=False), aligned,
        ])  # fmt: skip
        out.append([
            "log_probs_backward_kernel",
            backward | sizes | {"stride_glp": "i32", "stride_gh": "i32", "inv_temperature": "fp64", "ignore_index": "i64"},
            tile | dict(LOG_PROB=dt != "fp16", ENTROPY=entropy), aligned,
        ])  # fmt: skip
    return out


def test_kernels_compile_for_sm90():
    variants = _compile_variants()
    results = compile_in_child(kernels_compiler("log_probs"), variants)
    failures = [(v[0], v[2], r["error"]) for v, r in zip(variants, results, strict=True) if not r["ok"]]
    assert not failures
    # 128-bit accesses from blocks of 2 vectors; fp64's pass 1 reads unshifted (scalar), as cross_entropy's
    wide = [r["vector_loads"] > 0 for v, r in zip(variants, results, strict=True)]
    assert wide == [False, True, True, True, False, False]
