"""Host-side (Python) time of one fused optimizer step, kernel execution excluded.

FusedAdam and FusedSGD(momentum=0.9) over 1000 tensors of 4096 elements and GPT-2 small's 148
tensors: the time ``opt.step()`` takes to return, in µs.

* CUDA: launches are asynchronous, so ``time.perf_counter`` around ``opt.step()`` (the stream is
  drained before each timed step, outside the timed region, so a full launch queue never blocks
  the host) measures scan, planning, scalar upload and launch. torch's foreach and fused paths are
  measured the same way.
* CPU: this script sets ``TRITON_INTERPRET=1`` for its own process before importing fusedopt, so
  CPU tensors take the Triton path (scan, plan, tables, scalars), and replaces
  ``fusedopt._multi_tensor.TensorTable.launch`` with a no-op: the kernel is never run. Moving the small
  per-step tables to the device is free on CPU (pinned copies on CUDA), so this slightly
  underestimates the CUDA host cost.

    PYTHONPATH=. python benchmarks/host_overhead.py [--steps 200] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch


def measure(opt: torch.optim.Optimizer, steps: int, warmup: int, cuda: bool) -> list[float]:
    """Per-step host time of ``opt.step()`` in µs (the stream drained before each, untimed)."""
    for _ in range(warmup):
        opt.step()
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.step()
        times.append((time.perf_counter() - start) * 1e6)
    if cuda:
        torch.cuda.synchronize()
    return times


def _no_launch(self, kernel, dynamic, *args, **constexprs) -> None:
    """Stands in for ``TensorTable.launch`` on CPU: the kernel is not run."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="timed steps per case (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (default: %(default)s)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--out", help="also write a CSV into this folder")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda:
        if "fusedopt" in sys.modules:
            raise RuntimeError("fusedopt was imported before TRITON_INTERPRET could be set")
        os.environ["TRITON_INTERPRET"] = "1"  # this process only: it measures host planning time
    # fusedopt reads TRITON_INTERPRET when imported, so it comes after.
    from fusedopt import _multi_tensor
    from fusedopt.cli import bench_optim as bo
    from fusedopt.cli import common

    env = common.environment()
    if cuda:
        if _multi_tensor.INTERPRET:
            print("WARNING: TRITON_INTERPRET=1 is set: CUDA steps run in the interpreter.")
        device, where = "cuda", env["gpu"]
        impls = ["fusedopt", "torch-foreach", "torch-fused"]
    else:
        _multi_tensor.TensorTable.launch = _no_launch
        device, where = "cpu", "CPU (host time only, kernel not run)"
        impls = ["fusedopt"]
        print(
            "No CUDA GPU: TRITON_INTERPRET=1 was set for this process before importing fusedopt, so CPU "
            "tensors take the Triton planning path; TensorTable.launch is a no-op (no kernel runs)."
        )
    print(f"device: {where}  torch {env['torch']}  triton {env['triton']}  {env['timestamp_utc']}")
    print(f"host time of opt.step(), µs: {args.steps} timed steps after {args.warmup} warm-up steps\n")

    rows = []
    for layout in ["many4k", "gpt2"]:
        shapes = bo.LAYOUTS[layout]()
        params = bo.make_params(shapes, common.DTYPES[args.dtype], device)
        for name in ["adam", "sgd"]:
            spec = bo.OPTIMIZERS[name]
            for impl in impls:
                opt = spec.make(impl, params)
                times = measure(opt, args.steps, args.warmup, cuda)
                del opt
                p20, _, _, p80 = statistics.quantiles(times, n=5)
                rows.append(
                    {
                        **env,
                        "device": where,
                        "optimizer": spec.label,
                        "impl": impl,
                        "layout": layout,
                        "dtype": args.dtype,
                        "tensors": len(shapes),
                        "us_median": statistics.median(times),
                        "us_p20": p20,
                        "us_p80": p80,
                        "us_mean": statistics.fmean(times),
                        "us_min": min(times),
                    }
                )
        del params
    columns = [
        ("optimizer", "optimizer", ""),
        ("layout", "layout", ""),
        ("tensors", "tensors", "d"),
        ("impl", "impl", ""),
        ("us_median", "µs median", ".1f"),
        ("us_p20", "p20", ".1f"),
        ("us_p80", "p80", ".1f"),
        ("us_mean", "mean", ".1f"),
        ("us_min", "min", ".1f"),
    ]
    common.print_table(rows, columns)
    if args.out:
        stamp = env["timestamp_utc"].replace("-", "").replace(":", "")
        log = common.CsvLog(
            Path(args.out) / f"host_overhead_{stamp}.csv",
            [*env, "device", "dtype", *(k for k, _, _ in columns)],
        )
        for row in rows:
            log.write(row)
        log.close()
        print(f"\nCSV: {log.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
