"""The ``fusedopt`` command (:mod:`fusedopt.__main__`): ``check``, ``bench`` and its suites, and what
they share (:mod:`.common`). Importing these modules changes nothing in the process."""
