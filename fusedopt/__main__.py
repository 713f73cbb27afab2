"""The ``fusedopt`` command: ``python -m fusedopt {check,bench}`` (console script ``fusedopt``).

Without a CUDA GPU the Triton kernels can only run through the interpreter, which must be
switched on (``TRITON_INTERPRET=1``) before any kernel is defined. Importing fusedopt never sets
it; this command re-runs itself in a child process with the variable set instead, so the
calling process and its environment stay as they were.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

EPILOG = """\
Without a CUDA GPU both commands re-run themselves in a child process with TRITON_INTERPRET=1, so
the kernels run on CPU through the Triton interpreter (slow; sizes are small). `check` exits 1 if
any result is outside the tolerance; `bench` times nothing without CUDA (smoke run, byte floors).
Run `fusedopt check --help` or `fusedopt bench --help` for each command's options."""


def parser() -> argparse.ArgumentParser:
    from fusedopt.cli import bench, check

    top = argparse.ArgumentParser(
        prog="fusedopt",
        description="fusedopt: fused Triton optimizers and losses for PyTorch; parity check and benchmarks.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="{check,bench}")
    for name, module, summary in (
        ("check", check, "compare every fused optimizer and loss with torch on this machine"),
        ("bench", bench, "time optimizer steps and losses against torch (CSV, table, PNG)"),
    ):
        sub = commands.add_parser(
            name,
            help=summary,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return top


def needs_interpreter() -> bool:
    """True without CUDA when the interpreter is not already on for this process."""
    return not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


def rerun_with_interpreter(argv: list[str], module: str = "fusedopt") -> int:
    """``python -m module argv`` in a child process with ``TRITON_INTERPRET=1``; its exit status."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = Path(__file__).resolve().parent.parent
    if root.name not in ("site-packages", "dist-packages"):  # a checkout: the child imports it too
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)
    print(
        "No CUDA GPU: re-running in a child process with TRITON_INTERPRET=1, so fusedopt's Triton "
        "kernels run on CPU through the interpreter (this process's environment is unchanged).",
        flush=True,
    )
    child = subprocess.Popen([sys.executable, "-m", module, *argv], env=env)
    # A SIGTERM for this process goes to the child, which reports what it has and exits.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum))
    try:
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:  # the child got the same Ctrl-C: wait for its report
                continue
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if needs_interpreter():
        return rerun_with_interpreter(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
