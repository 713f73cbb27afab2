import pytest
import torch
from helpers import DTYPES, parity_params, run_parity

from fusedopt.testing import OPTIM_CASES

CASES = [c for c in OPTIM_CASES if c.group == "nadam"]


@pytest.mark.parametrize(("case", "dtype"), parity_params(CASES, DTYPES))
def test_nadam_matches_torch(case, dtype, device):
    run_parity(case, device, dtype)


@pytest.mark.parametrize(("case", "dtype"), parity_params(CASES, [torch.float32, torch.bfloat16]))
def test_cpu_path_matches_torch(case, dtype, plain_cpu, launches):
    """Without the interpreter: the reference in torch's for-loop order, every dtype."""
    run_parity(case, "cpu", dtype)
    assert not launches, "no Triton kernel on this path"
