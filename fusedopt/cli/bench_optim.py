"""Optimizer-step suite of ``python -m fusedopt bench``: fusedopt against torch.optim.

Each fused optimizer (SGD with momentum=0.9) against torch's for-loop (``foreach=False``),
``foreach=True``, ``fused=True`` and a ``torch.compile``d step (the default, foreach path), on
three layouts (one 64M-element tensor, GPT-2 small's 148 tensors, 1000 tensors of 4096
elements). Each implementation's step is timed with ``triton.testing.do_bench`` (median, 20th
and 80th percentile); the small-tensor layout also gets a second figure: the step captured once
in a ``torch.cuda.CUDAGraph`` and replayed (``capturable=True`` where the class has it). Bytes
come from the byte floor (``fusedopt.floors.step``), the same for every implementation, so GB/s
and % of copy compare time directly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import fusedopt
from fusedopt import floors
from fusedopt.cli import common

TITLE = "optimizer step, every row"
HEADERS = ("optimizer", "layout")  # what the case and layout columns hold
FLOOR_TITLE = "byte floor of one optimizer step (read p, g, state; write p, state)"
IMPLS = ("fusedopt", "torch-forloop", "torch-foreach", "torch-fused", "torch-compile")


# Layouts ------------------------------------------------------------------------------------


def gpt2_small_shapes(
    d: int = 768, vocab: int = 50257, context: int = 1024, layers: int = 12
) -> list[tuple[int, ...]]:
    """GPT-2 small's parameter shapes (HF Conv1D layout): 148 tensors, 124,439,808 elements
    (other sizes: a GPT-2 of that width, vocabulary, context and depth)."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (context, d)]  # wte, wpe
    for _ in range(layers):
        shapes += [
            (d,),  # ln_1.weight
            (d,),  # ln_1.bias
            (d, 3 * d),  # attn.c_attn.weight
            (3 * d,),  # attn.c_attn.bias
            (d, d),  # attn.c_proj.weight
            (d,),  # attn.c_proj.bias
            (d,),  # ln_2.weight
            (d,),  # ln_2.bias
            (d, 4 * d),  # mlp.c_fc.weight
            (4 * d,),  # mlp.c_fc.bias
            (4 * d, d),  # mlp.c_proj.weight
            (d,),  # mlp.c_proj.bias
        ]
    return [*shapes, (d,), (d,)]  # ln_f.weight, ln_f.bias


LAYOUTS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "single64m": lambda: [(64 * 2**20,)],
    "gpt2": gpt2_small_shapes,
    "many4k": lambda: [(4096,)] * 1000,
}
LAYOUT_HELP = "single64m: one 64M-element tensor; gpt2: GPT-2 small (148 tensors); many4k: 1000 x 4096"
GRAPH_LAYOUTS = ("many4k",)  # layouts that also get the CUDA-graph replay figure
SMOKE_SHAPES = [(7,), (3, 5), (1000,), (2, 3, 4), (4097,)]


