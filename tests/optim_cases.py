"""Declarative optimizer test cases, the tolerance table and the parity runner.

Oracles: fp32/fp64 params are compared with torch.optim's for-loop implementation run on the
same tensors; bf16/fp16 params with "torch's algorithm in fp32, rounded to the dtype after each
step" (torch.optim on fp32 copies, params and every state tensor rounded after each step).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import fusedopt
from fusedopt.tolerance import FP32_NOISE, OPTIM_TOLERANCE, round_to_storage_, spacing


@dataclass(frozen=True)
class Case:
    torch_cls: type
    fused_cls: type
    kwargs: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.fused_cls.__name__}({opts})"


SGD_CASES = [
    Case(torch.optim.SGD, fusedopt.FusedSGD, dict(lr=0.1)),
    Case(torch.optim.SGD, fusedopt.FusedSGD, dict(lr=0.1, momentum=0.9)),
    Case(torch.optim.SGD, fusedopt.FusedSGD, dict(lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.1)),
    Case(torch.optim.SGD, fusedopt.FusedSGD, dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01)),
    Case(torch.optim.SGD, fusedopt.FusedSGD, dict(lr=0.1, momentum=0.9, maximize=True)),
    Case(torch.optim.SGD, fusedopt.FusedSGD, dict(lr=0.1, weight_decay=0.2, maximize=True)),
]
ADAM_CASES = [
    Case(torch.optim.Adam, fusedopt.FusedAdam, dict(lr=0.01)),
    Case(torch.optim.Adam, fusedopt.FusedAdam, dict(lr=0.01, weight_decay=0.1)),
    Case(torch.optim.Adam, fusedopt.FusedAdam, dict(lr=0.01, amsgrad=True, betas=(0.8, 0.9))),
    Case(torch.optim.Adam, fusedopt.FusedAdam, dict(lr=0.01, maximize=True, eps=1e-3)),
    Case(torch.optim.Adam, fusedopt.FusedAdam, dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    Case(torch.optim.Adam, fusedopt.FusedAdam, dict(lr=0.01, capturable=True, amsgrad=True)),
    Case(torch.optim.AdamW, fusedopt.FusedAdamW, dict(lr=0.01)),
    Case(
        torch.optim.AdamW, fusedopt.FusedAdamW, dict(lr=0.01, weight_decay=0.5, amsgrad=True, maximize=True)
    ),
]

RMSPROP_CASES = [
    Case(torch.optim.RMSprop, fusedopt.FusedRMSprop, dict(lr=0.01)),
    Case(torch.optim.RMSprop, fusedopt.FusedRMSprop, dict(lr=0.01, centered=True, weight_decay=0.1)),
    Case(torch.optim.RMSprop, fusedopt.FusedRMSprop, dict(lr=0.01, momentum=0.9, alpha=0.9, maximize=True)),
    # alpha < 0.5: lerp's other branch (weight 1 - alpha >= 0.5).
    Case(
        torch.optim.RMSprop,
        fusedopt.FusedRMSprop,
        dict(lr=0.01, alpha=0.3, eps=1e-3, centered=True, momentum=0.5, capturable=True),
    ),
]
ADAGRAD_CASES = [
    Case(torch.optim.Adagrad, fusedopt.FusedAdagrad, dict(lr=0.1)),
    Case(torch.optim.Adagrad, fusedopt.FusedAdagrad, dict(lr=0.1, lr_decay=0.05, weight_decay=0.1)),
    Case(
        torch.optim.Adagrad,
        fusedopt.FusedAdagrad,
        dict(lr=0.1, initial_accumulator_value=0.1, eps=1e-3, weight_decay=0.2, maximize=True),
    ),
]

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# The tolerance table (fusedopt/tolerance.py, shared with `python -m fusedopt check`).
TOLERANCE = OPTIM_TOLERANCE

STEPS = 7


def make_params(device: str, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """Odd shapes: 0-d, empty, 1, 7, 4097, 3-d, a strided slice, a transposed matrix."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    return [
        rnd(),
        rnd(0),
        rnd(1),
        rnd(7),
        rnd(4097),
        rnd(3, 5, 7),
        rnd(6, 10)[:, ::3],  # not dense: a strided view
        rnd(9, 4).t(),  # dense, not contiguous
    ]


