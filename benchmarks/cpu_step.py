"""Step time on the CPU without the Triton interpreter: each fused optimizer against torch's
for-loop (``foreach=False``), ``foreach=True`` and ``fused=True`` CPU paths.

A drop-in must never be slower than the stock class on the same device. Without
``TRITON_INTERPRET=1`` fusedopt's CPU tensors take torch's fastest correct path for fp32/fp64
(its fused CPU step where that is right, the for-loop otherwise) and, for bf16/fp16, torch's
algorithm in fp32 on cache-sized working copies (:mod:`fusedopt.optim.reference`), so
``fusedopt`` should match or beat the best correct torch column. For bf16/fp16 params that is
the for-loop or foreach one: torch's fused CPU step is timed but is no yardstick there (with
bf16 params its SGD leaves most params unchanged).

Layout: a GPT-2-shaped model of 76 tensors, 13,961,216 elements (d=256, 6 blocks, vocabulary
35,000; ``--width``, ``--layers`` change it) in ``--dtype`` (Muon: its hidden matrices, 4 a block), the params' grads set once and shared by every optimizer; ``--options``
adds a fusedopt row per set of low-precision options (torch's rows run its plain step on the
same params). Each row is timed ``--steps`` steps per round after 3 untimed ones, over
``--rounds`` rounds that alternate the rows (the machine's drift then hits every row alike);
printed: the median (p20, p80) of all timed steps and the lowest and highest round median, in
ms, with the threads torch uses by default (``--threads`` to change); ``ratio``: fusedopt's
median over the best correct torch median.

Not a suite of ``python -m fusedopt bench``: without CUDA that command runs in the interpreter
(its other suites need it), which this must not. It uses the bench's optimizers, params and
CSV writer.

    PYTHONPATH=. python benchmarks/cpu_step.py [--dtype bf16] [--options plain,master,sr]
        [--steps 10] [--rounds 3] [--width 256] [--layers 6] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

IMPLS = ("fusedopt", "torch-forloop", "torch-foreach", "torch-fused")
# fusedopt's low-precision options, by the name a row carries (bf16/fp16 params).
OPTIONS: dict[str, dict] = {
    "plain": {},
    "master": {"master_weights": True},
    "kahan": {"kahan_summation": True},
    "sr": {"stochastic_rounding": True},
    "fp32-state": {"state_dtype": torch.float32},
    "bf16-state": {"state_dtype": torch.bfloat16},
    "int8-state": {"state_dtype": "int8"},
}


def _rows(bo, spec, impls: list[str], options: list[str], params) -> list[tuple[dict, object]]:
    """``(row, optimizer or error)`` for each fusedopt option set and torch implementation."""
    out = []
    for impl in impls:
        for option in options if impl == "fusedopt" else [None]:
            row = {"optimizer": bo.label(spec), "impl": impl if option is None else f"fusedopt {option}"}
            try:
                if option is None and (lacks := bo.torch_lacks(spec, impl)):
                    raise TypeError(lacks)
                if option is None:
                    opt = bo.make(spec, impl, params)
                else:
                    opt = spec.fused_cls(params, **spec.kwargs, **OPTIONS[option])
            except (RuntimeError, TypeError, ValueError) as e:  # e.g. no fused=True for this class
                opt = e
            out.append((row, opt))
    return out


def _time(opt, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.step()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=15, help="timed steps per row and round")
    parser.add_argument("--rounds", type=int, default=1, help="rounds alternating the rows")
    parser.add_argument(
        "--optimizers", default="adam,adamw,sgd,rmsprop,adagrad,adamax,radam,nadam,adadelta,rprop,lion,muon"
    )
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--options", default="plain", help=f"fusedopt rows; from: {', '.join(OPTIONS)}")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--width", type=int, default=256, help="the layout's model width d")
    parser.add_argument("--layers", type=int, default=6, help="the layout's blocks")
    parser.add_argument("--out", help="also write a CSV into this folder")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: this measures the CPU path, not the interpreter")
    from fusedopt.cli import bench_optim as bo
    from fusedopt.cli import common

    if args.threads:
        torch.set_num_threads(args.threads)
    options = args.options.split(",")
    if bad := [o for o in options if o not in OPTIONS]:
        parser.error(f"--options: unknown {', '.join(bad)} (choose from {', '.join(OPTIONS)})")
    env = common.environment()
    dtype = common.DTYPES[args.dtype]
    shapes = bo.gpt2_small_shapes(d=args.width, vocab=35000, layers=args.layers)
    params = bo.make_params(shapes, dtype, "cpu")
    print(f"CPU step time, ms: {len(shapes)} tensors, {bo.numel_of(shapes):,} {args.dtype} elements, "
          f"{torch.get_num_threads()} threads, torch {env['torch']}, {env['timestamp_utc']}")  # fmt: skip
    # torch's fused CPU step is no yardstick for bf16/fp16 params (see the docstring).
    yardsticks = ("torch-forloop", "torch-foreach") + (("torch-fused",) if args.dtype == "fp32" else ())
    rows = []
    for name in args.optimizers.split(","):
        spec = bo.OPTIMIZERS.get(name)
        if spec is None:
            print(f"{name}: not in this version's benchmark, skipped")
            continue
        # Muon steps the hidden matrices (the 2-D params after the two embeddings)
        mine = [p for p in params[2:] if p.ndim == 2] if name in bo.MATRICES_ONLY else params
        group = _rows(bo, spec, args.impls.split(","), options, mine)
        times: dict[int, list[list[float]]] = {i: [] for i in range(len(group))}
        for r in range(args.rounds):
            for i, (row, opt) in enumerate(group):
                if isinstance(opt, Exception):
                    continue
                try:
                    if r == 0:
                        _time(opt, 3)  # state created, caches filled
                    times[i].append(_time(opt, args.steps))
                except (RuntimeError, TypeError, ValueError) as e:
                    group[i] = (row, e)
        for i, (row, opt) in enumerate(group):
            row = {**env, **row, "dtype": args.dtype, "threads": torch.get_num_threads()}
            if isinstance(opt, Exception):
                row["note"] = common.short_error(opt, 60)
            elif times[i]:
                every = [t for round_times in times[i] for t in round_times]
                p20, _, _, p80 = statistics.quantiles(every, n=5, method="inclusive")
                medians = [statistics.median(t) for t in times[i]]
                row.update(ms=statistics.median(every), ms_p20=p20, ms_p80=p80)
                row.update(round_min=min(medians), round_max=max(medians))
            rows.append(row)
        best = min(
            (r["ms"] for r in rows[-len(group) :] if r["impl"] in yardsticks and "ms" in r), default=None
        )
        for row in rows[-len(group) :]:
            if row["impl"].startswith("fusedopt") and "ms" in row and best:
                row["ratio"] = row["ms"] / best
        del group
    columns = [("optimizer", "optimizer", ""), ("impl", "impl", ""), ("ms", "ms median", ".1f"),
               ("ms_p20", "p20", ".1f"), ("ms_p80", "p80", ".1f"), ("round_min", "round min", ".1f"),
               ("round_max", "round max", ".1f"), ("ratio", "ratio", ".2f"), ("note", "note", "")]  # fmt: skip
    print(common.table_text(rows, columns))
    if args.out:
        fields = [*env, "dtype", "threads", *(k for k, _, _ in columns)]
        log = common.CsvLog(args.out, "cpu_step", env, fields)
        for row in rows:
            log.writerow(row)
        log.file.close()
        print(f"\nCSV: {log.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
