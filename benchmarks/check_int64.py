"""FusedAdam on one fp32 tensor of 2**31 + 1000 elements: 64-bit offsets, checked on slices.

Two steps on a single ~8.6 GB param (param, grad and two state tensors: ~34 GB of GPU memory):

1. the first step (state created as zeros) must reach every element: afterwards
   ``exp_avg_sq = (1 - beta2) * grad**2`` is non-zero wherever ``grad`` is;
2. the second step is compared elementwise, on a few blocks (the first, one straddling element
   2**29 (byte offset 2**31), one straddling element 2**31, the last), with
   ``fusedopt.optim.reference.adam_reference`` applied to clones of those blocks.

Skips with a message (exit 0) without CUDA or without enough free memory; exits 1 on a mismatch.

    PYTHONPATH=. python benchmarks/check_int64.py
"""

from __future__ import annotations

import math
import sys

import torch

N = 2**31 + 1000
BLOCK = 4096
CHUNK = 2**28  # elements per chunk of the full-tensor check (bounded temporaries)
LR, BETAS, EPS, WEIGHT_DECAY = 1e-2, (0.9, 0.999), 1e-8, 1e-2


def blocks(n: int) -> dict[str, int]:
    """First element of each checked block of ``BLOCK`` elements in a tensor of ``n``."""
    starts = {"first block": 0}
    for label, at in (("element 2**29 (byte 2**31)", 2**29), ("element 2**31", 2**31)):
        if at + BLOCK // 2 <= n:
            starts[f"straddles {label}"] = at - BLOCK // 2
    starts["last block"] = n - BLOCK
    return starts


def check(n: int, device: str) -> bool:
    """Two FusedAdam steps on one fp32 tensor of ``n`` elements; True if everything matched."""
    from fusedopt import FusedAdam
    from fusedopt.optim.reference import adam_reference

    gen = torch.Generator(device=device).manual_seed(0)
    p = torch.randn(n, device=device, generator=gen).requires_grad_()
    p.grad = torch.randn(n, device=device, generator=gen)
    opt = FusedAdam([p], lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)

    # Step 1: v starts at zero and becomes (1 - beta2) * g**2, so a zero left means a missed element.
    opt.step()
    state = opt.state[p]
    missed = 0
    with torch.no_grad():
        for start in range(0, n, CHUNK):
            v, g = state["exp_avg_sq"][start : start + CHUNK], p.grad[start : start + CHUNK]
            missed += int(((v == 0) & (g != 0)).sum())
    print(f"  step 1: elements with a non-zero grad left untouched: {missed}")

    # Step 2: each block against the reference, run on clones taken before the step.
    starts = blocks(n)
    with torch.no_grad():
        before = {
            name: [
                t[start : start + BLOCK].clone() for t in (p, p.grad, state["exp_avg"], state["exp_avg_sq"])
            ]
            for name, start in starts.items()
        }
    opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
    t = float(state["step"])
    bias = [(1 - BETAS[0] ** t, math.sqrt(1 - BETAS[1] ** t))]
    ok = missed == 0
    for name, start in starts.items():
        rp, rg, rm, rv = before[name]
        adam_reference(
            [rp],
            [rg],
            [rm],
            [rv],
            None,
            bias,
            lr=LR,
            beta1=BETAS[0],
            beta2=BETAS[1],
            eps=EPS,
            weight_decay=WEIGHT_DECAY,
            decoupled_weight_decay=False,
            maximize=False,
        )
        report = []
        for label, got, want in zip(
            ("param", "exp_avg", "exp_avg_sq"),
            (p, state["exp_avg"], state["exp_avg_sq"]),
            (rp, rm, rv),
            strict=True,
        ):
            got = got.detach()[start : start + BLOCK]
            close = torch.allclose(got, want, rtol=1e-5, atol=1e-6)
            ok &= close
            diff = float((got - want).abs().max())
            report.append(f"{label} max|Δ| {diff:.3g}{'' if close else ' MISMATCH'}")
        print(f"  step 2, [{start:,}, {start + BLOCK:,}) {name}: " + ", ".join(report))
    return ok


def main() -> int:
    if not torch.cuda.is_available():
        print("check_int64: needs a CUDA GPU (a 2**31 + 1000-element tensor on the device); skipped.")
        return 0
    from fusedopt._multi_tensor import INTERPRET

    if INTERPRET:
        print("check_int64: TRITON_INTERPRET=1 would run 2**31 elements in the interpreter; skipped.")
        return 0
    need = 4 * N * 4  # param, grad, exp_avg, exp_avg_sq in fp32
    free, total = torch.cuda.mem_get_info()
    print(f"check_int64 on {torch.cuda.get_device_name()}: {N:,} fp32 elements, needs {need / 1e9:.1f} GB")
    if free < need + 2 * 2**30:
        print(
            f"  skipped: {free / 1e9:.1f} GB free of {total / 1e9:.1f} GB, need {need / 1e9:.1f} GB + 2 GiB"
        )
        return 0
    ok = check(N, "cuda")
    print("check_int64: " + ("ok" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
