"""The fused losses under ``torch.compile(fullgraph=True)``: no graph break, the kernels run as
``torch.ops.fusedopt`` ops, and loss and gradients equal eager fusedopt's (and torch's).

A small model (Linear → loss) per loss type, compiled with a backend that records the ATen
graphs it is given (as ``aot_eager``, plus the record), so a test cannot pass by falling back to
torch; one case runs inductor. Every op also passes ``torch.library.opcheck``. On CPU the
kernels run through the Triton interpreter: shapes stay tiny.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as TF
from helpers import Recorder, record_launches
from torch import nn
from torch.library import opcheck

from fusedopt import functional as F
from fusedopt import nn as fnn
from fusedopt.kernels import cross_entropy as ce_kernels
from fusedopt.losses.cross_entropy import cross_entropy_composition, z_loss_composition
from fusedopt.testing import assert_close
from fusedopt.tolerance import LOSS_TOLERANCE

# The interpreter computes with numpy, which warns about the intended inf - inf and 1 / 0.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

BATCH, FEATURES, CLASSES = 6, 7, 5


@dataclasses.dataclass(frozen=True)
class Case:
    ours: Callable[..., torch.Tensor]  # (model output [BATCH, CLASSES], target, **kwargs) -> loss
    theirs: Callable[..., torch.Tensor]  # torch's loss, same arguments
    forward_ops: frozenset[str]  # the fusedopt ops of the compiled forward, exactly
    backward_ops: frozenset[str] = frozenset()  # and of the compiled backward
    kwargs: dict = dataclasses.field(default_factory=dict)  # "weight": its shape (made per test)
    classes: bool = False  # target: class indices (else a tensor like the output)


def _ops(*names: str) -> frozenset[str]:
    return frozenset(f"fusedopt::{name}" for name in names)


CASES = {
    "mean": Case(
        lambda out, t, **kw: F.mean(out - t, **kw),
        lambda out, t, **kw: torch.mean(out - t, **kw),
        _ops("mean"),
        kwargs=dict(dim=1),
    ),
    "mse": Case(fnn.FusedMSELoss(), nn.MSELoss(), _ops("pointwise_loss_reduced")),
    "mse_weighted": Case(
        F.mse_loss, TF.mse_loss, _ops("pointwise_loss_reduced"), kwargs=dict(weight=(BATCH, CLASSES))
    ),
    "l1_sum": Case(
        fnn.FusedL1Loss(reduction="sum"), nn.L1Loss(reduction="sum"), _ops("pointwise_loss_reduced")
    ),
    "smooth_l1": Case(
        fnn.FusedSmoothL1Loss(beta=0.5), nn.SmoothL1Loss(beta=0.5), _ops("pointwise_loss_reduced")
    ),
    "huber_none": Case(
        F.huber_loss,
        TF.huber_loss,
        _ops("pointwise_loss"),
        _ops("pointwise_loss_backward"),
        kwargs=dict(reduction="none", delta=0.7, weight=(BATCH, CLASSES)),
    ),
    "cross_entropy": Case(
        fnn.FusedCrossEntropyLoss(), nn.CrossEntropyLoss(), _ops("cross_entropy"), classes=True
    ),
    "cross_entropy_options": Case(
        F.cross_entropy,
        TF.cross_entropy,
        _ops("cross_entropy"),
        kwargs=dict(weight=(CLASSES,), ignore_index=3, label_smoothing=0.1),
        classes=True,
    ),
    "cross_entropy_none": Case(
        F.cross_entropy,
        TF.cross_entropy,
        _ops("cross_entropy"),
        _ops("cross_entropy_backward"),
        kwargs=dict(reduction="none"),
        classes=True,
    ),
    "cross_entropy_z_loss": Case(
        F.cross_entropy,
        z_loss_composition,
        _ops("cross_entropy"),
        kwargs=dict(weight=(CLASSES,), ignore_index=3, label_smoothing=0.1, z_loss=0.05),
        classes=True,
    ),
    "cross_entropy_z_loss_none": Case(
        F.cross_entropy,
        z_loss_composition,
        _ops("cross_entropy"),
        _ops("cross_entropy_backward"),
        kwargs=dict(reduction="none", z_loss=0.05),
        classes=True,
    ),
    "cross_entropy_softcap": Case(
        F.cross_entropy,
        cross_entropy_composition,
        _ops("cross_entropy"),
        kwargs=dict(weight=(CLASSES,), ignore_index=3, label_smoothing=0.1, z_loss=0.05, softcap=0.5),
        classes=True,
    ),
    "cross_entropy_softcap_none": Case(
        fnn.FusedCrossEntropyLoss(reduction="none", softcap=0.5),
        functools.partial(cross_entropy_composition, reduction="none", softcap=0.5),
        _ops("cross_entropy"),
        _ops("cross_entropy_backward"),
        classes=True,
    ),
}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch (the cases share code objects: no recompile limit)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Inputs:
    """Random tensors on a device, from a fixed seed."""

    def __init__(self, device: str):
        self.device, self.gen = device, torch.Generator().manual_seed(0)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen).to(self.device)

    def labels(self, *shape: int) -> torch.Tensor:
        return torch.randint(0, 6, shape, generator=self.gen).to(self.device)


def _problem(case: Case, device: str):
    """A Linear model, its input, a target and the loss's keyword arguments, on ``device``."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Linear(FEATURES, CLASSES).to(device)
    x = torch.randn(BATCH, FEATURES, generator=gen).to(device)
    if case.classes:
        target = torch.randint(0, CLASSES, (BATCH,), generator=gen)
        target[:3] = torch.arange(3, 6) % CLASSES  # class 3 is present (an ignore_index)
    else:
        target = torch.randn(BATCH, CLASSES, generator=gen)
    kwargs = {
        k: torch.rand(v, generator=gen).add(0.5).to(device) if k == "weight" else v
        for k, v in case.kwargs.items()
    }
    return model, x, target.to(device), kwargs


