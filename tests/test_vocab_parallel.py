"""The vocabulary-parallel pieces (``fusedopt.losses._vocab_parallel``) in one process.

:func:`merge_rows` against the statistics of whole rows; the linear cross-entropy's launcher
and the distillation's with a ``shard`` on simulated ranks (each rank's slice of the classes
run in turn, the collectives replaced by their results: the ranks' states merged, their partial
input gradients summed) against the unsharded launchers. The real collectives, DTensors and their
counts: ``tests/test_distributed.py::check_vocab_parallel_head`` (2 gloo ranks).
"""

from __future__ import annotations

import pytest
import torch

import fusedopt.losses._linear_cross_entropy_launch as launch
import fusedopt.losses._linear_distillation_launch as distillation
from fusedopt.losses import _vocab_parallel as vocab_parallel
from fusedopt.losses._vocab_parallel import MAX, SUM, VocabShard, merge_rows

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


def _slice_state(z: torch.Tensor, y: torch.Tensor, v0: int) -> torch.Tensor:
    """What a rank holding classes ``v0 ..`` keeps per row: max (the lowest finite value when
    it holds none), Σ exp(z - max), the target's logit (0 when not its class), Σ exp(z - max) z."""
    m = z.amax(1) if z.shape[1] else z.new_full(z.shape[:1], torch.finfo(z.dtype).min)
    e = torch.exp(z - m[:, None])
    z_y = (z * (torch.arange(v0, v0 + z.shape[1]) == y[:, None])).sum(1)
    return torch.stack([m, e.sum(1), z_y, (e * z).sum(1)])


