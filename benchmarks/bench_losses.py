"""Time forward + backward of the fused losses against eager torch and torch.compile.

Cases (``--cases``): MSE over one 64M-element tensor (fp32 and bf16) and cross-entropy over
(8192 × 50257) and (4096 × 128256) bf16 logits. Each row: ms (``triton.testing.do_bench``
median, 20th/80th percentile) of ``torch.autograd.grad(loss, input)``, the bytes that
implementation moves per element (the written-out tables of ``fusedopt.losses`` and
``fusedopt.cross_entropy``), the GB/s that implies, and the peak memory above the inputs.
The gradient is taken with ``autograd.grad`` so no implementation pays for accumulating into
``.grad``. Without CUDA nothing is timed: ``--smoke`` runs each case once on tiny shapes.

    PYTHONPATH=. python benchmarks/bench_losses.py                 # GPU
    PYTHONPATH=. python benchmarks/bench_losses.py --smoke         # any machine, nothing timed
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import fusedopt.functional as FF

sys.path.insert(0, str(Path(__file__).parent))
from bench_optim import CsvLog, bench, environment, print_table

IMPLS = ("fusedopt", "eager", "compile")
# Bytes per input element moved by forward + backward (grad_output = 1), fp32 storage; scaled by
# the element size for other dtypes. Regression: see fusedopt/losses.py; CE: per logit, see
# fusedopt/cross_entropy.py.
BYTES_PER_ELT_FP32 = {
    "mse": {"fusedopt": 12, "eager": 36, "compile": 20},
    "cross_entropy": {"fusedopt": 12, "eager": 24, "compile": 16},
}


def cases(smoke: bool) -> dict[str, tuple[str, Callable[[], tuple[torch.Tensor, torch.Tensor]]]]:
    """name -> (loss, make() -> (input, target)); tiny shapes when ``smoke``."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n = 1000 if smoke else 64 * 2**20

    def mse(dtype):
        return lambda: (torch.randn(n, device=dev, dtype=dtype), torch.randn(n, device=dev, dtype=dtype))

    def ce(r, c):
        r, c = (8, 129) if smoke else (r, c)
        return lambda: (
            torch.randn(r, c, device=dev, dtype=torch.bfloat16),
            torch.randint(0, c, (r,), device=dev),
        )

    return {
        "mse-64m-fp32": ("mse", mse(torch.float32)),
        "mse-64m-bf16": ("mse", mse(torch.bfloat16)),
        "ce-8192x50257-bf16": ("cross_entropy", ce(8192, 50257)),
        "ce-4096x128256-bf16": ("cross_entropy", ce(4096, 128256)),
    }


def loss_fn(loss: str, impl: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    torch_fn = {"mse": F.mse_loss, "cross_entropy": F.cross_entropy}[loss]
    if impl == "fusedopt":
        return {"mse": FF.mse_loss, "cross_entropy": FF.cross_entropy}[loss]
    if impl == "compile":
        return torch.compile(torch_fn)
    return torch_fn


def step(fn, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    return lambda: torch.autograd.grad(fn(x, y), x)


def peak_extra_mib(run: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


FIELDS = ["gpu", "torch", "triton", "cuda", "timestamp_utc", "case", "impl", "numel", "bytes_per_elt"]
FIELDS += ["ms", "ms_p20", "ms_p80", "gbps", "peak_extra_mib", "speedup_of_fusedopt", "error"]


def run(args: argparse.Namespace) -> int:
    env = environment()
    print(f"GPU: {env['gpu']}  torch {env['torch']}  triton {env['triton']}  CUDA {env['cuda']}")
    stamp = env["timestamp_utc"].replace("-", "").replace(":", "")
    log = CsvLog(Path(args.out) / f"bench_losses_{stamp}.csv", FIELDS)
    rows, failures = [], 0
    for name, (loss, make) in cases(False).items():
        if name not in args.cases:
            continue
        x, y = make()
        x.requires_grad_()
        ours_ms = None
        for impl in args.impls:
            row = {**env, "case": name, "impl": impl, "numel": x.numel()}
            row["bytes_per_elt"] = BYTES_PER_ELT_FP32[loss][impl] * x.element_size() / 4
            try:
                fn = step(loss_fn(loss, impl), x, y)
                fn()  # compile / warm up
                t = bench(fn, args.warmup, args.rep)
                row.update(ms=t.ms, ms_p20=t.p20, ms_p80=t.p80, peak_extra_mib=peak_extra_mib(fn))
                row["gbps"] = row["bytes_per_elt"] * x.numel() / (t.ms * 1e-3) / 1e9
                ours_ms = t.ms if impl == "fusedopt" else ours_ms
                row["speedup_of_fusedopt"] = t.ms / ours_ms if ours_ms else ""
            except Exception as e:  # a failing baseline is reported, not fatal
                row["error"] = f"{type(e).__name__}: {e}"[:300]
                failures += impl == "fusedopt"
            log.write(row)
            rows.append(row)
        del x, y
        torch.cuda.empty_cache()
    print_table(
        rows,
        [
            ("case", "case", ""),
            ("impl", "impl", ""),
            ("ms", "ms", ".4f"),
            ("ms_p20", "p20", ".4f"),
            ("ms_p80", "p80", ".4f"),
            ("bytes_per_elt", "B/elt", ".0f"),
            ("gbps", "GB/s", ".0f"),
            ("peak_extra_mib", "extra MiB", ".1f"),
            ("speedup_of_fusedopt", "ours ×", ".2f"),
            ("error", "error", ""),
        ],
    )
    log.close()
    print(f"CSV: {log.path}")
    return 1 if failures else 0


def smoke(names: list[str]) -> int:
    """Run the cases once on tiny shapes against torch (nothing timed)."""
    for name, (loss, make) in cases(True).items():
        if name not in names:
            continue
        x, y = make()
        x.requires_grad_()
        ours = torch.autograd.grad(loss_fn(loss, "fusedopt")(x, y), x)[0]
        theirs = torch.autograd.grad(loss_fn(loss, "eager")(x.float(), y), x)[0]
        ok = torch.allclose(ours.float(), theirs.float(), rtol=2e-2, atol=1e-3)
        print(f"{name} (tiny): {'ok' if ok else 'MISMATCH'}")
        if not ok:
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(cases(True)), choices=list(cases(True)))
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, nothing timed")
    parser.add_argument("--warmup", type=int, default=25)
    parser.add_argument("--rep", type=int, default=100)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or args.smoke:
        if not torch.cuda.is_available():
            print("No CUDA GPU: timings need a CUDA GPU, so nothing is timed here.")
        return smoke(args.cases)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
