"""Suites ``optim`` and ``host`` of ``python -m fusedopt bench``: one optimizer step against torch's
for-loop, foreach, fused and ``torch.compile``d steps (``GRAPH_LAYOUTS``: also captured in a CUDA
graph); the host time of ``opt.step()``, kernel excluded (on CPU: fusedopt's, in ``dry_run()``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import math
import statistics
import time
from collections.abc import Callable

import torch

import fusedopt
from fusedopt import _multi_tensor, floors, testing
from fusedopt.cli.common import DTYPES, Job, Suite, compiled, short_error
from fusedopt.optim._fused import EXTENSIONS
from fusedopt.testing import OptimCase


def _lion_reference() -> type[torch.optim.Optimizer]:
    """Lion's yardstick: the lion-pytorch package's class where installed, else the same
    for-loop in plain torch (``fusedopt.optim.lion.Lion``)."""
    try:
        from lion_pytorch import Lion
    except ImportError:
        from fusedopt.optim.lion import Lion
    return Lion


IMPLS = ("fusedopt", "torch-forloop", "torch-foreach", "torch-fused", "torch-compile")
HOST_IMPLS = ("fusedopt", "torch-foreach", "torch-fused")
TORCH_FLAGS = {
    "torch-forloop": {"foreach": False},
    "torch-foreach": {"foreach": True},
    "torch-fused": {"fused": True},
    "torch-compile": {},  # torch's default: foreach on CUDA
}
OPTIMIZERS: dict[str, OptimCase] = {
    "adam": OptimCase(fusedopt.FusedAdam, torch.optim.Adam, {"lr": 1e-3}),
    "adamw": OptimCase(fusedopt.FusedAdamW, torch.optim.AdamW, {"lr": 1e-3}),
    "sgd": OptimCase(fusedopt.FusedSGD, torch.optim.SGD, {"lr": 1e-3, "momentum": 0.9}),
    "rmsprop": OptimCase(fusedopt.FusedRMSprop, torch.optim.RMSprop, {"lr": 1e-3}),
    "adagrad": OptimCase(fusedopt.FusedAdagrad, torch.optim.Adagrad, {"lr": 1e-3}),
    "adamax": OptimCase(fusedopt.FusedAdamax, torch.optim.Adamax, {"lr": 1e-3}),
    "radam": OptimCase(fusedopt.FusedRAdam, torch.optim.RAdam, {"lr": 1e-3}),
    "nadam": OptimCase(fusedopt.FusedNAdam, torch.optim.NAdam, {"lr": 1e-3}),
    # torch has no Lion: the lion-pytorch package where installed, else its for-loop in plain torch.
    "adadelta": OptimCase(fusedopt.FusedAdadelta, torch.optim.Adadelta, {"lr": 1.0}),
    "rprop": OptimCase(fusedopt.FusedRprop, torch.optim.Rprop, {"lr": 1e-3}),
    "lion": OptimCase(fusedopt.FusedLion, _lion_reference(), {"lr": 1e-4}),
    # Low-precision options (not run by default; torch's rows run its plain step on the same params).
    "adamw-master": OptimCase(fusedopt.FusedAdamW, torch.optim.AdamW, {"lr": 1e-3, "master_weights": True}),
    "adamw-kahan": OptimCase(fusedopt.FusedAdamW, torch.optim.AdamW, {"lr": 1e-3, "kahan_summation": True}),
    "adamw-sr": OptimCase(fusedopt.FusedAdamW, torch.optim.AdamW, {"lr": 1e-3, "stochastic_rounding": True}),
    "adamw-bf16state": OptimCase(
        fusedopt.FusedAdamW, torch.optim.AdamW, {"lr": 1e-3, "state_dtype": torch.bfloat16}
    ),
    "adamw-int8": OptimCase(fusedopt.FusedAdamW, torch.optim.AdamW, {"lr": 1e-3, "state_dtype": "int8"}),
}
if hasattr(torch.optim, "Muon"):  # torch >= 2.9
    # Muon steps a layout's hidden matrices (muon_shapes); torch's one implementation is its for-loop
    OPTIMIZERS["muon"] = OptimCase(fusedopt.FusedMuon, torch.optim.Muon, {"lr": 0.02})
MATRICES_ONLY = {"muon"}
DEFAULT_OPTIMIZERS = [
    "adam",
    "adamw",
    "sgd",
    "rmsprop",
    "adagrad",
    "adamax",
    "radam",
    "nadam",
    "adadelta",
    "rprop",
    "lion",
    *(["muon"] if "muon" in OPTIMIZERS else []),
]


def gpt2_small_shapes(d: int = 768, vocab: int = 50257, context: int = 1024, layers: int = 12):
    """GPT-2 small's 148 param shapes (124,439,808 elements) by default."""
    blocks = testing.gpt_shapes(d, layers, vocab)[1:-1]  # without wte and the 0-d logit_scale
    return [(vocab, d), (context, d), *(shape for _, shape in blocks)]


