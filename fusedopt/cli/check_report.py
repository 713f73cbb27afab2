"""What ``fusedopt check`` prints after its runs: the optimizer and loss tables, the tolerances
they were judged by, a line per case that did not pass, and the verdict.
"""

from __future__ import annotations

import torch

from fusedopt.cli import common
from fusedopt.testing import Result
from fusedopt.tolerance import LOSS_TOLERANCE, OPTIM_TOLERANCE

STATE_ORDER = ["momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"]


def optimizer_table(results: list[Result]) -> str:
    keys = sorted({k for r in results for k in r.errors if k != "param"}, key=_state_rank)
    columns = [
        ("name", "optimizer", ""),
        ("options", "options", ""),
        ("dtype", "dtype", ""),
        ("steps", "steps", "d"),
        ("param", "params", ".1e"),
        *((k, k, ".1e") for k in keys),
        ("ratio", "err/tol", ".2f"),
        ("verdict", "verdict", ""),
    ]
    return common.table_text([_row(r) for r in results], columns)


def loss_table(results: list[Result]) -> str:
    columns = [
        ("name", "loss", ""),
        ("options", "options", ""),
        ("dtype", "dtype", ""),
        ("shape", "input", ""),
        ("value", "value", ".1e"),
        ("grad", "grad", ".1e"),
        ("ratio", "err/tol", ".2f"),
        ("verdict", "verdict", ""),
    ]
    return common.table_text([_row(r) for r in results], columns)


def _state_rank(key: str) -> tuple[int, str]:
    return (STATE_ORDER.index(key) if key in STATE_ORDER else len(STATE_ORDER), key)


def _row(r: Result) -> dict:
    row = {"name": r.name, "options": r.options, "dtype": r.dtype, "steps": r.steps, "shape": r.shape}
    row.update(r.errors)
    row["ratio"] = None if r.error else r.ratio
    row["verdict"] = r.verdict
    return row


def tolerance_lines(table: dict, dtypes: list[torch.dtype]) -> str:
    parts = []
    for dt in dtypes:
        tol = table[dt]
        name = common.DTYPE_NAMES[dt]
        if "ulps" in tol:
            parts.append(f"{name}: {tol['ulps']:g} rounding step(s) of the dtype + 8·2⁻²⁴·max|torch|")
        elif "atol" in tol:
            parts.append(f"{name}: rtol {tol['rtol']:g}, atol {tol['atol']:g}")
        else:
            parts.append(f"{name}: rtol {tol['rtol']:g}, atol rtol·max|torch|")
    return "; ".join(parts)


def report(
    optim_results: list[Result], loss_results: list[Result], dtypes: list[torch.dtype], elapsed: float
) -> int:
    """Both tables, the tolerances, every case that did not pass and the verdict; 0 if every
    case passed."""
    if optim_results:
        print(optimizer_table(optim_results))
        print(
            "columns: max|ours - torch| / max|torch| per tensor, the largest over the param list; "
            f"step counters compared exactly.\ntolerance: {tolerance_lines(OPTIM_TOLERANCE, dtypes)}\n"
        )
    if loss_results:
        print(loss_table(loss_results))
        print(
            "columns: max|ours - torch| / max|torch| of the loss value and of the input gradient.\n"
            f"tolerance: {tolerance_lines(LOSS_TOLERANCE, dtypes)}\n"
        )
    print("err/tol: the largest element error divided by what the tolerance allows there (<= 1 passes).")
    results = optim_results + loss_results
    failed = [r for r in results if r.verdict != "PASS"]
    for r in failed:
        detail = r.error or "; ".join([*([f"worst {r.worst}"] if r.ratio > 1 else []), *r.notes[:3]])
        print(f"{r.verdict}: {r.name} ({r.options}) {r.dtype}: {detail}")
    if failed:
        print(f"FAILED: {len(failed)} of {len(results)} checks ({elapsed:.1f}s)")
        return 1
    print(f"OK: all {len(results)} checks within tolerance ({elapsed:.1f}s)")
    return 0
