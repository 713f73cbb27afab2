"""Loss benchmark: ``python -m fusedopt bench --suites losses`` under its old name.

The harness lives in the package (``fusedopt/cli/bench_losses.py``, run by
``fusedopt/cli/bench.py``); this file only forwards its arguments. See ``--help``.

    PYTHONPATH=. python benchmarks/bench_losses.py                                  # GPU
    PYTHONPATH=. python benchmarks/bench_losses.py --losses ce-8192x50257 --dtypes bf16
    PYTHONPATH=. python benchmarks/bench_losses.py --smoke                          # nothing timed
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's fusedopt

from fusedopt.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--suites", "losses", *sys.argv[1:]]))
