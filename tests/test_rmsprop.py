import pytest
import torch
from optim_cases import DTYPES, RMSPROP_CASES, run_parity


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", RMSPROP_CASES, ids=lambda c: c.id)
def test_rmsprop_matches_torch(case, dtype, device):
    run_parity(case, device, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", RMSPROP_CASES, ids=lambda c: c.id)
def test_cpu_path_matches_torch(case, dtype, plain_cpu, launches):
    """Without the interpreter: torch's foreach RMSprop (fp32), the fp32-math reference (bf16)."""
    run_parity(case, "cpu", dtype)
    assert not launches, "no Triton kernel on this path"
