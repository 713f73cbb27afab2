"""Every launcher asks for a grid CUDA can launch, for any input size: at most 2^31 - 1
programs on axis 0 and 65,535 on axes 1 and 2 (issue 18: ``fusedopt/losses.py`` put rows on
axis 1, so ``functional.mean(x, dim=-1)`` of more than 65,535 rows failed on a GPU).

The interpreter has no limit, so a CPU run shows a wrong grid only where it is recorded: each
kernel's ``run`` is wrapped (``kernel[grid](...)`` calls ``kernel.run(..., grid=grid)``). The
huge cases only record (the kernels do not run: the interpreter would take minutes); the
grid-stride loops that keep the loss kernels within the limit by construction run for real
with the cap lowered to a few programs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import fusedopt
import fusedopt.losses._common
from fusedopt import functional as F
from fusedopt._multi_tensor import TensorTable
from fusedopt.kernels import clip
from fusedopt.kernels import cross_entropy as ce_kernels
from fusedopt.kernels import linear_cross_entropy as lce_kernels
from fusedopt.kernels import losses as loss_kernels
from fusedopt.kernels.optimizer import optimizer_kernel, prepare_kernel
from fusedopt.testing import assert_close
from fusedopt.tolerance import LOSS_TOLERANCE

AXIS_0, AXES_1_2 = 2**31 - 1, 65_535
ROWS = 70_000  # more than axis 1 or 2 can take

LOSS_KERNELS = {
    name: getattr(loss_kernels, name)
    for name in (
        "pointwise_loss_kernel",
        "sum_rows_kernel",
        "pointwise_loss_backward_kernel",
        "scale_grad_kernel",
    )
}
CE_KERNELS = {
    name: getattr(ce_kernels, name)
    for name in (
        "cross_entropy_targets_kernel",
        "cross_entropy_kernel",
        "cross_entropy_sum_kernel",
        "cross_entropy_scale_kernel",
    )
}
LCE_KERNELS = {
    name: getattr(lce_kernels, name) for name in ("matmul_accumulate_kernel", "logsumexp_block_kernel")
}
NORM_KERNELS = {
    name: getattr(clip, name) for name in ("norm_partials_kernel", "norm_finish_kernel", "scale_kernel")
}


def record_grids(monkeypatch, kernels: dict, run: bool = True) -> list[tuple[str, tuple]]:
    """``(kernel name, grid)`` of every launch of ``kernels`` in the test; with ``run=False``
    the kernels are not run (their outputs stay uninitialized)."""
    grids = []
    for name, kernel in kernels.items():

        def wrapped(*args, _run=kernel.run, _name=name, **kwargs):
            grid = kwargs["grid"]
            grids.append((_name, grid(kwargs) if callable(grid) else tuple(grid)))
            return _run(*args, **kwargs) if run else None

        monkeypatch.setattr(kernel, "run", wrapped)
    return grids


def assert_within_cuda_limits(grids) -> None:
    assert grids, "nothing launched"
    for name, grid in grids:
        assert 1 <= len(grid) <= 3, (name, grid)
        assert 1 <= grid[0] <= AXIS_0, (name, grid)
        assert all(1 <= g <= AXES_1_2 for g in grid[1:]), (name, grid)


@pytest.mark.parametrize(
    "shape,kwargs",
    [((ROWS, 3), dict(dim=-1)), ((3, ROWS), dict(dim=0)), ((ROWS, 2, 5), dict(dim=(1, 2), keepdim=True))],
    ids=str,
)
def test_mean_of_many_rows_asks_for_a_launchable_grid(shape, kwargs, triton_device, monkeypatch):
    """Issue 18: the mean of 70,000 rows asked for a grid of (1, 70000): over CUDA's 65,535 on
    axis 1. Recorded, not run."""
    grids = record_grids(monkeypatch, LOSS_KERNELS, run=False)
    F.mean(torch.zeros(shape, device=triton_device), **kwargs)
    assert {name for name, _ in grids} == {"pointwise_loss_kernel", "sum_rows_kernel"}
    assert_within_cuda_limits(grids)


def test_every_loss_launcher_asks_for_a_launchable_grid(triton_device, monkeypatch):
    """Every loss launch (reduced and elementwise forward, both backward kernels) over 70,000
    rows of 3: one axis, within its limit. Recorded, not run."""
    grids = record_grids(monkeypatch, LOSS_KERNELS, run=False)
    x = torch.zeros(ROWS, 3, device=triton_device, requires_grad=True)
    y = torch.zeros(ROWS, 3, device=triton_device)
    for name in ("mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss"):
        (2 * getattr(F, name)(x, y)).backward()  # reduced: forward writes the gradient, backward scales it
        (getattr(F, name)(x, y, reduction="none") * 2).sum().backward()
    assert {name for name, _ in grids} == set(LOSS_KERNELS)
    assert_within_cuda_limits(grids)


@pytest.mark.parametrize("programs", [1, 3])
def test_loss_kernels_loop_over_their_work_when_the_grid_is_capped(programs, triton_device, monkeypatch):
    """The limit holds by construction: each loss kernel loops over its work items (program p
    takes items p, p + grid, ...). With the cap lowered to 1 or 3 programs (as 2^31 - 1 is for
    more work items on a GPU) every launch stays within it and the results are torch's."""
    monkeypatch.setattr(fusedopt.losses._common, "MAX_PROGRAMS", programs)
    grids = record_grids(monkeypatch, LOSS_KERNELS)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(40, 37, generator=gen).to(triton_device).requires_grad_()  # 1,480: two blocks
    y = torch.randn(40, 37, generator=gen).to(triton_device)
    g = torch.randn(40, 37, generator=gen).to(triton_device)
    xr = x.detach().clone().requires_grad_()
    for ours, theirs in (
        (F.mean(x, dim=1), torch.mean(xr, dim=1)),  # 40 rows of one block
        (F.mean(x), torch.mean(xr)),  # one row of two blocks
        *(
            (getattr(F, name)(x, y, reduction=r), getattr(TF, name)(xr, y, reduction=r))
            for name in ("mse_loss", "huber_loss")
            for r in ("sum", "none")
        ),
    ):
        assert_close(ours, theirs, "loss", LOSS_TOLERANCE)
        (gx,) = torch.autograd.grad(ours, x, 2.5 * torch.ones_like(ours) if ours.dim() < 2 else g)
        (gr,) = torch.autograd.grad(theirs, xr, 2.5 * torch.ones_like(theirs) if theirs.dim() < 2 else g)
        assert_close(gx, gr, "grad", LOSS_TOLERANCE)
    assert {name for name, _ in grids} == set(LOSS_KERNELS)
    assert all(grid == (min(grid[0], programs),) for _, grid in grids), grids


