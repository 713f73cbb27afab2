"""The ``fusedopt`` command (``python -m fusedopt``, :mod:`fusedopt.__main__`): ``check`` (:mod:`.check`)
and ``bench`` (:mod:`.bench`, suites in ``bench_optim``, ``bench_losses``, ``bench_amp``); what both
share is in :mod:`.common`. Importing these modules changes nothing in the process."""
