"""Noise in user code: documented usage warns nothing (warnings turned into errors)."""

from __future__ import annotations

import contextlib
import re
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import fusedopt
from fusedopt.optim import _quantize

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def warnings_as_errors():
    """Every warning an error, but torch's own DeprecationWarnings (``torch.jit`` deprecations
    raised while dynamo imports its parts: Python hides them outside ``__main__``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.")
        yield


def test_compiled_quantizer_warns_nothing():
    """8-bit state is created and read inside a compiled step; dynamo warned about every
    ``functools.cache``-wrapped call it traced (the code books)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4097, generator=gen)

    def roundtrip(x: torch.Tensor) -> torch.Tensor:
        codes = torch.empty(x.shape, dtype=torch.uint8)
        absmax = torch.empty(-(-x.numel() // _quantize.QBLOCK))
        _quantize.quantize_(codes, absmax, x, True)
        return _quantize.dequantize(codes, absmax, False) + _quantize.dequantize(codes, absmax, True)

    torch._dynamo.reset()
    with warnings_as_errors():
        compiled = torch.compile(roundtrip, backend="eager")(x)
    assert torch.equal(compiled, roundtrip(x))


def docs_snippet(path: str, after: str) -> str:
    """The first ```python block after the line holding ``after`` in ``path``."""
    text = (ROOT / path).read_text()
    block = re.search(r"```python\n(.*?)```", text[text.index(after) :], re.S)
    assert block, f"no python block after {after!r} in {path}"
    return textwrap.dedent(block.group(1))


def test_documented_compile_with_a_scheduler_warns_nothing():
    """docs/options.md's order (scheduler, then ``torch.compile(opt.step)``) runs without a
    warning, and the schedule applies."""
    code = docs_snippet("docs/options.md", "With an LR scheduler")
    torch._dynamo.reset()
    scope: dict = {}
    with warnings_as_errors():
        exec(compile(code, "docs/options.md", "exec"), scope)
    assert float(scope["opt"].param_groups[0]["lr"]) == pytest.approx(1e-3 * 0.5**3)
    assert scope["opt"].state  # the compiled step ran


@pytest.mark.parametrize("cls", [fusedopt.FusedAdamW, torch.optim.AdamW], ids=lambda c: c.__module__)
def test_step_compiled_before_the_scheduler_warns_as_torch_does(cls):
    """The other order (the one that allows ``fullgraph=True``): torch's scheduler never sees
    the compiled step called and warns once, for torch.optim.AdamW as for fusedopt (what
    docs/options.md says); the schedule still applies."""
    torch._dynamo.reset()
    model = torch.nn.Linear(8, 4)
    opt = cls(model.parameters(), lr=torch.tensor(1e-3))
    step = torch.compile(opt.step)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with pytest.warns(
        UserWarning, match=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`"
    ):
        for _ in range(3):
            model(torch.randn(2, 8)).sum().backward()
            step()
            scheduler.step()
            opt.zero_grad()
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(1e-3 * 0.5**3)
