"""FusedRAdam against torch's for-loop step: its kernel in every dtype, and its CPU path without
the interpreter (the reference in torch's for-loop order on cache-sized batches).
(RAdam: 7 steps, the plain branch (rho_t <= 5) for 5 steps, the rectified one after.)"""

from helpers import parity_tests

test_radam_matches_torch, test_cpu_path_matches_torch = parity_tests("radam")