def numel_of(shapes: list[tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes)


# Optimizers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimSpec:
    """One optimizer as fusedopt and torch.optim build it."""

    fused_cls: type[torch.optim.Optimizer]
    torch_cls: type[torch.optim.Optimizer]
    kwargs: dict = field(default_factory=dict)
    capturable_flag: bool = False  # the class has ``capturable`` (needed for CUDA-graph capture)

    @property
    def label(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.kwargs.items() if k != "lr")
        return f"{self.fused_cls.__name__}({extra})" if extra else self.fused_cls.__name__

    @property
    def floor(self) -> floors.Floor:
        return floors.step(self.fused_cls, **self.kwargs)

    def make(self, impl: str, params: list[torch.Tensor], capturable: bool = False) -> torch.optim.Optimizer:
        """The optimizer of one implementation over ``params`` (``capturable`` where it exists)."""
        kwargs = dict(self.kwargs)
        if capturable and self.capturable_flag:
            kwargs["capturable"] = True
        if impl == "fusedopt":
            return self.fused_cls(params, **kwargs)
        flags = {
            "torch-forloop": {"foreach": False},
            "torch-foreach": {"foreach": True},
            "torch-fused": {"fused": True},
            "torch-compile": {},  # torch's default: foreach on CUDA
        }[impl]
        return self.torch_cls(params, **kwargs, **flags)


OPTIMIZERS: dict[str, OptimSpec] = {
    "adam": OptimSpec(fusedopt.FusedAdam, torch.optim.Adam, {"lr": 1e-3}, capturable_flag=True),
    "adamw": OptimSpec(fusedopt.FusedAdamW, torch.optim.AdamW, {"lr": 1e-3}, capturable_flag=True),
    "sgd": OptimSpec(fusedopt.FusedSGD, torch.optim.SGD, {"lr": 1e-3, "momentum": 0.9}),
    "rmsprop": OptimSpec(fusedopt.FusedRMSprop, torch.optim.RMSprop, {"lr": 1e-3}, capturable_flag=True),
    "adagrad": OptimSpec(fusedopt.FusedAdagrad, torch.optim.Adagrad, {"lr": 1e-3}),
}


def make_params(
    shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device | str, seed: int = 0
) -> list[torch.Tensor]:
    """Leaf params with grads set once (``p.grad = torch.randn_like(p)``)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.randn(shape, dtype=dtype, device=device, generator=gen).requires_grad_()
        p.grad = torch.randn(shape, dtype=dtype, device=device, generator=gen)
        params.append(p)
    return params


def step_fn(opt: torch.optim.Optimizer, impl: str, compile_backend: str) -> Callable[[], object]:
    """What one timed call runs: ``opt.step``, or a ``torch.compile``d function calling it."""
    if impl != "torch-compile":
        return opt.step
    torch.compiler.reset()  # a fresh cache: no recompile limit reached, no stale graphs

    @torch.compile(backend=compile_backend)
    def compiled_step() -> None:
        opt.step()

    return compiled_step


def graph_replay(step: Callable[[], object]) -> Callable[[], object]:
    """``step`` captured once in a CUDA graph (after warm-up on a side stream); its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # state created, kernels compiled, caches filled
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


# Cases --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One row: an optimizer, a layout, a dtype, an implementation."""

    optimizer: str
    layout: str
    dtype: str
    impl: str

    def shapes(self) -> list[tuple[int, ...]]:
        return SMOKE_SHAPES if self.layout == "smoke" else LAYOUTS[self.layout]()

    def base_row(self) -> dict:
        spec = OPTIMIZERS[self.optimizer]
        shapes = self.shapes()
        numel = numel_of(shapes)
        per_elt = spec.floor.bytes_per_element(common.DTYPES[self.dtype])
        return {
            "suite": "optim",
            "case": spec.label,
            "impl": self.impl,
            "layout": self.layout,
            "dtype": self.dtype,
            "tensors": len(shapes),
            "numel": numel,
            "bytes_per_elt": per_elt,
            "bytes": per_elt * numel,
        }

    def params(self, ctx) -> list[torch.Tensor]:
        """The layout's params with grads, shared by the rows of one layout and dtype."""
        return ctx.params(
            (self.layout, self.dtype),
            lambda: make_params(self.shapes(), common.DTYPES[self.dtype], ctx.device),
        )

    def run(self, ctx) -> dict:
        """The step timed (or, in a smoke run, only run), peak extra memory, graph replay.

        ``ctx`` (``fusedopt.cli.bench_harness.Context``) says whether to time, the do_bench
        settings, the compile backend and the graph layouts.
        """
        spec = OPTIMIZERS[self.optimizer]
        row, params = self.base_row(), self.params(ctx)
        opt = spec.make(self.impl, params)
        try:
            step = step_fn(opt, self.impl, ctx.compile_backend)
            step()  # state created, kernels (or the compiled graph) built
            row.update(ctx.measure(step))
        finally:
            del opt
            ctx.release()
        if self.layout in ctx.graph_layouts and self.impl != "torch-compile":
            row.update(graph_figure(spec, self.impl, params, ctx))
        return row


def cases(args, ctx) -> list[Case]:
    """Every row, in the order they run: dtype, layout, optimizer, implementation; the compiled
    steps (slow to compile) last, fewest tensors first, so a run cut by a time limit has all
    the other rows."""
    impls = [i for i in IMPLS if i in args.impls]
    eager = [i for i in impls if i != "torch-compile"]
    lays = ["smoke"] if ctx.tiny else args.layouts
    out = [Case(o, lay, d, i) for d in args.dtypes for lay in lays for o in args.optimizers for i in eager]
    if "torch-compile" in impls:
        by_size = sorted(lays, key=lambda lay: len(LAYOUTS[lay]()) if lay in LAYOUTS else 0)
        out += [
            Case(o, lay, d, "torch-compile") for lay in by_size for d in args.dtypes for o in args.optimizers
        ]
    return out


def graph_figure(spec: OptimSpec, impl: str, params: list[torch.Tensor], ctx) -> dict:
    """The step captured in a CUDA graph and replayed; a failed capture is reported, not raised."""
    if not ctx.cuda:
        return {"graph_note": "CUDA graphs need CUDA"}
    note = "capturable=True" if spec.capturable_flag else ""
    opt = spec.make(impl, params, capturable=True)
    try:
        replay = graph_replay(opt.step)
        timing = ctx.measure(replay, memory=False)
        names = {"ms": "graph_ms", "ms_p20": "graph_p20", "ms_p80": "graph_p80"}
        return {**{names[k]: v for k, v in timing.items()}, "graph_note": note}
    except Exception as e:  # capture not supported by this path: a row note, not a crash
        return {"graph_note": f"capture failed: {common.short_error(e, 100)}"}
    finally:
        del opt
        with contextlib.suppress(Exception):  # after a failed capture, keep the row's step timing
            ctx.release()


def floor_rows(args) -> list[dict]:
    """Bytes one step must move at least, per dtype, layout and optimizer (no timing)."""
    cases = [
        Case(o, lay, d, "fusedopt") for d in args.dtypes for lay in args.layouts for o in args.optimizers
    ]
    return [{**case.base_row(), "impl": None} for case in cases]
