"""Test set-up: without a GPU, the Triton kernels run on CPU through the interpreter.

The variable must be set before ``triton.jit`` decorates any kernel, i.e. before fusedopt is
imported; pytest loads this file first. The tests set it for their own process only. Only
fixtures live here; shared helpers are in ``helpers.py`` (imported by the fixtures that need
them, after the variable is set).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:
    from helpers import Launches

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture
def triton_device(device) -> str:
    """``device`` where fusedopt runs its Triton kernels: CUDA, and CPU only under the
    interpreter (elsewhere CPU tensors take the plain-torch path, tested through ``device``)."""
    from fusedopt._multi_tensor import runs_triton

    if not runs_triton(torch.device(device)):
        pytest.skip("CPU tensors take the plain-torch path in this process")
    return device


@pytest.fixture
def plain_cpu(monkeypatch) -> None:
    """CPU tensors take the non-Triton path in the test (torch's functional or the reference),
    as without TRITON_INTERPRET=1."""
    from fusedopt.optim import _plan

    monkeypatch.setattr(_plan, "runs_triton", lambda device: False)


@pytest.fixture
def launches(monkeypatch) -> Launches:
    """The launches of the optimizer kernels ("adam", "sgd", "rmsprop", "adagrad", "lion", ...)."""
    from helpers import optimizer_kernels, record_launches

    kernels = optimizer_kernels()
    return record_launches(monkeypatch, kernels)
