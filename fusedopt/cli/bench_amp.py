"""AMP suite of ``python -m fusedopt bench``: the whole optimizer phase of an AMP training step,
torch's recipe against fusedopt's.

Per timed call, on GPT-2 small's 148 fp32 tensors (124M elements; any ``--dtypes``: these are
AMP's fp32 master params) with fp32 grads, AdamW. Case ``GradScaler+clip+AdamW``:

* ``torch-fused`` / ``torch-foreach``: torch's recipe, ``scaler.unscale_(opt)``,
  ``torch.nn.utils.clip_grad_norm_(params, 1.0)``, ``scaler.step(opt)``, ``scaler.update()``
  with ``torch.amp.GradScaler`` and ``AdamW(fused=True)`` / ``AdamW(foreach=True)``;
* ``fusedopt-recipe``: the same four lines with ``fusedopt.FusedAdamW`` and
  ``fusedopt.clip_grad_norm_`` (the one-import change);
* ``fusedopt``: ``fusedopt.GradScaler`` and ``FusedAdamW(max_grad_norm=1.0)``:
  ``scaler.step(opt)``, ``scaler.update()``.

Case ``clip+AdamW, CUDA graph``: no scaler; clip + step captured once in a CUDA graph and
replayed (``torch-fused``: ``clip_grad_norm_`` + ``AdamW(fused=True, capturable=True)``;
``fusedopt``: ``FusedAdamW(capturable=True, max_grad_norm=1.0).step()``). Without CUDA the step
runs uncaptured.

Bytes (``fusedopt.floors.amp_phase``): ``bytes_per_elt`` is the phase's floor, one read of the
grads for the norm plus the step (32 B per fp32 element), the same for every row, so GB/s
compares time directly; ``impl_bytes_per_elt`` is what the implementation's passes move: 48 B
for torch's recipe (unscale_ r+w, norm r, clip r+w, step), 40 B for torch's graph, 32 B for
fusedopt's.

The scale stays 1.0 (``init_scale=1``, no growth within a run), so repeated calls leave the
grads' values unchanged after the first clip; every path still makes all its passes. Each row
gets fresh params.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

import fusedopt
from fusedopt import floors
from fusedopt.cli.bench_optim import SMOKE_SHAPES, gpt2_small_shapes, graph_replay, make_params, numel_of

TITLE = "AMP optimizer phase, AdamW over fp32 params, every row"
HEADERS = ("phase", "layout")
FLOOR_TITLE = "bytes of the AMP optimizer phase, GPT-2 small (its floor: norm + step, 32 B per fp32 element)"
IMPLS = ("fusedopt", "fusedopt-recipe", "torch-foreach", "torch-fused")
MAX_NORM = 1.0
SCALER, GRAPH = "GradScaler+clip+AdamW", "clip+AdamW, CUDA graph"
RECIPES = {  # (case, impl): its recipe in fusedopt.floors.amp_phase; fusedopt first in each case
    (SCALER, "fusedopt"): "fusedopt",
    (SCALER, "fusedopt-recipe"): "torch",
    (SCALER, "torch-foreach"): "torch",
    (SCALER, "torch-fused"): "torch",
    (GRAPH, "fusedopt"): "fusedopt",
    (GRAPH, "torch-fused"): "torch-graph",
}


def phase(case: str, impl: str, params: list[torch.Tensor], device: str) -> Callable[[], object]:
    """One call of ``impl``'s optimizer phase over ``params`` (grads already set)."""
    if case == GRAPH:
        if impl == "fusedopt":
            step = fusedopt.FusedAdamW(params, lr=1e-3, capturable=True, max_grad_norm=MAX_NORM).step
        else:
            opt = torch.optim.AdamW(params, lr=1e-3, fused=True, capturable=True)

            def step() -> None:
                torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
                opt.step()

        return graph_replay(step) if device == "cuda" else step
    scale = dict(init_scale=1.0, growth_interval=2**30)
    if impl == "fusedopt":
        opt = fusedopt.FusedAdamW(params, lr=1e-3, max_grad_norm=MAX_NORM)
        scaler = fusedopt.GradScaler(device, **scale)
        clip = None
    else:
        if impl == "fusedopt-recipe":
            opt, clip = fusedopt.FusedAdamW(params, lr=1e-3), fusedopt.clip_grad_norm_
        else:
            flag = {"torch-fused": "fused", "torch-foreach": "foreach"}[impl]
            opt, clip = torch.optim.AdamW(params, lr=1e-3, **{flag: True}), torch.nn.utils.clip_grad_norm_
        scaler = torch.amp.GradScaler(device, **scale)
    scaler.scale(torch.ones((), device=device))  # the scale exists once a loss was scaled

    def amp_phase() -> None:
        if clip is not None:
            scaler.unscale_(opt)
            clip(params, MAX_NORM)
        scaler.step(opt)
        scaler.update()

    return amp_phase


@dataclass(frozen=True)
class Case:
    """One row: a phase (``SCALER`` or ``GRAPH``), an implementation, a layout."""

    case: str
    impl: str
    layout: str  # "gpt2", or "smoke"

    def shapes(self) -> list[tuple[int, ...]]:
        return SMOKE_SHAPES if self.layout == "smoke" else gpt2_small_shapes()

    def base_row(self) -> dict:
        shapes = self.shapes()
        numel = numel_of(shapes)
        per_elt = floors.amp_phase("fusedopt").bytes_per_element()
        return {
            "suite": "amp",
            "case": self.case,
            "impl": self.impl,
            "layout": self.layout,
            "dtype": "fp32",
            "tensors": len(shapes),
            "numel": numel,
            "bytes_per_elt": per_elt,
            "bytes": per_elt * numel,
            "impl_bytes_per_elt": floors.amp_phase(RECIPES[self.case, self.impl]).bytes_per_element(),
        }

    def run(self, ctx) -> dict:
        """The phase timed (or, in a smoke run, only run) on fresh params."""
        try:
            return _measure(self, ctx)
        finally:
            ctx.release()  # the params are gone by now


def _measure(case: Case, ctx) -> dict:
    row = case.base_row()
    params = make_params(case.shapes(), torch.float32, ctx.device)
    call = phase(case.case, case.impl, params, ctx.device)
    call()  # state created, kernels built (a graph: captured)
    row.update(ctx.measure(call))
    return row


def cases(args, ctx) -> list[Case]:
    layout = "smoke" if ctx.tiny else "gpt2"
    return [Case(case, impl, layout) for case, impl in RECIPES if impl in args.impls]


def floor_rows(args) -> list[dict]:
    rows = []
    for case, impl in RECIPES:
        row = Case(case, impl, "gpt2").base_row()
        rows.append({**row, "passes": str(floors.amp_phase(RECIPES[case, impl]))})
    return rows


if __name__ == "__main__":  # the old entry point: python -m fusedopt.cli.bench_amp [bench options]
    from fusedopt.__main__ import main

    sys.exit(main(["bench", "--suites", "amp", *sys.argv[1:]]))
