"""Optimizer-step benchmark: ``python -m fusedopt bench --suites optim`` under its old name.

The harness lives in the package (``fusedopt/cli/bench_optim.py``, run by
``fusedopt/cli/bench.py``); this file only forwards its arguments. See ``--help``.

    PYTHONPATH=. python benchmarks/bench_optim.py                    # GPU: everything
    PYTHONPATH=. python benchmarks/bench_optim.py --layouts gpt2 --dtypes bf16 --optimizers adamw
    PYTHONPATH=. python benchmarks/bench_optim.py --smoke            # any machine, nothing timed
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's fusedopt

from fusedopt.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--suites", "optim", *sys.argv[1:]]))