def _loss_and_grads(step: Callable, model: nn.Module, *args) -> list[torch.Tensor]:
    loss = step(*args)
    return [loss.detach(), *torch.autograd.grad(loss, list(model.parameters()))]


def assert_within(actual: list[torch.Tensor], expected: list[torch.Tensor], what: str) -> None:
    """The loss tolerance (``fusedopt.tolerance.LOSS_TOLERANCE``) on loss and every gradient."""
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a.shape == e.shape and a.dtype == e.dtype, f"{what} [{i}]"
        assert_close(a, e, f"{what} [{i}]", LOSS_TOLERANCE)


@pytest.mark.parametrize("scale", [1.0, -2.5], ids=["grad_output_1", "grad_output_-2.5"])
@pytest.mark.parametrize("name", CASES)
def test_compiled_model_matches_eager(name, scale, triton_device):
    """fullgraph (no graph break), our ops in forward and backward graphs, loss and parameter
    gradients as eager fusedopt's and close to torch's."""
    case = CASES[name]
    model, x, target, kwargs = _problem(case, triton_device)

    def step(loss_fn, x, target):
        loss = loss_fn(model(x), target, **kwargs)
        return scale * (loss.sum() if loss.dim() else loss)

    recorder = Recorder()
    compiled = torch.compile(step, backend=recorder.backend, fullgraph=True)
    ours = _loss_and_grads(compiled, model, case.ours, x, target)
    assert recorder.graphs == [case.forward_ops, case.backward_ops]
    eager = _loss_and_grads(step, model, case.ours, x, target)
    assert_within(ours, eager, "compiled vs eager fusedopt")
    assert_within(ours, _loss_and_grads(step, model, case.theirs, x, target), "compiled vs torch")


@pytest.mark.parametrize("name", ["mse", "cross_entropy_options"])
def test_backward_twice_with_retain_graph(name, triton_device):
    """The compiled backward of a reduced loss can run again: it never scales the forward's
    gradient in place."""
    case = CASES[name]
    model, x, target, kwargs = _problem(case, triton_device)

    def step(x, target):
        return case.ours(model(x), target, **kwargs)

    grads = []
    for fn in (torch.compile(step, backend="aot_eager", fullgraph=True), step):
        loss = fn(x, target)
        params = list(model.parameters())
        for go in (3.0, 1.0, -0.5):
            grads.append(
                torch.autograd.grad(loss, params, torch.tensor(go, device=x.device), retain_graph=True)
            )
    compiled, eager = grads[:3], grads[3:]
    for c, e in zip(compiled, eager, strict=True):
        assert_within(list(c), list(e), "backward again")


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_inductor(triton_device, monkeypatch):
    """The default backend: inductor calls the ops (the row kernel runs at every call)."""
    case = CASES["cross_entropy_options"]
    model, x, target, kwargs = _problem(case, triton_device)
    launches = record_launches(monkeypatch, {"rows": ce_kernels.cross_entropy_kernel})

    def step(x, target):
        return 3.0 * case.ours(model(x), target, **kwargs)

    ours = _loss_and_grads(torch.compile(step, fullgraph=True), model, x, target)
    assert len(launches) == 1, "the compiled forward must run fusedopt's row kernel"
    assert_within(ours, _loss_and_grads(step, model, x, target), "inductor vs eager fusedopt")


@pytest.mark.parametrize("name", ["cross_entropy", "cross_entropy_options", "mse", "huber_none"])
def test_autocast_under_compile(name, triton_device):
    """The autocast rules hold while compiling: an fp32 loss from bf16 model outputs, class
    weights cast to fp32 (issue 18: weighted cross-entropy raised under autocast), the
    regression losses in fp32 (issue 18: they returned bf16)."""
    case = CASES[name]
    model, x, target, kwargs = _problem(case, triton_device)

    def step(loss_fn, x, target):
        with torch.autocast(triton_device, dtype=torch.bfloat16):
            out = model(x)
            loss = loss_fn(out, target if case.classes else target.to(out.dtype), **kwargs)  # bf16 pairs
        return loss.sum() if loss.dim() else loss

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    ours = _loss_and_grads(compiled, model, case.ours, x, target)
    assert ours[0].dtype == torch.float32
    assert_within(ours, _loss_and_grads(step, model, case.ours, x, target), "compiled vs eager, autocast")
    assert_within(ours, _loss_and_grads(step, model, case.theirs, x, target), "compiled vs torch, autocast")


