"""The tolerance contract's checker itself (``fusedopt.testing.assert_close`` and its
``Result``): what it lets through and what it must catch, so that a test built on it can fail."""

from __future__ import annotations

import math

import pytest
import torch

from fusedopt.testing import assert_close
from fusedopt.tolerance import LOSS_TOLERANCE, OPTIM_TOLERANCE, spacing

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
