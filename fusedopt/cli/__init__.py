"""The ``fusedopt`` command (``python -m fusedopt``): ``check`` and ``bench``.

``check`` (``fusedopt.cli.check``) compares every fused optimizer and loss with torch on this
machine; ``bench`` (``fusedopt.cli.bench``, with the suites ``fusedopt.cli.bench_optim`` and
``fusedopt.cli.bench_losses``) times them. ``fusedopt.cli.common`` holds what both share.
Importing these modules changes nothing in the process; ``fusedopt.__main__`` re-runs the
command in a child process with ``TRITON_INTERPRET=1`` when there is no CUDA GPU.
"""