def test_dynamic_shapes(triton_device):
    """One compiled graph for two batch sizes (symbolic shapes through the fakes), a 3-D
    cross-entropy input among the losses."""
    model = nn.Linear(FEATURES, CLASSES).to(triton_device)

    def step(x, y, labels):
        out = model(x)
        spatial = out.unsqueeze(-1).expand(-1, -1, 3)  # (N, C, 3), stride 0 in the last dim
        return (
            F.mse_loss(out, y)
            + F.huber_loss(out, y, reduction="none").sum()
            + F.mean(out, dim=0).sum()
            + F.cross_entropy(spatial, labels, reduction="none").sum()
        )

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=True)
    r = Inputs(triton_device)
    for batch in (BATCH, BATCH + 3):
        args = (r.randn(batch, FEATURES), r.randn(batch, CLASSES), r.labels(batch, 3) % CLASSES)
        ours = _loss_and_grads(compiled, model, *args)
        assert_within(ours, _loss_and_grads(step, model, *args), f"batch {batch}")


# opcheck: schema, fake tensors (shapes, dtypes, strides), AOT dispatch with dynamic shapes ----


def _ce_backward_args(r: Inputs) -> tuple:
    logits, target = r.randn(2, 6, 3), r.labels(2, 3)
    _, _, stats, lse = torch.ops.fusedopt.cross_entropy(
        logits, target, None, -100, "none", 0.1, True, torch.float32, 0.01, 2.0
    )
    rows = logits.movedim(1, -1)  # (N, S, C), a view of the logits
    return logits, rows, target.reshape(-1), None, stats, lse, r.randn(2, 3), -100, 0.1, 0.01, 2.0


# Op name and arguments (same-shape contiguous x, y, w as the launchers take them), tiny:
# opcheck runs each op several times.
OPCHECK_CASES: dict[str, Callable[[Inputs], tuple]] = {
    "mean": lambda r: ("mean", r.randn(3, 5), torch.float64),
    "pointwise_loss": lambda r: (
        "pointwise_loss", r.randn(3, 5), r.randn(3, 5), r.randn(3, 5).abs(), 1, 0.0, torch.float32
    ),
    "pointwise_loss-unweighted": lambda r: ("pointwise_loss", r.randn(7), r.randn(7), None, 3, 0.5, torch.float32),
    # under autocast: bf16 operands read as they are, the loss in fp32
    "pointwise_loss-autocast": lambda r: (
        "pointwise_loss", r.randn(7).bfloat16(), r.randn(7).bfloat16(), None, 1, 0.0, torch.float32
    ),
    "pointwise_loss_reduced-mean_by_weight": lambda r: (
        "pointwise_loss_reduced", r.randn(3, 5), r.randn(3, 5), r.randn(3, 5).abs(), 1, 0.0, "mean", True, True,
        torch.float32,
    ),
    "pointwise_loss_reduced-no_grad": lambda r: (
        "pointwise_loss_reduced", r.randn(7), r.randn(7), None, 4, 0.7, "sum", False, False, torch.float32
    ),
    "pointwise_loss_reduced-autocast": lambda r: (
        "pointwise_loss_reduced", r.randn(3, 5).half(), r.randn(3, 5).half(), None, 1, 0.0, "sum", False,
        True, torch.float32,
    ),
    "pointwise_loss_backward": lambda r: (
        "pointwise_loss_backward", r.randn(3, 5), r.randn(3, 5), None, r.randn(3, 5), 2, 0.0
    ),
    "cross_entropy-mean": lambda r: (
        "cross_entropy", r.randn(4, 6), r.labels(4), r.randn(6).abs(), 2, "mean", 0.1, True, torch.float32, 0.0, 0.0
    ),
    "cross_entropy-transposed": lambda r: (
        "cross_entropy", r.randn(6, 4).t(), r.labels(4), None, -100, "sum", 0.0, True, torch.float32, 0.1, 1.5
    ),
    "cross_entropy-none": lambda r: (
        "cross_entropy", r.randn(2, 6, 3), r.labels(2, 3), None, -100, "none", 0.0, True, torch.float32, 0.01, 0.0
    ),
    "cross_entropy-no_grad": lambda r: (
        "cross_entropy", r.randn(6), r.labels(), None, -100, "mean", 0.0, False, torch.float32, 0.0, 2.0
    ),
    "cross_entropy_backward": lambda r: ("cross_entropy_backward", *_ce_backward_args(r)),
}  # fmt: skip


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(case, triton_device):
    name, *args = OPCHECK_CASES[case](Inputs(triton_device))
    opcheck(getattr(torch.ops.fusedopt, name).default, tuple(args))
