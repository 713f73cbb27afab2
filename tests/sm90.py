"""Compile kernels for an H100 (sm_90) without a GPU, in a child process.

The tests run under ``TRITON_INTERPRET=1``, where kernels are interpreted functions; the child
runs without it. ``child`` is a script that reads the JSON list of variants in ``argv[1]`` and
prints one JSON list of ``{"ok", "vector_loads", "error"}`` results as its last line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def compile_in_child(child: str, variants: list, timeout: int = 900) -> list[dict]:
    pytest.importorskip("triton.backends.nvidia", reason="triton without its NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    run = subprocess.run(
        [sys.executable, "-c", child, json.dumps(variants)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])
