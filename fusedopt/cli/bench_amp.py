"""The whole optimizer phase of an AMP training step, torch's recipe against fusedopt's.

Per timed call, on GPT-2 small's 148 fp32 tensors (124M elements) with fp32 grads, AdamW:

* ``torch-fused`` / ``torch-foreach``: torch's recipe, ``scaler.unscale_(opt)``,
  ``torch.nn.utils.clip_grad_norm_(params, 1.0)``, ``scaler.step(opt)``, ``scaler.update()``
  with ``torch.amp.GradScaler`` and ``AdamW(fused=True)`` / ``AdamW(foreach=True)``;
* ``fusedopt-recipe``: the same four lines with ``fusedopt.FusedAdamW`` and
  ``fusedopt.clip_grad_norm_`` (the one-import change);
* ``fusedopt``: ``fusedopt.GradScaler`` and ``FusedAdamW(max_grad_norm=1.0)``:
  ``scaler.step(opt)``, ``scaler.update()``;
* ``torch-graph`` / ``fusedopt-graph``: without a scaler, clip + step captured once in a CUDA
  graph and replayed (torch: ``clip_grad_norm_`` + ``AdamW(fused=True, capturable=True)``;
  fusedopt: ``FusedAdamW(capturable=True, max_grad_norm=1.0).step()``).

Bytes per element (the model behind the GB/s column; fp32, 4 B per read or write of a tensor):

* torch recipe: unscale_ reads and writes g (8), the norm reads g (4), the clip reads and
  writes g (8), the step reads p, g, m, v and writes p, m, v (28): 48 B;
* fusedopt-recipe: the same passes, 48 B;
* fusedopt: one read of g for the norm, which is also the inf check (4), the step (28): 32 B;
* torch-graph: norm (4) + clip (8) + step (28) = 40 B; fusedopt-graph: 32 B.

The scale stays 1.0 (``init_scale=1``, no growth within a run) so repeated calls leave the
grads' values unchanged; every path still makes all its passes.

    python -m fusedopt.cli.bench_amp --out results/      # GPU
    python -m fusedopt.cli.bench_amp --smoke             # any machine: tiny shapes, nothing timed
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

import fusedopt
from fusedopt.cli import common
from fusedopt.cli.bench_optim import gpt2_small_shapes, graph_replay, make_params, numel_of

BYTES_PER_ELEMENT = {
    "torch-fused": 48,
    "torch-foreach": 48,
    "fusedopt-recipe": 48,
    "fusedopt": 32,
    "torch-graph": 40,
    "fusedopt-graph": 32,
}
IMPLS = tuple(BYTES_PER_ELEMENT)
MAX_NORM = 1.0
SMOKE_SHAPES = [(7,), (3, 5), (1000,), (4097,)]
COLUMNS = [
    ("impl", "implementation", ""),
    ("tensors", "tensors", "d"),
    ("numel", "elements", ","),
    ("bytes_per_elt", "B/elt", "d"),
    ("ms", "ms", ".3f"),
    ("ms_p20", "p20", ".3f"),
    ("ms_p80", "p80", ".3f"),
    ("gbps", "GB/s", ".0f"),
    ("speedup", "vs torch-fused", ".2f"),
]


def phase(impl: str, params: list[torch.Tensor], device: str) -> Callable[[], object]:
    """One call of ``impl``'s optimizer phase over ``params`` (grads already set)."""
    if impl.endswith("-graph"):
        if impl == "torch-graph":
            opt = torch.optim.AdamW(params, lr=1e-3, fused=True, capturable=True)

            def step() -> None:
                torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
                opt.step()

        else:
            opt = fusedopt.FusedAdamW(params, lr=1e-3, capturable=True, max_grad_norm=MAX_NORM)
            step = opt.step
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path("fusedopt-bench"), help="folder for the CSV and Markdown"
    )
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, each path run once, nothing timed")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up (ms)")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetitions (ms)")
    args = parser.parse_args(argv)
    device = common.default_device()
    timed = device == "cuda" and not args.smoke
    if not timed and not args.smoke:
        print("no CUDA device: running the smoke version (nothing timed)")
    shapes = gpt2_small_shapes() if timed else SMOKE_SHAPES
    env = common.environment()
    rows = []
    for impl in args.impls:
        params = make_params(shapes, torch.float32, device)
        run = phase(impl, params, device)
        run()
        row = {"impl": impl, "tensors": len(shapes), "numel": numel_of(shapes)}
        row["bytes_per_elt"] = BYTES_PER_ELEMENT[impl]
        if timed:
            t = common.do_bench(run, args.warmup, args.rep)
            row.update(ms=t.ms, ms_p20=t.p20, ms_p80=t.p80)
            row["gbps"] = row["bytes_per_elt"] * row["numel"] / (t.ms * 1e6)
        rows.append({**row, **env})
        del run, params
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    base = next((r["ms"] for r in rows if r["impl"] == "torch-fused" and "ms" in r), None)
    for r in rows:
        if base is not None and "ms" in r:
            r["speedup"] = base / r["ms"]
    title = f"AMP optimizer phase, AdamW, {env['gpu']}, torch {env['torch']}, triton {env['triton']}"
    print(title)
    common.print_table(rows, COLUMNS)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"amp_phase_{common.slug(env['gpu'])}"
    log = common.CsvLog(args.out / f"{name}.csv", [c[0] for c in COLUMNS] + list(env))
    for r in rows:
        log.write(r)
    log.close()
    text = [f"# {title}", "", "Timed with triton.testing.do_bench (median, p20, p80).", ""]
    text += [common.table_text(rows, COLUMNS, markdown=True), ""]
    (args.out / f"{name}.md").write_text(
        "\n".join(text) if timed else "\n".join([*text[:1], "", "smoke run: nothing timed", ""])
    )
    print(f"wrote {args.out / name}.csv and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
