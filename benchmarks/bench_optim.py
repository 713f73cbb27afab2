"""Time one optimizer step: fusedopt against torch.optim's for-loop, foreach and fused paths.

For FusedAdam, FusedAdamW and FusedSGD(momentum=0.9), on three parameter layouts (one 64M-element
tensor, GPT-2 small's 148 tensors, 1000 tensors of 4096 elements) in fp32 and bf16, each row
gives the step time (``triton.testing.do_bench``: median, 20th and 80th percentile), the bytes the
step must move at least, the bandwidth that implies and its share of a device-to-device copy
measured in the same run, the speed-up of fusedopt over the row, and the peak extra memory of
one step. A table goes to stdout and a CSV to ``--out``.

Without CUDA nothing is timed: the script says so, steps every optimizer on tiny tensors to
exercise the code paths (``--smoke``), prints the byte floor of each layout and exits 0.

    PYTHONPATH=. python benchmarks/bench_optim.py                    # GPU: everything
    PYTHONPATH=. python benchmarks/bench_optim.py --layouts gpt2 --dtypes bf16 --optimizers adamw
    PYTHONPATH=. python benchmarks/bench_optim.py --smoke            # any machine, nothing timed
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import math
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton
import triton.testing

import fusedopt
from fusedopt import _multi_tensor

QUANTILES = [0.5, 0.2, 0.8]  # do_bench returns median, p20, p80 in this order
IMPLS = ("fusedopt", "torch-forloop", "torch-foreach", "torch-fused")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
COPY_NUMEL = 256 * 2**20  # fp32 elements of the device-to-device copy reference (1 GiB)
MIB = 2**20


# Layouts ------------------------------------------------------------------------------------


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """GPT-2 small's parameter shapes (HF Conv1D layout): 148 tensors, 124,439,808 elements."""
    d, vocab, context, layers = 768, 50257, 1024, 12
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
LAYOUT_HELP = "single64m: one 64M-element tensor; gpt2: GPT-2 small (148 tensors); many4k: 1000 × 4096"
SMOKE_SHAPES = [(7,), (3, 5), (1000,), (2, 3, 4), (4097,)]