def test_merge_rows_is_the_whole_rows():
    """Three uneven slices of the classes (one empty) merge into the whole rows' log-sum-exp,
    target logit and entropy-like sum Σ exp(z - max) z; a second max group beside the first."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(6, 23, generator=gen, dtype=torch.float64) * 4
    y = torch.randint(0, 23, (6,), generator=gen)
    bounds = [(0, 9), (9, 9), (9, 23)]
    states = torch.stack([_slice_state(z[:, a:b], y, a) for a, b in bounds])
    merged = merge_rows(states, (MAX, 0, SUM, 0))
    m = z.amax(1)
    torch.testing.assert_close(merged[0] + merged[1].log(), torch.logsumexp(z, 1))
    torch.testing.assert_close(merged[2], z.gather(1, y[:, None])[:, 0])
    torch.testing.assert_close(merged[3], (torch.exp(z - m[:, None]) * z).sum(1))
    teacher = z.flip(1) * 0.5  # two max groups in one state: (MAX, 0, MAX, 2)
    both = torch.cat(
        [states[:, :2], torch.stack([_slice_state(teacher[:, a:b], y, a)[:2] for a, b in bounds])], 1
    )
    merged = merge_rows(both, (MAX, 0, MAX, 2))
    torch.testing.assert_close(merged[2] + merged[3].log(), torch.logsumexp(teacher, 1))


def test_merge_rows_carries_nan():
    """A NaN sum in one slice (a NaN or +inf logit there) makes the row's sum NaN; other rows
    are untouched."""
    states = torch.tensor([[[0.0, 1.0], [1.0, 2.0]], [[1.0, 0.0], [float("nan"), 3.0]]])  # [S=2, K=2, N=2]
    merged = merge_rows(states, (MAX, 0))
    assert merged[1, 0].isnan() and merged[1, 1] == pytest.approx(2.0 + 3.0 * torch.e**-1)


def test_combine_rows_checks_the_row_kinds():
    with pytest.raises(ValueError, match="row kinds"):
        vocab_parallel.combine_rows(torch.zeros(4, 3), None, (MAX, 0, SUM))


def _simulated(monkeypatch, vocab: int, world: int, run):
    """``run(shard, lo, hi)`` on each of ``world`` simulated ranks holding torch.chunk's
    classes ``lo .. hi - 1``, the collectives (``combine_rows``, ``all_reduce_``) replaced by
    what they would return: round ``k`` runs every rank until its ``k``-th collective, whose
    inputs it collects (the rank stops there), the earlier ones answered from the earlier
    rounds (the ranks' states merged, their partial sums summed); the last round, every
    collective answered, returns each rank's results and the number of collectives a rank
    made."""
    rows = -(-vocab // world)
    ranks = [(min(r * rows, vocab), min((r + 1) * rows, vocab)) for r in range(world)]
    answers, inputs, made = [], [], [0]

    class Collected(Exception):
        pass

    def collective(t: torch.Tensor, kinds) -> torch.Tensor:
        made[0] += 1
        if made[0] <= len(answers):
            return answers[made[0] - 1]
        inputs.append(t.clone())
        raise Collected(kinds)

    monkeypatch.setattr(
        vocab_parallel, "combine_rows", lambda state, shard, kinds: collective(state, kinds).clone()
    )
    monkeypatch.setattr(vocab_parallel, "all_reduce_", lambda t, shard: t.copy_(collective(t, None)))
    while True:
        results, kinds = [], None
        inputs.clear()
        for lo, hi in ranks:
            made[0] = 0
            try:
                results.append(run(VocabShard(None, None, lo, vocab), lo, hi))
            except Collected as stop:
                kinds = stop.args[0]
        if not inputs:
            return results, ranks, len(answers)
        assert len(inputs) == world, "the ranks made different collectives"
        states = torch.stack(inputs)
        answers.append(merge_rows(states, kinds) if kinds is not None else states.sum(0))


@pytest.mark.parametrize("vocab, world", [(20, 3), (2, 3)], ids=["uneven", "empty"])
@pytest.mark.parametrize(
    "dtype, reduction, options",
    [
        (torch.float32, "mean", dict(bias=True)),
        (
            torch.float32,
            "none",
            dict(weight=True, label_smoothing=0.2, z_loss=0.01, softcap=2.0, ignore_index=3),
        ),
        (torch.bfloat16, "sum", dict(bias=True, weight=True, label_smoothing=0.1)),
    ],
    ids=["mean", "none-all", "bf16-sum"],
)
def test_launcher_on_simulated_ranks(monkeypatch, triton_device, vocab, world, dtype, reduction, options):
    """V = 20 over 3 ranks (7, 7 and 6 classes) and V = 2 over 3 ranks (the last empty), blocks
    of 4 classes: the loss and the gradients (the input's summed over the ranks; the weight's
    and bias's each rank's slice) are the unsharded launcher's, but for the sums' order."""
    gen = torch.Generator().manual_seed(vocab)
    n, hidden, device = 9, 8, triton_device
    x = torch.randn(n, hidden, generator=gen).to(device, dtype)
    w = (torch.randn(vocab, hidden, generator=gen) * 0.5).to(device, dtype)
    b = torch.randn(vocab, generator=gen).to(device, dtype) if options.get("bias") else None
    cw = (torch.rand(vocab, generator=gen) + 0.5).to(device, dtype) if options.get("weight") else None
    ignore_index = options.get("ignore_index", -100)
    target = torch.randint(0, vocab, (n,), generator=gen)
    target[::4] = ignore_index
    target = target.to(device)
    grad_output = torch.rand(n, generator=gen).to(device) if reduction == "none" else None
    needs = (True, True, b is not None)
    smoothing, z_loss = options.get("label_smoothing", 0.0), options.get("z_loss", 0.0)
    softcap = options.get("softcap", 0.0)

    def run(shard, lo, hi):
        w_, b_ = w[lo:hi], b[lo:hi] if b is not None else None
        loss, gi, gw, gb, stats, lse = launch.forward(
            x, w_, b_, target, cw, ignore_index, reduction, smoothing, z_loss, softcap, 4, 4, *needs, dtype, dtype,
            shard=shard,
        )  # fmt: skip
        if reduction == "none":
            gi, gw, gb = launch.backward_none(
                x, w_, b_, target, cw, stats, lse, grad_output, ignore_index, smoothing, z_loss, softcap, 4, 4, *needs,
                dtype, shard=shard,
            )  # fmt: skip
        return loss, gi, gw, gb

    _same_on_every_rank(monkeypatch, vocab, world, run, dtype, collectives=2)


def _same_on_every_rank(
    monkeypatch, vocab: int, world: int, run, dtype: torch.dtype, collectives: int
) -> None:
    """``run`` (returning the loss and the gradients of the input, the weight and the bias) on
    :func:`_simulated` ranks against ``run(None, 0, vocab)``, the unsharded launcher: the same
    loss and input gradient on every rank, each rank's slice of the weight's and bias's, but for
    the sums' order; ``collectives`` a rank."""
    expected = run(None, 0, vocab)
    results, ranks, made = _simulated(monkeypatch, vocab, world, run)
    assert made == collectives
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=2**-7)
    for (loss, gi, gw, gb), (lo, hi) in zip(results, ranks, strict=True):
        torch.testing.assert_close(loss, expected[0], **tol)
        torch.testing.assert_close(gi, expected[1], **tol)
        torch.testing.assert_close(gw, expected[2][lo:hi], **tol)
        torch.testing.assert_close(gb, expected[3][lo:hi] if expected[3].numel() else expected[3], **tol)


