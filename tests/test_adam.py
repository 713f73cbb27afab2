import pytest
from helpers import DTYPES, parity_params, run_parity

from fusedopt.testing import OPTIM_CASES

CASES = [c for c in OPTIM_CASES if c.group in ("adam", "adamw")]


@pytest.mark.parametrize(("case", "dtype"), parity_params(CASES, DTYPES))
def test_adam_matches_torch(case, dtype, device):
    run_parity(case, device, dtype)
