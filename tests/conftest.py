"""Test set-up: without a GPU, the Triton kernels run on CPU through the interpreter.

The variable must be set before ``triton.jit`` decorates any kernel, i.e. before fusedopt is
imported; pytest loads this file first. The tests set it for their own process only.
"""

import os

import pytest
import torch

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


class Launches(list):
    """Every launch of the optimizer kernels in a test, as ``(name, args, kwargs)``."""

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name, _, _ in self:
            out[name] = out.get(name, 0) + 1
        return out


def record_launches(monkeypatch, kernels: dict) -> Launches:
    """Record every launch of ``kernels`` (name -> Triton kernel) for the test's duration:
    ``kernel[grid](...)`` calls ``kernel.run``, which is wrapped."""
    record = Launches()
    for name, kernel in kernels.items():

        def run(*args, _run=kernel.run, _name=name, **kwargs):
            record.append((_name, args, kwargs))
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", run)
    return record


@pytest.fixture
def launches(monkeypatch) -> Launches:
    """The launches of the optimizer kernels ("adam", "sgd", "rmsprop", "adagrad")."""
    from fusedopt.kernels import adagrad, adam, rmsprop, sgd

    kernels = {
        "adam": adam.adam_kernel,
        "sgd": sgd.sgd_kernel,
        "rmsprop": rmsprop.rmsprop_kernel,
        "adagrad": adagrad.adagrad_kernel,
    }
    return record_launches(monkeypatch, kernels)