def make_grads(params: list[torch.Tensor], step: int, seed: int = 1) -> list[torch.Tensor]:
    """Fresh grads for a step. Odd steps give the transposed param a contiguous grad
    (strides that differ from the param's)."""
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    grads = []
    for p in params:
        g = torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype)
        grads.append(g if step % 2 or p.is_contiguous() else torch.empty_like(p).copy_(g))
    return grads


def leaves(tensors: list[torch.Tensor], dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Independent leaf copies with the same layout (strided views stay strided views)."""
    out = []
    for t in tensors:
        base = t.detach()
        if dtype is not None:
            base = base.to(dtype)
        copy = torch.empty_strided(base.size(), base.stride(), dtype=base.dtype, device=base.device)
        if not _dense(t):
            holder = torch.zeros(base.shape[0], base.shape[1] * 3, dtype=base.dtype, device=base.device)
            copy = holder[:, ::3]
        copy.copy_(base)
        out.append(copy.requires_grad_())
    return out


def _dense(t: torch.Tensor) -> bool:
    return t.numel() <= 1 or torch.empty_like(t).stride() == t.stride()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    tol = TOLERANCE[actual.dtype]
    actual, expected = actual.cpu(), expected.to(actual.dtype).cpu()
    if "ulps" not in tol:
        torch.testing.assert_close(actual, expected, msg=what, rtol=tol["rtol"], atol=tol["atol"])
        return
    if actual.numel() == 0:
        return
    # One rounding step of the dtype at the expected value, plus fp32 rounding noise of the
    # operands (visible only where a result cancels to near zero).
    err = (actual.double() - expected.double()).abs()
    floor = FP32_NOISE * expected.double().abs().max()
    allowed = tol["ulps"] * spacing(expected) + floor
    worst = int((err - allowed).argmax())
    assert bool((err <= allowed).all()), (
        f"{what}: {actual.flatten()[worst].item()} vs {expected.flatten()[worst].item()} "
        f"is more than {tol['ulps']} rounding step(s) apart"
    )


def run_parity(case: Case, device: str, dtype: torch.dtype, steps: int = STEPS) -> None:
    """Step both optimizers on identical params and grads; compare every param and state tensor."""
    params = make_params(device, dtype)
    ours = leaves(params)
    low_precision = dtype in (torch.bfloat16, torch.float16)
    theirs = leaves(params, torch.float32 if low_precision else None)
    opt = case.fused_cls(ours, **case.kwargs)
    oracle_kwargs = dict(case.kwargs)
    if device == "cpu":  # torch refuses capturable on CPU; the algorithm is the same
        oracle_kwargs.pop("capturable", None)
    ref = case.torch_cls(theirs, foreach=False, **oracle_kwargs)
    if low_precision:  # state torch creates in its constructor (Adagrad's sum) is stored rounded
        round_to_storage_(ref, theirs, dtype)
    for step in range(steps):
        for p, q, g in zip(ours, theirs, make_grads(params, step), strict=True):
            p.grad = g
            q.grad = g.to(q.dtype)
        opt.step()
        ref.step()
        if low_precision:
            round_to_storage_(ref, theirs, dtype)
    for i, (p, q) in enumerate(zip(ours, theirs, strict=True)):
        assert_close(p.detach(), q.detach(), f"param {i} {tuple(p.shape)}")
        mine, expected = opt.state[p], ref.state[q]
        assert list(mine) == list(expected), f"state keys of param {i} (in torch's order)"
        for key in expected:
            if key == "step":
                assert float(mine[key]) == float(expected[key]) == steps
                assert mine[key].dtype == expected[key].dtype and mine[key].device == expected[key].device
            else:
                assert mine[key].dtype == p.dtype
                assert_close(mine[key], expected[key], f"state[{key}] of param {i}")
