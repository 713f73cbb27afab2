import pytest
from optim_cases import ADAM_CASES, DTYPES, run_parity


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ADAM_CASES, ids=lambda c: c.id)
def test_adam_matches_torch(case, dtype, device):
    run_parity(case, device, dtype)
