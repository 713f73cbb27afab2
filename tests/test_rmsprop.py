"""FusedRMSprop against torch's for-loop step: its kernel in every dtype, and its CPU path without
the interpreter (torch's for-loop RMSprop for fp32, the fp32-math reference for bf16)."""

from helpers import parity_tests

test_rmsprop_matches_torch, test_cpu_path_matches_torch = parity_tests("rmsprop")
