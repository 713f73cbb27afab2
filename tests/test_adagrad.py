import pytest
import torch
from helpers import (
    DTYPES,
    CountOps,
    check_same,
    give,
    grads_for,
    make,
    parity_params,
    run_parity,
    sparse_grad,
)

from fusedopt import FusedAdagrad
from fusedopt.testing import OPTIM_CASES

CASES = [c for c in OPTIM_CASES if c.group == "adagrad"]


@pytest.mark.parametrize(("case", "dtype"), parity_params(CASES, DTYPES))
def test_adagrad_matches_torch(case, dtype, device):
    run_parity(case, device, dtype)


@pytest.mark.filterwarnings("ignore:Sparse invariant checks are implicitly disabled")
def test_state_is_created_as_torch_does(device):
    """torch's constructor creates ``step`` and ``sum`` for every param, with or without a grad,
    from its own initial_accumulator_value (a group's is ignored); a group added later gets its
    state when a param first has a grad (a sparse one too), from the constructor's value."""
    specs = [(3, 4), (5,), (6, 3), (2,)]
    ours, theirs = make(device, specs), make(device, specs)

    def groups(params):
        return [{"params": params[:1]}, {"params": params[1:2], "initial_accumulator_value": 0.5}]

    opt = FusedAdagrad(groups(ours), lr=0.1, initial_accumulator_value=0.2)
    ref = torch.optim.Adagrad(groups(theirs), lr=0.1, initial_accumulator_value=0.2)
    check_same(opt, ref, ours[:2], theirs[:2])
    extra = dict(lr=0.05, lr_decay=0.1, initial_accumulator_value=0.7)
    opt.add_param_group({"params": ours[2:], **extra})
    ref.add_param_group({"params": theirs[2:], **extra})
    for step in range(3):
        grads = grads_for(ours, step)
        grads[2] = sparse_grad(ours[2], step)
        if step == 0:
            grads[3] = None  # param 3 gets no state before its first grad
        give(ours, grads)
        give(theirs, grads)
        opt.step()
        ref.step()
        assert opt.state_dict()["state"].keys() == ref.state_dict()["state"].keys()
        check_same(opt, ref, ours, theirs)


@pytest.mark.parametrize(("case", "dtype"), parity_params(CASES, [torch.float32, torch.bfloat16]))
def test_cpu_path_matches_torch(case, dtype, plain_cpu, launches):
    """Without the interpreter (odd layouts): torch's foreach Adagrad (fp32), the fp32-math
    reference (bf16)."""
    run_parity(case, "cpu", dtype)
    assert not launches, "no Triton kernel on this path"


def test_cpu_path_is_torchs_fused_adagrad_for_dense_params(plain_cpu):
    """Dense params whose grads share their layout: torch's fused CPU Adagrad."""
    ours, theirs = make("cpu", [(3, 4), (5,), ()]), make("cpu", [(3, 4), (5,), ()])
    kwargs = dict(lr=0.1, lr_decay=0.01, weight_decay=0.1)
    opt, ref = FusedAdagrad(ours, **kwargs), torch.optim.Adagrad(theirs, foreach=False, **kwargs)
    for step in range(3):
        grads = grads_for(ours, step)
        give(ours, grads)
        give(theirs, grads)
        with CountOps() as ops:
            opt.step()
        ref.step()
        assert any("_fused_adagrad_" in op for op in ops.ops), sorted(set(ops.ops))
    check_same(opt, ref, ours, theirs)
