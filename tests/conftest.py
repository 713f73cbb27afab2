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