LAYOUTS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "single64m": testing.one_large_shape,
    "gpt2": gpt2_small_shapes,
    "many4k": testing.many_small_shapes,
}
LAYOUT_HELP = "single64m: one 64M-element tensor; gpt2: GPT-2 small (148 tensors); many4k: 1000 x 4096"
GRAPH_LAYOUTS = ("many4k", "smoke")  # CUDA only
HOST_STEPS = 200  # timed steps per host row, after 10 untimed ones
SMOKE_SHAPES = [(7,), (3, 5), (1000,), (2, 3, 4), (4097,)]


def shapes_of(layout: str, name: str | None = None) -> list[tuple[int, ...]]:
    """The layout's shapes, or for an optimizer of matrices (Muon) its hidden matrices: the 2-D
    shapes after a GPT layout's two embeddings (GPT-2 small: 48), none in the other layouts."""
    shapes = SMOKE_SHAPES if layout == "smoke" else LAYOUTS[layout]()
    if name not in MATRICES_ONLY:
        return shapes
    if layout == "smoke":
        return [(3, 5), (5, 3), (8, 4)]
    return [s for s in shapes[2:] if len(s) == 2] if layout == "gpt2" else []


def numel_of(shapes: list[tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes)


def make_params(shapes, dtype: torch.dtype, device: torch.device | str, seed: int = 0) -> list[torch.Tensor]:
    """Leaf params with grads set once (``p.grad = torch.randn_like(p)``)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.randn(shape, dtype=dtype, device=device, generator=gen).requires_grad_()
        p.grad = torch.randn(shape, dtype=dtype, device=device, generator=gen)
        params.append(p)
    return params


def label(case: OptimCase) -> str:
    """``FusedSGD(momentum=0.9)``: the class and its options other than lr."""
    options = ",".join(f"{k}={v}" for k, v in case.kwargs.items() if k != "lr")
    return f"{case.fused_cls.__name__}({options})" if options else case.fused_cls.__name__


def make(case: OptimCase, impl: str, params: list[torch.Tensor], capturable: bool = False):
    """The optimizer of one implementation over ``params`` (``capturable`` where it exists)."""
    kwargs = dict(case.kwargs)
    if capturable and "capturable" in inspect.signature(case.torch_cls).parameters:
        kwargs["capturable"] = True
    if impl == "fusedopt":
        return case.fused_cls(params, **kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k not in EXTENSIONS}
    takes = inspect.signature(case.torch_cls).parameters
    return case.torch_cls(params, **kwargs, **{k: v for k, v in TORCH_FLAGS[impl].items() if k in takes})


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


def host_times(step: Callable[[], object], steps: int, warmup: int, cuda: bool) -> dict[str, float]:
    """Median, p20 and p80 (ms) of the wall time of ``steps`` calls of ``step`` after ``warmup``
    untimed ones (with ``cuda``, the stream drained before each call, untimed)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    p20, _, _, p80 = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else times * 4
    return {"ms": statistics.median(times), "ms_p20": p20, "ms_p80": p80}


def base_row(suite: str, name: str, layout: str, dtype: str, impl: str | None) -> dict:
    case, shapes = OPTIMIZERS[name], shapes_of(layout, name)
    numel = numel_of(shapes)
    row = {"suite": suite, "case": label(case), "impl": impl, "layout": layout, "dtype": dtype}
    row.update(tensors=len(shapes), numel=numel)
    if suite == "optim" and name not in MATRICES_ONLY:  # host rows move no bytes; Muon's are matmuls
        per_elt = floors.step(case.fused_cls, DTYPES[dtype], **case.kwargs).bytes_per_element(DTYPES[dtype])
        row.update(bytes_per_elt=per_elt, bytes=per_elt * numel)
    return row


def time_step(name: str, layout: str, dtype: str, impl: str, ctx) -> dict:
    """The step timed (a smoke run: only run), its peak extra memory, and the graph replay."""
    case, ps = OPTIMIZERS[name], make_params(shapes_of(layout, name), DTYPES[dtype], ctx.device)
    opt = make(case, impl, ps)
    step = compiled(lambda: opt.step(), ctx.compile_backend) if impl == "torch-compile" else opt.step
    step()  # state created, kernels (or the compiled graph) built
    out = ctx.measure(step)
    step = opt = None  # the optimizer and its state go before the graph figure
    ctx.release()
    if ctx.cuda and layout in GRAPH_LAYOUTS and impl != "torch-compile":
        out.update(graph_figure(case, impl, ps, ctx))
    return out


def graph_figure(case: OptimCase, impl: str, params: list[torch.Tensor], ctx) -> dict:
    """The step captured in a CUDA graph and replayed; a failed capture is a note, not an error."""
    opt = make(case, impl, params, capturable=True)
    try:
        t = ctx.measure(graph_replay(opt.step), memory=False)
        note = "capturable=True" if opt.defaults.get("capturable") else ""
        return {"graph_ms": t["ms"], "graph_p20": t["ms_p20"], "graph_p80": t["ms_p80"], "graph_note": note}
    except Exception as e:  # capture not supported by this path
        return {"graph_note": f"capture failed: {short_error(e, 100)}"}
    finally:
        del opt
        with contextlib.suppress(Exception):  # after a failed capture, keep the row's step timing
            ctx.release()


def time_host(name: str, layout: str, dtype: str, impl: str, ctx) -> dict:
    """Host time of the step (a smoke run: one step, untimed); on CPU no kernel runs (dry_run)."""
    opt = make(OPTIMIZERS[name], impl, make_params(shapes_of(layout, name), DTYPES[dtype], ctx.device))
    with contextlib.nullcontext() if ctx.cuda else _multi_tensor.dry_run():
        if ctx.smoke:
            opt.step()
            return {}
        out = host_times(opt.step, HOST_STEPS, 10, ctx.cuda)
    if not ctx.cuda:
        triton_path = _multi_tensor.runs_triton(torch.device(ctx.device))
        out["note"] = "launches skipped (dry_run)" if triton_path else "no interpreter: the whole CPU step"
    return out


def torch_lacks(case: OptimCase, impl: str) -> str | None:
    """Why torch has no ``impl`` of ``case``'s optimizer (torch.optim.RMSprop takes no
    ``fused``), or None."""
    flags = TORCH_FLAGS.get(impl, {})
    if impl == "torch-forloop" and "foreach" not in inspect.signature(case.torch_cls).parameters:
        return None  # a class with one implementation, a for-loop (torch.optim.Muon)
    missing = [k for k in flags if k not in inspect.signature(case.torch_cls).parameters]
    if not missing:
        return None
    cls, what = case.torch_cls, "/".join(missing)
    name = (
        f"torch.optim.{cls.__name__}"
        if cls.__module__.startswith("torch.")
        else f"{cls.__module__}.{cls.__qualname__}"
    )
    return f"{name} has no {what} implementation (it takes no {what}=)"


def not_applicable(note: str, ctx) -> dict:
    return {"status": "n/a", "note": note}


def jobs(suite: str, args, layouts: list[str], impls: list[str]) -> list[Job]:
    """Rows in the order they run: dtype, layout, optimizer, implementation (an implementation
    torch lacks: a row marked n/a, nothing run)."""
    run = time_step if suite == "optim" else time_host
    out = []
    for d, lay, o, i in itertools.product(args.dtypes, layouts, args.optimizers, impls):
        lacks = i and torch_lacks(OPTIMIZERS[o], i)
        if not shapes_of(lay, o):
            lacks = f"{OPTIMIZERS[o].fused_cls.__name__} steps matrices: the {lay} layout has none"
        measure = functools.partial(not_applicable, lacks) if lacks else functools.partial(run, o, lay, d, i)
        out.append((base_row(suite, o, lay, d, i), measure))
    return out


def optim_jobs(args, ctx) -> list[Job]:
    layouts = ["smoke"] if ctx.tiny else args.layouts
    return jobs("optim", args, layouts, [i for i in IMPLS if i in args.impls])


def optim_floor_rows(args) -> list[dict]:
    """The byte floors of the elementwise optimizers (Muon's step is bound by its matmuls)."""
    return [row for row, _ in jobs("optim", args, args.layouts, [None]) if "bytes" in row]


def host_jobs(args, ctx) -> list[Job]:
    layouts = ["smoke"] if ctx.smoke else args.layouts  # host time is real on CPU: full sizes there
    impls = [i for i in HOST_IMPLS if i in args.impls and (ctx.cuda or i == "fusedopt")]
    return jobs("host", args, layouts, impls)


OPTIM_TITLE = "optimizer step, every row"
HOST_TITLE = "host time of opt.step(), kernel excluded (ms), every row"
FLOOR_TITLE = "byte floor of one optimizer step (read p, g, state; write p, state)"
OPTIM = Suite(OPTIM_TITLE, ("optimizer", "layout"), IMPLS, optim_jobs, FLOOR_TITLE, optim_floor_rows)
HOST = Suite(HOST_TITLE, ("optimizer", "layout"), HOST_IMPLS, host_jobs)
