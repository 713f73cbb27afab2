"""Step time on the CPU without the Triton interpreter: each fused optimizer against torch's
for-loop (``foreach=False``), ``foreach=True`` and ``fused=True`` CPU paths.

A drop-in must never be slower than the stock class on the same device. Without
``TRITON_INTERPRET=1`` fusedopt's CPU tensors take torch's fastest correct path (its fused CPU
step where that is right, foreach otherwise), so ``fusedopt`` should match the best torch column.
Layout: a GPT-2-shaped model of 76 tensors, 13,961,216 fp32 elements (d=256, 6 blocks,
vocabulary 35,000), the params' grads set once; median (p20, p80) of ``--steps`` timed steps
after 3 untimed ones, in ms, with the threads torch uses by default.

Not a suite of ``python -m fusedopt bench``: without CUDA that command runs in the interpreter
(its other suites need it), which this must not. It uses the bench's optimizers, params, timer
and CSV writer.

    PYTHONPATH=. python benchmarks/cpu_step.py [--steps 15] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

IMPLS = ("fusedopt", "torch-forloop", "torch-foreach", "torch-fused")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--optimizers", default="adam,adamw,sgd,rmsprop,adagrad")
    parser.add_argument("--out", help="also write a CSV into this folder")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: this measures the CPU path, not the interpreter")
    from fusedopt.cli import bench_optim as bo
    from fusedopt.cli import common

    env = common.environment()
    shapes = bo.gpt2_small_shapes(d=256, vocab=35000, layers=6)
    params = bo.make_params(shapes, torch.float32, "cpu")
    print(f"CPU step time, ms: {len(shapes)} tensors, {bo.numel_of(shapes):,} fp32 elements, "
          f"{torch.get_num_threads()} threads, torch {env['torch']}, {env['timestamp_utc']}")  # fmt: skip
    rows = []
    for name in args.optimizers.split(","):
        spec = bo.OPTIMIZERS.get(name)
        if spec is None:
            print(f"{name}: not in this version's benchmark, skipped")
            continue
        for impl in IMPLS:
            row = {**env, "optimizer": bo.label(spec), "impl": impl}
            try:
                opt = bo.make(spec, impl, params)
                row.update(bo.host_times(opt.step, args.steps, 3, cuda=False))
                del opt
            except (RuntimeError, TypeError, ValueError) as e:  # e.g. no fused=True for this class
                row["note"] = common.short_error(e, 60)
            rows.append(row)
    columns = [("optimizer", "optimizer", ""), ("impl", "impl", ""), ("ms", "ms median", ".1f"),
               ("ms_p20", "p20", ".1f"), ("ms_p80", "p80", ".1f"), ("note", "note", "")]  # fmt: skip
    print(common.table_text(rows, columns))
    if args.out:
        log = common.CsvLog(args.out, "cpu_step", env, [*env, *(k for k, _, _ in columns)])
        for row in rows:
            log.writerow(row)
        log.file.close()
        print(f"\nCSV: {log.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
