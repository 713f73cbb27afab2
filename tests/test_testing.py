"""The tolerance contract's checker itself (``fusedopt.testing.assert_close`` and its
``Result``): what it lets through and what it must catch, so that a test built on it can fail."""

from __future__ import annotations

import math

import pytest
import torch

import fusedopt
from fusedopt import testing
from fusedopt._norm import clip_coefficient
from fusedopt.cli import check
from fusedopt.optim import _amp, _fused
from fusedopt.testing import OPTIM_CASES, assert_close
from fusedopt.tolerance import CLIP_TOLERANCE, LOSS_TOLERANCE, OPTIM_TOLERANCE, spacing

NAN, INF = math.nan, math.inf
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
TABLES = pytest.mark.parametrize("table", [OPTIM_TOLERANCE, LOSS_TOLERANCE], ids=["optim", "loss"])


def t(values, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


@TABLES
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_must_match_nan(table, dtype):
    """NaN where torch has NaN passes; NaN where torch has a number fails, and so does the
    reverse, naming the element."""
    assert_close(t([NAN, 1.0, -2.0], dtype), t([NAN, 1.0, -2.0], dtype), "x", table)
    for actual, expected in (([NAN, 1.0], [0.5, 1.0]), ([0.5, 1.0], [NAN, 1.0])):
        with pytest.raises(AssertionError, match=r"worst x\[0\]: .* vs torch .*inf"):
            assert_close(t(actual, dtype), t(expected, dtype), "x", table)


@TABLES
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_infinities(table, dtype):
    """The same infinities pass; an infinity where torch has a number fails."""
    assert_close(t([INF, -INF, 1.0], dtype), t([INF, -INF, 1.0], dtype), "x", table)
    with pytest.raises(AssertionError, match=r"worst x\[0\]"):
        assert_close(t([INF, 1.0], dtype), t([3.0, 1.0], dtype), "x", table)


@TABLES
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_infinite_oracle_elements_are_checked(table, dtype):
    """A number, or the other infinity, where torch has an infinity fails; an infinity in the
    oracle does not hide another element's error."""
    for actual, expected in (([-INF, 1.0], [INF, 1.0]), ([3.0, 1.0], [INF, 1.0]), ([INF, 3.0], [INF, 1.0])):
        with pytest.raises(AssertionError):
            assert_close(t(actual, dtype), t(expected, dtype), "x", table)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_steps(dtype):
    """bf16/fp16: one rounding step of the dtype from the oracle (optimizers), two (losses)."""
    e = t([0.3, -1.7, 5e-3], dtype)
    step = spacing(e).to(dtype)
    assert_close(e + step, e.float(), "x", OPTIM_TOLERANCE)
    assert_close(e + 2 * step, e.float(), "x", LOSS_TOLERANCE)
    with pytest.raises(AssertionError, match=r"worst x\[\d\]"):
        assert_close(e + 2 * step, e.float(), "x", OPTIM_TOLERANCE)
    with pytest.raises(AssertionError, match=r"worst x\[\d\]"):
        assert_close(e + 3 * step, e.float(), "x", LOSS_TOLERANCE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_relative_tolerance_and_worst_element(dtype):
    """fp32/fp64: ``rtol`` of the table (losses: plus ``rtol`` of the largest magnitude); the
    message names the worst element by its index."""
    rtol = OPTIM_TOLERANCE[dtype]["rtol"]
    e = torch.linspace(1.0, 2.0, 6, dtype=torch.float64).reshape(2, 3).to(dtype)
    assert_close(e * (1 + rtol / 2), e, "x", OPTIM_TOLERANCE)
    bad = e.clone()
    bad[1, 2] *= 1 + 4 * rtol
    with pytest.raises(AssertionError, match=r"worst x\[1, 2\]"):
        assert_close(bad, e, "x", OPTIM_TOLERANCE)
    # Losses: an element near zero is held to rtol of the largest one, not of itself.
    small = t([1.0, 1e-3], dtype)
    assert_close(small + t([0.0, LOSS_TOLERANCE[dtype]["rtol"] / 2], dtype), small, "x", LOSS_TOLERANCE)
    with pytest.raises(AssertionError, match=r"worst x\[1\]"):
        assert_close(small + t([0.0, 4 * LOSS_TOLERANCE[dtype]["rtol"]], dtype), small, "x", LOSS_TOLERANCE)


def test_shape_mismatch_fails():
    with pytest.raises(AssertionError, match=r"shape \(3,\) vs torch \(1, 3\)"):
        assert_close(torch.zeros(3), torch.zeros(1, 3), "x", OPTIM_TOLERANCE)


# max_grad_norm: the oracle takes ours' coefficient once it is checked -------------------------

CLIPPED = [c for c in OPTIM_CASES if "max_grad_norm" in c.kwargs]


def clipped_result(case, dtype: torch.dtype, width: int, steps: int = 5):
    """``case`` as ``fusedopt check`` runs it, on a GPT-shaped param list of d=``width``."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return check.optimizer_result(case, dtype, device, testing.gpt_shapes(width, 2, 97), steps)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CLIPPED, ids=lambda c: c.id)
def test_clipped_low_precision_steps_pass(case, dtype):
    """A clip coefficient a few fp32 roundings from torch's (another summation order, as close
    to fp64) flips bf16/fp16 roundings of the state; a momentum that later cancels keeps the
    flip as many rounding steps of its own value. The check failed these correct kernels from
    d=32 on (err/tol up to ~100 at d=48)."""
    assert {c.fused_cls for c in CLIPPED} >= {fusedopt.FusedSGD, fusedopt.FusedAdamW}
    result = clipped_result(case, dtype, 32)
    assert result.verdict == "PASS", result.explain()
    assert 0.0 <= result.errors["clip_coef"] <= CLIP_TOLERANCE[torch.float32]


class _ClipAppliedOff:
    """``fusedopt.optim._amp`` as the optimizer sees it, except that the coefficient its step
    multiplies the grads by is 1 % larger than the one computed (and observed) for it."""

    def __getattr__(self, name):
        return getattr(_amp, name)

    @staticmethod
    def clip_coefficient(*args, **kwargs):
        return _amp.clip_coefficient(*args, **kwargs) * 1.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CLIPPED, ids=lambda c: c.id)
@pytest.mark.parametrize("wrong", ["coefficient", "applied"])
def test_a_clip_one_percent_off_fails(monkeypatch, case, dtype, wrong):
    """A clip coefficient 1 % off torch's formula fails at the coefficient; a right one that
    the step applies 1 % off fails at the params or state."""
    if wrong == "coefficient":
        monkeypatch.setattr(
            _amp, "coefficient_of", lambda total, max_norm: 1.01 * clip_coefficient(total, max_norm)
        )
    else:
        monkeypatch.setattr(_fused, "_amp", _ClipAppliedOff())
    result = clipped_result(case, dtype, width=8, steps=2)
    assert result.verdict == "FAIL", result.explain()
    assert ("clip coefficient" in result.worst) is (wrong == "coefficient"), result.worst


def test_int8_case_that_holds_no_8bit_state_fails():
    """``state_dtype="int8"`` on params all under the 8-bit minimum compares fp32 state only:
    a check that tests nothing it names is a failure, not a pass."""
    case = next(c for c in OPTIM_CASES if c.kwargs.get("state_dtype") == "int8")
    gen = torch.Generator().manual_seed(0)
    small = [torch.randn(40, 50, generator=gen), torch.randn(7, generator=gen)]
    result = testing.compare_optimizer(case, small, steps=1)
    assert result.verdict == "FAIL" and "compared no 8-bit state" in result.explain(), result.explain()
    assert result.ratio <= 1.0  # the values themselves are right
    large = [*small, torch.randn(4097, generator=gen)]
    assert testing.compare_optimizer(case, large, steps=1).verdict == "PASS"