# (divergence, β, reduction, dtype, options): every divergence (the forward KL's gradient in pass 2
# for mean/sum), each with none (the gradient pass in the backward, with each row's grad_output);
# biases, no target, other temperatures
DISTILLATION_CASES = {
    "kl-mean": ("kl", 0.5, "mean", torch.float32, dict(bias=True, temperature=0.7)),
    "kl-none": ("kl", 0.5, "none", torch.float32, dict()),
    "reverse-mean": ("reverse_kl", 0.5, "mean", torch.float32, dict(target=False, temperature=2.0)),
    "reverse-none": ("reverse_kl", 0.5, "none", torch.float32, dict(bias=True)),
    "jsd-sum-bf16": ("jsd", 0.3, "sum", torch.bfloat16, dict(bias=True)),
    "jsd-none": ("jsd", 0.3, "none", torch.float32, dict(bias=True, temperature=1.5)),
}


@pytest.mark.parametrize("vocab, world", [(20, 3), (2, 3)], ids=["uneven", "empty"])
@pytest.mark.parametrize("case", list(DISTILLATION_CASES))
def test_distillation_on_simulated_ranks(monkeypatch, triton_device, vocab, world, case):
    """The distillation launcher with both heads' weights (and biases) sharded alike over 3
    simulated ranks, blocks of 4 classes, against the unsharded launcher in token chunks of 4:
    the loss and the student's gradients (the input's summed over the ranks; the weight's and
    bias's each rank's slice), in three collectives a call (pass 1's state, pass 2's sums, the
    input's gradient)."""
    divergence, beta, reduction, dtype, options = DISTILLATION_CASES[case]
    gen = torch.Generator().manual_seed(vocab)
    n, hs, ht, device = 9, 8, 6, triton_device

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)

    xs, ws, xt, wt = rnd(n, hs), rnd(vocab, hs, scale=0.6), rnd(n, ht), rnd(vocab, ht, scale=0.9)
    bs, bt = (rnd(vocab), rnd(vocab)) if options.get("bias") else (None, None)
    target = torch.randint(0, vocab, (n,), generator=gen)
    target[::4] = -100
    target = target.to(device) if options.get("target", True) else None
    grad_output = torch.rand(n, generator=gen).to(device) if reduction == "none" else None
    needs = (True, True, bs is not None)
    scalars = (divergence, beta, options.get("temperature", 1.0), -100)

    def run(shard, lo, hi):
        block = None if shard is None else 4
        heads = (xs, ws[lo:hi], _part(bs, lo, hi), xt, wt[lo:hi], _part(bt, lo, hi), target)
        loss, gi, gw, gb, stats = distillation.forward(
            *heads, *scalars, reduction, 4, *needs, dtype, dtype, block=block, shard=shard
        )
        if reduction == "none":
            gi, gw, gb = distillation.backward_none(
                *heads, stats, grad_output, *scalars, 4, *needs, dtype, block=block, shard=shard
            )
        return loss, gi, gw, gb

    _same_on_every_rank(monkeypatch, vocab, world, run, dtype, collectives=3)


