"""Train a small model with FusedSGD and torch.optim.SGD side by side: ``python -m fusedopt.demo``.

Prints both loss curves and their largest difference; exits non-zero if they drift apart.
Without a GPU the demo re-runs itself with ``TRITON_INTERPRET=1`` so the Triton kernels run
on CPU through the interpreter (importing fusedopt never sets that variable for you).
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

TOLERANCE = 1e-5  # relative, fp32, as the parity tests


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int):
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)

    from fusedopt.__main__ import needs_interpreter, rerun_with_interpreter

    if needs_interpreter():
        return rerun_with_interpreter(list(sys.argv[1:] if argv is None else argv), "fusedopt.demo")
    device = "cuda" if torch.cuda.is_available() else "cpu"

    import fusedopt

    backend = "compiled Triton kernels" if device == "cuda" else "Triton kernels through the CPU interpreter"
    print(f"fusedopt {fusedopt.__version__}, torch {torch.__version__}, device {device}: {backend}")
    torch.manual_seed(0)
    x = torch.randn(512, 16, device=device)
    y = torch.sin(x[:, :1] * 2) + 0.1 * x[:, 1:2] ** 2
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)).to(device)
    twin = copy.deepcopy(model)
    options = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    ours = _train(model, fusedopt.FusedSGD(model.parameters(), **options), x, y, args.steps)
    theirs = _train(twin, torch.optim.SGD(twin.parameters(), **options), x, y, args.steps)

    print(f"SGD{options}")
    print(f"{'step':>4}  {'torch.optim.SGD':>16}  {'fusedopt.FusedSGD':>18}  {'difference':>11}")
    for i, (a, b) in enumerate(zip(theirs, ours, strict=True)):
        print(f"{i:>4}  {a:>16.8f}  {b:>18.8f}  {abs(a - b):>11.3e}")
    loss_gap = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(theirs, ours, strict=True))
    param_gap = max(
        ((p - q).abs().max() / q.abs().max().clamp_min(1e-12)).item()
        for p, q in zip(model.parameters(), twin.parameters(), strict=True)
    )
    print(
        f"largest relative difference: loss {loss_gap:.3e}, params {param_gap:.3e} (tolerance {TOLERANCE:g})"
    )
    ok = loss_gap <= TOLERANCE and param_gap <= TOLERANCE and theirs[-1] < theirs[0]
    print("OK: same training curve" if ok else "FAILED: the curves differ")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
