"""Host suite of ``python -m fusedopt bench``: the host (Python) time of one optimizer step,
kernel excluded.

Each row: the time ``opt.step()`` takes to return, median (p20, p80) of ``--host-steps`` steps
after 10 untimed ones, by ``time.perf_counter``, on the optim suite's optimizers, layouts and
dtypes. Rows have no bytes.

* CUDA: launches are asynchronous, so this is the scan, planning, scalar upload and launch; the
  stream is drained before each timed step, outside the timed region, so a full launch queue
  never blocks the host. torch's foreach and fused steps are measured the same way.
* CPU (``fusedopt bench`` runs under the interpreter without CUDA): CPU tensors take the Triton
  path (scan, plan, tables, scalars) and the step runs inside
  ``fusedopt._multi_tensor.dry_run()``, so no kernel runs. Moving the small per-step tables to
  the device is free on CPU (pinned copies on CUDA), so this slightly underestimates the CUDA
  host cost. Only fusedopt's rows run (torch's CPU steps would include the math).

Host time is real on any machine, so this suite is timed without CUDA too; ``--smoke`` runs each
path once on the tiny layout, untimed.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable

import torch

from fusedopt import _multi_tensor
from fusedopt.cli import bench_optim

TITLE = "host time of opt.step(), kernel excluded (ms), every row"
HEADERS = ("optimizer", "layout")
FLOOR_TITLE = None
IMPLS = ("fusedopt", "torch-foreach", "torch-fused")
WARMUP_STEPS = 10


def step_times(step: Callable[[], object], steps: int, warmup: int, cuda: bool) -> list[float]:
    """Wall time of each of ``steps`` calls of ``step`` after ``warmup`` untimed ones, in ms (with
    ``cuda``, the stream drained before each call, untimed)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    if cuda:
        torch.cuda.synchronize()
    return times


def quantiles(times: list[float]) -> dict:
    """Median, p20 and p80 of ``times`` (ms), as the row's timing columns."""
    p20, _, _, p80 = statistics.quantiles(times, n=5) if len(times) > 1 else times * 4
    return {"ms": statistics.median(times), "ms_p20": p20, "ms_p80": p80}


class Case(bench_optim.Case):
    """One row: an optimizer, a layout, a dtype, an implementation (the optim suite's params)."""

    def base_row(self) -> dict:
        return {**super().base_row(), "suite": "host", "bytes_per_elt": None, "bytes": None}

    def run(self, ctx) -> dict:
        row = self.base_row()
        opt = bench_optim.OPTIMIZERS[self.optimizer].make(self.impl, self.params(ctx))
        try:
            with contextlib.nullcontext() if ctx.cuda else _multi_tensor.dry_run():
                if ctx.smoke:
                    opt.step()
                    return row
                row.update(quantiles(step_times(opt.step, ctx.host_steps, WARMUP_STEPS, ctx.cuda)))
        finally:
            del opt
            ctx.release()
        if not ctx.cuda:
            triton_path = _multi_tensor.runs_triton(torch.device(ctx.device))
            row["note"] = (
                "launches skipped (dry_run)" if triton_path else "no interpreter: the whole CPU step"
            )
        return row


def cases(args, ctx) -> list[Case]:
    impls = [i for i in IMPLS if i in args.impls and (ctx.cuda or i == "fusedopt")]
    layouts = ["smoke"] if ctx.smoke else args.layouts
    return [
        Case(o, lay, d, i) for d in args.dtypes for lay in layouts for o in args.optimizers for i in impls
    ]


def floor_rows(args) -> list[dict]:
    return []  # host time has no byte floor
