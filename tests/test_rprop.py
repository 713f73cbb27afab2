"""FusedRprop against torch's for-loop step: its kernel in every dtype, and its CPU path without
the interpreter (the reference in torch's for-loop order on cache-sized batches)."""

from helpers import parity_tests

test_rprop_matches_torch, test_cpu_path_matches_torch = parity_tests("rprop")
