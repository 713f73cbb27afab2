import pytest
from optim_cases import DTYPES, SGD_CASES, run_parity


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SGD_CASES, ids=lambda c: c.id)
def test_sgd_matches_torch(case, dtype, device):
    run_parity(case, device, dtype)
