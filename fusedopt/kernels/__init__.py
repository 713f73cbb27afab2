"""Triton kernels (``@triton.jit`` code only). Launchers live in ``fusedopt._multi_tensor``."""
