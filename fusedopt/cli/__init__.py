"""The ``fusedopt`` command (``python -m fusedopt``): ``check`` and ``bench``.

``check`` (``fusedopt.cli.check``: the case lists and the command; ``check_runner`` runs a
case, ``check_report`` prints the tables and the verdict) compares every fused optimizer and
loss with torch on this machine; ``bench`` (``fusedopt.cli.bench``: the command, with the suites
``bench_optim``, ``bench_losses``, ``bench_amp`` and ``bench_host``, the measuring in
``bench_harness`` and the CSV, tables, PNG and summary in ``bench_report``) times them.
``fusedopt.cli.common`` holds what both share. Importing these modules changes nothing in the
process; ``fusedopt.__main__`` re-runs the command in a child process with ``TRITON_INTERPRET=1``
when there is no CUDA GPU.
"""
