"""torch's own optimizer test data (``torch.testing._internal.common_optimizers.optim_db``) run
against the fused classes of issue 22: every ``optim_inputs_func`` config of a class (7 steps on
odd layouts beside torch's for-loop step, every param and state tensor compared) and every
``optim_error_inputs_func`` case (the same error type and message)."""

from __future__ import annotations

import pytest
import torch
from helpers import run_parity

import fusedopt
from fusedopt.testing import OptimCase

common = pytest.importorskip(
    "torch.testing._internal.common_optimizers",
    reason="torch's test data needs expecttest",
    exc_type=ImportError,
)
FUSED = {
    torch.optim.Adamax: fusedopt.FusedAdamax,
    torch.optim.RAdam: fusedopt.FusedRAdam,
    torch.optim.NAdam: fusedopt.FusedNAdam,
    torch.optim.Adadelta: fusedopt.FusedAdadelta,
    torch.optim.Rprop: fusedopt.FusedRprop,
}
INFOS = [info for info in common.optim_db if info.optim_cls in FUSED]


def _configs():
    for info in INFOS:
        for i, given in enumerate(info.optim_inputs_func(device="cpu", dtype=torch.float32)):
            yield pytest.param(info.optim_cls, given.kwargs, id=f"{info.optim_cls.__name__}-{i}-{given.desc}")


def _errors():
    for info in INFOS:
        for i, error in enumerate(info.optim_error_inputs_func(device="cpu", dtype=torch.float32)):
            yield pytest.param(info.optim_cls, error, id=f"{info.optim_cls.__name__}-{i}")


@pytest.mark.parametrize(("torch_cls", "kwargs"), _configs())
def test_optim_inputs(torch_cls, kwargs, device):
    run_parity(OptimCase(FUSED[torch_cls], torch_cls, kwargs), device, torch.float32)


@pytest.mark.parametrize(("torch_cls", "error"), _errors())
def test_optim_error_inputs(torch_cls, error):
    """The error (or warning: a param listed twice) torch's test expects of its own class."""
    given = error.optimizer_error_input
    expect = pytest.warns if issubclass(error.error_type, Warning) else pytest.raises
    with expect(error.error_type, match=error.error_regex):
        opt = FUSED[torch_cls](given.params, **given.kwargs)
        if error.error_on == common.OptimizerErrorEnum.STEP_ERROR:
            for p in (p for group in opt.param_groups for p in group["params"]):
                p.grad = torch.rand_like(p)
            opt.step()