def numel_of(shapes: list[tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes)


# Optimizers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimSpec:
    """One optimizer as fusedopt and torch.optim build it, and the state tensors its step touches."""

    fused_cls: type[torch.optim.Optimizer]
    torch_cls: type[torch.optim.Optimizer]
    kwargs: dict = field(default_factory=dict)
    state_tensors: int = 0  # per-param state read and written each step (Adam: m, v; SGD: b)

    @property
    def label(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.kwargs.items() if k != "lr")
        return f"{self.fused_cls.__name__}({extra})" if extra else self.fused_cls.__name__

    def bytes_per_element(self, dtype: torch.dtype) -> int:
        """Byte floor per element: read param, grad and state; write param and state.

        Adam/AdamW: (p + g + m + v) read + (p + m + v) written = 7 × element size (28 B fp32, 14 B bf16).
        SGD with momentum: (p + g + b) read + (p + b) written = 5 × element size (20 B fp32, 10 B bf16).
        """
        reads = 2 + self.state_tensors
        writes = 1 + self.state_tensors
        return (reads + writes) * dtype.itemsize

    def make(self, impl: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        """The optimizer of one implementation over ``params``."""
        if impl == "fusedopt":
            return self.fused_cls(params, **self.kwargs)
        flags = {
            "torch-forloop": {"foreach": False},
            "torch-foreach": {"foreach": True},
            "torch-fused": {"fused": True},
        }[impl]
        return self.torch_cls(params, **self.kwargs, **flags)


OPTIMIZERS: dict[str, OptimSpec] = {
    "adam": OptimSpec(fusedopt.FusedAdam, torch.optim.Adam, {"lr": 1e-3}, state_tensors=2),
    "adamw": OptimSpec(fusedopt.FusedAdamW, torch.optim.AdamW, {"lr": 1e-3}, state_tensors=2),
    "sgd": OptimSpec(fusedopt.FusedSGD, torch.optim.SGD, {"lr": 1e-3, "momentum": 0.9}, state_tensors=1),
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


def fusedopt_path(device: torch.device | str) -> str:
    """How fusedopt steps fp32 tensors on ``device``: compiled kernel, interpreter or reference."""
    device = torch.device(device)
    if not _multi_tensor.runs_triton(device):
        return "plain-torch reference"
    return "Triton interpreter" if _multi_tensor.INTERPRET else "compiled Triton kernel"


# Environment --------------------------------------------------------------------------------


def environment() -> dict[str, str]:
    """GPU name (or CPU), torch / triton / CUDA versions and a UTC timestamp, for every result row."""
    cuda = torch.cuda.is_available()
    return {
        "gpu": torch.cuda.get_device_name() if cuda else "CPU",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": str(torch.version.cuda) if cuda else "",
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def slug(text: str) -> str:
    """File-name form of a device name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


class CsvLog:
    """CSV file written row by row (a run cut short still leaves its rows)."""

    def __init__(self, path: Path, fields: list[str]):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = path.open("w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=fields, extrasaction="ignore")
        self._writer.writeheader()

    def write(self, row: dict) -> None:
        self._writer.writerow(row)
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Print ``rows`` as a fixed-width table; ``columns`` are (key, header, format spec)."""
    cells = [
        [format(r[k], f) if isinstance(r.get(k), int | float) else str(r.get(k, "")) for k, _, f in columns]
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, h, _) in enumerate(columns)]
    print("  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths, strict=True)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths, strict=True)))


# Timing (CUDA) ------------------------------------------------------------------------------


@dataclass
class Timing:
    ms: float  # median
    p20: float
    p80: float


def bench(fn: Callable[[], object], warmup: int, rep: int) -> Timing:
    """``triton.testing.do_bench`` (L2 flushed before each run): median and 20/80 quantiles, in ms."""
    median, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=QUANTILES)
    return Timing(median, p20, p80)


def copy_bandwidth(numel: int, warmup: int, rep: int) -> tuple[Timing, float]:
    """Device-to-device copy of ``numel`` fp32 elements: its timing and GB/s (read + write bytes)."""
    src = torch.randn(numel, device="cuda")
    dst = torch.empty_like(src)
    timing = bench(functools.partial(dst.copy_, src), warmup, rep)
    del src, dst
    torch.cuda.empty_cache()
    return timing, 2 * numel * 4 / (timing.ms * 1e-3) / 1e9


def peak_extra_bytes(opt: torch.optim.Optimizer) -> int:
    """Memory one step allocates above what was allocated before it (temporaries, staging)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    opt.step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def time_impl(spec: OptimSpec, impl: str, params: list[torch.Tensor], warmup: int, rep: int) -> dict:
    """Warm up one implementation (state created, kernels compiled), then time one step."""
    opt = spec.make(impl, params)
    try:
        opt.step()
        timing = bench(opt.step, warmup, rep)
        extra = peak_extra_bytes(opt)
    finally:
        del opt
        torch.cuda.empty_cache()
    return {"ms": timing.ms, "ms_p20": timing.p20, "ms_p80": timing.p80, "peak_extra_mib": extra / MIB}


CSV_FIELDS = [
    "gpu",
    "torch",
    "triton",
    "cuda",
    "timestamp_utc",
    "optimizer",
    "impl",
    "layout",
    "dtype",
    "tensors",
    "numel",
    "bytes_per_elt",
    "bytes",
    "ms",
    "ms_p20",
    "ms_p80",
    "gbps",
    "copy_gbps",
    "pct_copy_bw",
    "fusedopt_speedup",
    "peak_extra_mib",
    "error",
]
TABLE_COLUMNS = [
    ("optimizer", "optimizer", ""),
    ("layout", "layout", ""),
    ("dtype", "dtype", ""),
    ("impl", "impl", ""),
    ("ms", "ms", ".4f"),
    ("ms_p20", "p20", ".4f"),
    ("ms_p80", "p80", ".4f"),
    ("mb", "MB moved", ".1f"),
    ("gbps", "GB/s", ".0f"),
    ("pct_copy_bw", "% copy", ".1f"),
    ("fusedopt_speedup", "ours ×", ".2f"),
    ("peak_extra_mib", "extra MiB", ".1f"),
    ("error", "error", ""),
]


def cases(args: argparse.Namespace) -> Iterator[tuple[str, str, list[tuple[int, ...]]]]:
    for dtype_name in args.dtypes:
        for layout in args.layouts:
            yield dtype_name, layout, LAYOUTS[layout]()


def run_timings(args: argparse.Namespace) -> int:
    """The GPU benchmark: every (dtype, layout, optimizer, implementation) row."""
    env = environment()
    if _multi_tensor.INTERPRET:
        print("WARNING: TRITON_INTERPRET=1 runs fusedopt's kernels in the interpreter: timings mean nothing.")
    print(f"GPU: {env['gpu']}  torch {env['torch']}  triton {env['triton']}  CUDA {env['cuda']}")
    copy, copy_gbps = copy_bandwidth(args.copy_numel, args.warmup, args.rep)
    print("ours × = the row's ms / fusedopt's ms (above 1: fusedopt is faster); % copy = GB/s / copy GB/s")
    print(
        f"device-to-device copy, {args.copy_numel:,} fp32 elements: {copy.ms:.4f} ms "
        f"(p20 {copy.p20:.4f}, p80 {copy.p80:.4f}) = {copy_gbps:.0f} GB/s (read + write)\n"
    )
    stamp = env["timestamp_utc"].replace("-", "").replace(":", "")
    log = CsvLog(Path(args.out) / f"bench_optim_{stamp}.csv", CSV_FIELDS)
    log.write(
        {
            **env,
            "optimizer": "copy_",
            "impl": "torch",
            "layout": f"copy{args.copy_numel}",
            "dtype": "fp32",
            "tensors": 1,
            "numel": args.copy_numel,
            "bytes_per_elt": 8,
            "bytes": 8 * args.copy_numel,
            "ms": copy.ms,
            "ms_p20": copy.p20,
            "ms_p80": copy.p80,
            "gbps": copy_gbps,
            "copy_gbps": copy_gbps,
            "pct_copy_bw": 100.0,
        }
    )
    failures = 0
    for dtype_name, layout, shapes in cases(args):
        params = make_params(shapes, DTYPES[dtype_name], "cuda")
        numel = numel_of(shapes)
        for name in args.optimizers:
            spec = OPTIMIZERS[name]
            per_elt = spec.bytes_per_element(DTYPES[dtype_name])
            rows = []
            for impl in args.impls:
                row = {
                    **env,
                    "optimizer": spec.label,
                    "impl": impl,
                    "layout": layout,
                    "dtype": dtype_name,
                    "tensors": len(shapes),
                    "numel": numel,
                    "bytes_per_elt": per_elt,
                    "bytes": per_elt * numel,
                    "mb": per_elt * numel / 1e6,
                    "copy_gbps": copy_gbps,
                }
                try:
                    row.update(time_impl(spec, impl, params, args.warmup, args.rep))
                    row["gbps"] = row["bytes"] / (row["ms"] * 1e-3) / 1e9
                    row["pct_copy_bw"] = 100 * row["gbps"] / copy_gbps
                except Exception as e:  # a torch path this build lacks must not end the run
                    row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:120]
                    failures += impl == "fusedopt"
                rows.append(row)
            ours = next((r.get("ms") for r in rows if r["impl"] == "fusedopt"), None)
            for row in rows:
                if ours and "ms" in row:
                    row["fusedopt_speedup"] = row["ms"] / ours
                log.write(row)
            print_table(rows, TABLE_COLUMNS)
            print()
        del params
        torch.cuda.empty_cache()
    log.close()
    print(f"CSV: {log.path}")
    return 1 if failures else 0


# Without a GPU ------------------------------------------------------------------------------


def smoke(args: argparse.Namespace, device: str) -> int:
    """Two steps of every implementation on tiny tensors (not timed); params compared with for-loop's."""
    print(f"smoke test on {device}: fusedopt runs the {fusedopt_path(device)}; nothing is timed.")
    rows = []
    failures = 0
    for dtype_name in args.dtypes:
        for name in args.optimizers:
            spec = OPTIMIZERS[name]
            results: dict[str, list[torch.Tensor]] = {}
            for impl in args.impls:
                row = {"optimizer": spec.label, "dtype": dtype_name, "impl": impl, "status": "ok"}
                params = make_params(SMOKE_SHAPES, DTYPES[dtype_name], device)
                try:
                    opt = spec.make(impl, params)
                    opt.step()  # creates state
                    opt.step()  # fusedopt: reuses the cached plan
                    results[impl] = [p.detach().float() for p in params]
                    row["finite"] = all(bool(p.isfinite().all()) for p in results[impl])
                except Exception as e:
                    row["status"] = f"{type(e).__name__}: {e}".splitlines()[0][:100]
                    failures += impl == "fusedopt"
                rows.append(row)
            base = results.get("torch-forloop")
            for row in rows[-len(args.impls) :]:
                mine = results.get(row["impl"])
                if base is not None and mine is not None:
                    row["max_diff"] = max(float((a - b).abs().max()) for a, b in zip(mine, base, strict=True))
    print_table(
        rows,
        [
            ("optimizer", "optimizer", ""),
            ("dtype", "dtype", ""),
            ("impl", "impl", ""),
            ("status", "status", ""),
            ("finite", "finite", ""),
            ("max_diff", "max |Δp| vs for-loop", ".3g"),
        ],
    )
    print()
    return 1 if failures else 0


def print_byte_floor(args: argparse.Namespace) -> None:
    """Bytes one step must move at least, per layout, dtype and optimizer (no timing, no prediction)."""
    rows = []
    for dtype_name, layout, shapes in cases(args):
        for name in args.optimizers:
            spec = OPTIMIZERS[name]
            per_elt = spec.bytes_per_element(DTYPES[dtype_name])
            numel = numel_of(shapes)
            rows.append(
                {
                    "optimizer": spec.label,
                    "layout": layout,
                    "dtype": dtype_name,
                    "tensors": len(shapes),
                    "numel": numel,
                    "bytes_per_elt": per_elt,
                    "mb": per_elt * numel / 1e6,
                }
            )
    print("byte floor of one step (read p, g, state; write p, state):")
    print_table(
        rows,
        [
            ("optimizer", "optimizer", ""),
            ("layout", "layout", ""),
            ("dtype", "dtype", ""),
            ("tensors", "tensors", "d"),
            ("numel", "elements", ","),
            ("bytes_per_elt", "B/elt", "d"),
            ("mb", "MB/step", ".1f"),
        ],
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=LAYOUT_HELP)
    parser.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS), default=list(OPTIMIZERS))
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS), help="paths to time")
    parser.add_argument(
        "--out", default="benchmarks/results", help="folder of the CSV (default: %(default)s)"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="step each optimizer on tiny tensors, time nothing"
    )
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms (default: %(default)s)")
    parser.add_argument(
        "--rep", type=int, default=100, help="do_bench repetition time, ms (default: %(default)s)"
    )
    parser.add_argument(
        "--copy-numel", type=int, default=COPY_NUMEL, help="fp32 elements of the copy reference"
    )
    args = parser.parse_args(argv)
    if "fusedopt" not in args.impls:
        parser.error("--impls must include fusedopt (speed-ups are relative to it)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if cuda and not args.smoke:
        return run_timings(args)
    if not cuda:
        print("No CUDA GPU: timings need a CUDA GPU, so nothing is timed here.")
        print(
            f"(TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}; torch {torch.__version__}, triton {triton.__version__})\n"
        )
    status = smoke(args, "cuda" if cuda else "cpu")
    print_byte_floor(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