def test_cross_entropy_launchers_ask_for_launchable_grids(triton_device, monkeypatch):
    """Cross-entropy of 70,000 rows of 2 classes, and the linear cross-entropy of as many
    tokens in both loop orders (then a few bf16 tokens, for the fp32 matmul accumulation):
    every grid one axis within its limit. Run for real (a few dozen programs each)."""
    grids = record_grids(monkeypatch, CE_KERNELS | LCE_KERNELS)
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(ROWS, 2, generator=gen).to(triton_device).requires_grad_()
    target = torch.randint(0, 2, (ROWS,), generator=gen).to(triton_device)
    (2 * F.cross_entropy(logits, target)).backward()
    F.cross_entropy(logits, target, reduction="none").sum().backward()
    for tokens, dtype in ((ROWS, torch.float32), (300, torch.bfloat16)):
        x = torch.randn(tokens, 2, generator=gen).to(triton_device, dtype).requires_grad_()
        w = torch.randn(3, 2, generator=gen).to(triton_device, dtype).requires_grad_()
        for order in (dict(chunk_rows=tokens // 2 + 1), dict(chunk_classes=2)):
            F.linear_cross_entropy(x, w, target[:tokens], **order).backward()
    assert {name for name, _ in grids} == set(CE_KERNELS | LCE_KERNELS)
    assert_within_cuda_limits(grids)


def test_cross_entropy_refuses_a_grid_beyond_the_limit(triton_device, monkeypatch):
    """The cross-entropy kernels take one work item per program; their size rules keep the
    count under 2^31 - 1 for any tensor below 2^41 elements, and ``checked_grid`` raises a clear
    error rather than launching more (shown with the limit lowered)."""
    monkeypatch.setattr(fusedopt.losses._common, "MAX_PROGRAMS", 4)
    logits = torch.zeros(10_000, 2, device=triton_device)  # 5 row tiles of 2,048
    with pytest.raises(RuntimeError, match="exceeds CUDA's grid limit"):
        F.cross_entropy(logits, torch.zeros(10_000, dtype=torch.long, device=triton_device))


def test_clip_and_optimizer_launches_are_one_axis(triton_device, monkeypatch):
    """``clip_grad_norm_`` and an optimizer step (``TensorTable.launch``): 1-D grids of one
    program per block of at least 1,024 elements."""
    step_kernels = {"optimizer_kernel": optimizer_kernel, "prepare_kernel": prepare_kernel}
    grids = record_grids(monkeypatch, NORM_KERNELS | step_kernels)
    params = [torch.zeros(s, device=triton_device, requires_grad=True) for s in ((ROWS,), (3, 5), ())]
    for p in params:
        p.grad = torch.ones_like(p)
    fusedopt.clip_grad_norm_(params, 0.5)
    fusedopt.FusedAdam(params, lr=0.1).step()
    assert {name for name, _ in grids} == set(NORM_KERNELS) | set(step_kernels)
    assert_within_cuda_limits(grids)


def test_tensor_table_refuses_a_grid_beyond_the_limit(triton_device):
    """``TensorTable.launch`` runs one program per block on a 1-D grid: 2^31 blocks or more
    (2^41 elements: more memory than a GPU has) raise a clear error instead of a failed launch."""
    table = TensorTable([[torch.zeros(10, device=triton_device)]], torch.device(triton_device))
    table.num_blocks = 2**31
    launched = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(grid)

    with pytest.raises(RuntimeError, match=r"2\*\*31"):
        table.launch(Kernel(), table.ptrs)
    assert not launched