def _part(t: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor | None:
    return t[lo:hi] if t is not None else None


def test_merge_rows_entropy_sum():
    """The entropy's ``Σ exp(z - m) (m - z)`` of uneven slices (one empty) merged by a ``(j, i)``
    row: the whole rows' (every term >= 0), beside their max and sum."""
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(5, 17, generator=gen, dtype=torch.float64) * 3
    y = torch.zeros(5, dtype=torch.long)
    bounds = [(0, 6), (6, 6), (6, 17)]

    def state(a, b):
        m, s, _, t = _slice_state(z[:, a:b], y, a)
        return torch.stack([m, s, torch.where(s == 0, 0, m * s - t)])  # u = m s - Σ e^(z-m) z

    merged = merge_rows(torch.stack([state(a, b) for a, b in bounds]), (MAX, 0, (0, 1)))
    m = z.amax(1)
    torch.testing.assert_close(merged[2], (torch.exp(z - m[:, None]) * (m[:, None] - z)).sum(1))


@pytest.mark.parametrize("vocab, world", [(21, 2), (2, 3)], ids=["uneven", "empty"])
@pytest.mark.parametrize(
    "dtype, bias, entropy",
    [(torch.float32, True, True), (torch.bfloat16, False, True), (torch.float32, False, False)],
    ids=["fp32-bias", "bf16", "no-entropy"],
)
def test_log_probs_launcher_on_simulated_ranks(
    monkeypatch, triton_device, vocab, world, dtype, bias, entropy
):
    """``linear_log_probs``' launchers with a ``shard`` (blocks of 4 classes, temperature 0.7,
    ignored targets) on simulated ranks: log-probs, entropies, lse and the gradients through
    both outputs equal the unsharded token order's (the input's summed over the ranks; the
    weight's and bias's each rank's slice), but for the sums' order."""
    from fusedopt.losses import _linear_log_probs_launch as lp_launch

    gen = torch.Generator().manual_seed(vocab)
    n, hidden, device = 9, 8, triton_device
    x = torch.randn(n, hidden, generator=gen).to(device, dtype)
    w = torch.randn(vocab, hidden, generator=gen).to(device, dtype)
    b = torch.randn(vocab, generator=gen).to(device, dtype) if bias else None
    target = torch.randint(0, vocab, (n,), generator=gen)
    target[::4] = -100
    target = target.to(device)
    glp = torch.randn(n, generator=gen).to(device)
    gh = torch.randn(n, generator=gen).to(device) if entropy else None
    needs = (True, True, bias)

    def run(shard, lo, hi):
        w_, b_ = w[lo:hi], b[lo:hi] if b is not None else None
        block = 4 if shard is not None else None
        lp, ent, lse = lp_launch.forward(
            x, w_, b_, target, 0.7, 4, entropy, True, dtype, block=block, shard=shard
        )
        grads = lp_launch.backward(
            x, w_, b_, target, lse, ent, glp, gh, 0.7, 4, *needs, dtype, block=block, shard=shard
        )
        return lp, ent, lse, *grads

    expected = run(None, 0, vocab)
    results, ranks, made = _simulated(monkeypatch, vocab, world, run)
    assert made == 2  # the forward's all-gather, the backward's all-reduce
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=2**-6)
    for (lp, ent, lse, gi, gw, gb), (lo, hi) in zip(results, ranks, strict=True):
        assert (lp <= 0).all() and (ent >= 0).all()
        for name, ours, theirs in (("log_prob", lp, expected[0]), ("entropy", ent, expected[1])):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(lse, expected[2], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gi, expected[3], **tol)
        torch.testing.assert_close(gw, expected[4][lo:hi], **tol)
        if bias:
            torch.testing.assert_close(gb, expected[5][lo:hi], **tol)
