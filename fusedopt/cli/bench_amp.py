"""Suite ``amp`` of ``python -m fusedopt bench`` (also ``python -m fusedopt.cli.bench_amp``): the
optimizer phase of an AMP step (unscale, clip to norm 1, AdamW step, scaler update) on GPT-2 small's
fp32 params: torch's recipe, the same lines with fusedopt's parts, and fusedopt's two passes; and
clip + step captured in a CUDA graph. The scale stays 1, so every path makes all its passes.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

import torch

import fusedopt
from fusedopt import floors
from fusedopt.cli.bench_optim import graph_replay, make_params, numel_of, shapes_of
from fusedopt.cli.common import Job, Suite

TITLE = "AMP optimizer phase, AdamW over fp32 params, every row"
FLOOR_TITLE = "bytes of the AMP optimizer phase, GPT-2 small (its floor: norm + step, 32 B per fp32 element)"
IMPLS = ("fusedopt", "fusedopt-recipe", "torch-foreach", "torch-fused")
MAX_NORM = 1.0
SCALER, GRAPH = "GradScaler+clip+AdamW", "clip+AdamW, CUDA graph"
RECIPES = {  # (case, impl): its recipe in fusedopt.floors.amp_phase
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
        capturable = device == "cuda"  # torch's for-loop and foreach steps refuse it on CPU, and so do we
        if impl == "fusedopt":
            step = fusedopt.FusedAdamW(params, lr=1e-3, capturable=capturable, max_grad_norm=MAX_NORM).step
        else:
            opt = torch.optim.AdamW(params, lr=1e-3, fused=True, capturable=capturable)

            def step() -> None:
                torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
                opt.step()

        return graph_replay(step) if device == "cuda" else step
    scaler_cls = fusedopt.GradScaler if impl == "fusedopt" else torch.amp.GradScaler
    scaler = scaler_cls(device, init_scale=1.0, growth_interval=2**30)
    if impl == "fusedopt":  # unscale + clip inside the step
        opt, clip = fusedopt.FusedAdamW(params, lr=1e-3, max_grad_norm=MAX_NORM), None
    elif impl == "fusedopt-recipe":
        opt, clip = fusedopt.FusedAdamW(params, lr=1e-3), fusedopt.clip_grad_norm_
    else:
        flag = {"torch-fused": "fused", "torch-foreach": "foreach"}[impl]
        opt, clip = torch.optim.AdamW(params, lr=1e-3, **{flag: True}), torch.nn.utils.clip_grad_norm_
    scaler.scale(torch.ones((), device=device))  # the scale exists once a loss was scaled

    def amp_phase() -> None:
        if clip is not None:
            scaler.unscale_(opt)
            clip(params, MAX_NORM)
        scaler.step(opt)
        scaler.update()

    return amp_phase


def base_row(case: str, impl: str, layout: str) -> dict:
    shapes = shapes_of(layout)
    numel = numel_of(shapes)
    per_elt = floors.amp_phase("fusedopt").bytes_per_element()
    row = {"suite": "amp", "case": case, "impl": impl, "layout": layout, "dtype": "fp32"}
    row.update(tensors=len(shapes), numel=numel, bytes_per_elt=per_elt, bytes=per_elt * numel)
    return {**row, "impl_bytes_per_elt": floors.amp_phase(RECIPES[case, impl]).bytes_per_element()}


def time_phase(case: str, impl: str, layout: str, ctx) -> dict:
    """The phase timed (a smoke run: only run) on fresh params."""
    params = make_params(shapes_of(layout), torch.float32, ctx.device)
    call = phase(case, impl, params, ctx.device)
    call()  # state created, kernels built (a graph: captured)
    return ctx.measure(call)


def jobs(args, ctx) -> list[Job]:
    layout = "smoke" if ctx.tiny else "gpt2"
    keys = [(case, impl, layout) for case, impl in RECIPES if impl in args.impls]
    return [(base_row(*key), functools.partial(time_phase, *key)) for key in keys]


def floor_rows(args) -> list[dict]:
    rows = [base_row(case, impl, "gpt2") for case, impl in RECIPES]
    return [{**row, "passes": str(floors.amp_phase(RECIPES[row["case"], row["impl"]]))} for row in rows]


SUITE = Suite(TITLE, ("phase", "layout"), IMPLS, jobs, FLOOR_TITLE, floor_rows)

if __name__ == "__main__":  # the old entry point: python -m fusedopt.cli.bench_amp [bench options]
    from fusedopt.__main__ import main

    sys.exit(main(["bench", "--suites", "amp", *sys.argv[1:]]))
