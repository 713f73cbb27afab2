"""The byte figures written in prose (kernel and optimizer docstrings, the README's table) against
the one table, ``fusedopt.floors``; and that table against the algorithms' state."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import fusedopt
from fusedopt import floors
from fusedopt.kernels import adadelta, adagrad, adam, adamax, clip, lion, nadam, radam, rmsprop, rprop, sgd

ROOT = Path(__file__).resolve().parent.parent
SGD, ADAM, ADAMW = fusedopt.FusedSGD, fusedopt.FusedAdam, fusedopt.FusedAdamW
RMSPROP, ADAGRAD = fusedopt.FusedRMSprop, fusedopt.FusedAdagrad
LION, ADAMAX, RADAM, NADAM = (
    fusedopt.FusedLion,
    fusedopt.FusedAdamax,
    fusedopt.FusedRAdam,
    fusedopt.FusedNAdam,
)
ADADELTA = fusedopt.FusedAdadelta
RPROP = fusedopt.FusedRprop


def fp32(*floor_list: floors.Floor) -> int:
    """The fp32 bytes per element the floors share (a figure may stand for several options)."""
    (value,) = {f.bytes_per_element() for f in floor_list}
    return value


def flat(text: str) -> str:
    return " ".join(text.split())


# Each "N B" of the kernel module docstring's bytes paragraph, in order.
KERNEL_FIGURES = [
    (adam, lambda: [fp32(floors.step(ADAM))]),
    (sgd, lambda: [fp32(floors.step(SGD, momentum=0.9)), fp32(floors.step(SGD))]),
    (
        rmsprop,
        lambda: [
            fp32(floors.step(RMSPROP)),
            fp32(floors.step(RMSPROP, momentum=0.9), floors.step(RMSPROP, centered=True)),
            fp32(floors.step(RMSPROP, momentum=0.9, centered=True)),
        ],
    ),
    (adagrad, lambda: [fp32(floors.step(ADAGRAD))]),
    (lion, lambda: [fp32(floors.step(LION))]),
    (adamax, lambda: [fp32(floors.step(ADAMAX))]),
    (radam, lambda: [fp32(floors.step(RADAM))]),
    (nadam, lambda: [fp32(floors.step(NADAM))]),
    (rprop, lambda: [fp32(floors.step(RPROP))]),
    (adadelta, lambda: [fp32(floors.step(ADADELTA))]),
    (clip, lambda: [fp32(floors.NORM), fp32(floors.CLIP)]),
]


@pytest.mark.parametrize("module, expected", KERNEL_FIGURES, ids=[m.__name__ for m, _ in KERNEL_FIGURES])
def test_kernel_docstring_bytes(module, expected):
    paragraphs = [p for p in module.__doc__.split("\n\n") if "bytes per" in p.lower()]
    assert paragraphs, f"{module.__name__}: no 'Bytes per ...' paragraph"
    assert [int(n) for n in re.findall(r"(\d+) B\b", flat(" ".join(paragraphs)))] == expected()


# Per class: (pattern of its docstring, the floors its numbers state).
CLASS_FIGURES = [
    (ADAM, r"(\d+) bytes per fp32 element", lambda: [fp32(floors.step(ADAM))]),
    (
        SGD,
        r"(\d+) bytes per fp32 element with momentum \((\d+) without\)",
        lambda: [fp32(floors.step(SGD, momentum=0.9)), fp32(floors.step(SGD))],
    ),
    (
        RMSPROP,
        r"(\d+) bytes per fp32 element, plus (\d+) for each of the momentum buffer and the centered",
        lambda: [
            fp32(floors.step(RMSPROP)),
            fp32(floors.step(RMSPROP, momentum=0.9)) - fp32(floors.step(RMSPROP)),
        ],
    ),
    (ADAGRAD, r"(\d+) bytes per fp32 element", lambda: [fp32(floors.step(ADAGRAD))]),
    (LION, r"(\d+) bytes per fp32 element", lambda: [fp32(floors.step(LION))]),
    (ADAMAX, r"(\d+) bytes per fp32 element", lambda: [fp32(floors.step(ADAMAX))]),
    (RADAM, r"(\d+) bytes per fp32 element", lambda: [fp32(floors.step(RADAM))]),
    (NADAM, r"(\d+) bytes per fp32 element", lambda: [fp32(floors.step(NADAM))]),
    (RPROP, r"(\d+) bytes per fp32 element", lambda: [fp32(floors.step(RPROP))]),
    (ADADELTA, r"(\d+) bytes per fp32 element", lambda: [fp32(floors.step(ADADELTA))]),
]


@pytest.mark.parametrize("cls, pattern, expected", CLASS_FIGURES, ids=[c.__name__ for c, *_ in CLASS_FIGURES])
def test_optimizer_docstring_bytes(cls, pattern, expected):
    found = re.search(pattern, flat(cls.__doc__))
    assert found, f"{cls.__name__}'s docstring no longer says {pattern!r}"
    assert [int(n) for n in found.groups()] == expected()
    centered = floors.step(RMSPROP, centered=True).tensors - floors.step(RMSPROP).tensors
    assert centered == floors.step(RMSPROP, momentum=0.9).tensors - floors.step(RMSPROP).tensors


# The first integer of the last column of the README's row for each name.
README_FIGURES = {
    "FusedSGD": lambda: floors.step(SGD, momentum=0.9),  # the row says "with momentum" first
    "FusedAdam": lambda: floors.step(ADAM),
    "FusedAdamW": lambda: floors.step(ADAMW),
    "FusedRMSprop": lambda: floors.step(RMSPROP),
    "FusedAdagrad": lambda: floors.step(ADAGRAD),
    "FusedLion": lambda: floors.step(LION),
    "FusedAdamax": lambda: floors.step(ADAMAX),
    "FusedRAdam": lambda: floors.step(RADAM),
    "FusedNAdam": lambda: floors.step(NADAM),
    "FusedRprop": lambda: floors.step(RPROP),
    "FusedAdadelta": lambda: floors.step(ADADELTA),
    "clip_grad_norm_": lambda: floors.NORM,
    "GradScaler": lambda: floors.NORM,  # its inf check is the optimizer's norm pass
}


def readme_rows() -> dict[str, str]:
    """Row name -> last cell of the README's table with a `FusedSGD` row (the first whose header
    mentions bytes, if there are several)."""
    tables: list[list[str]] = [[]]
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("|"):
            tables[-1].append(line)
        elif tables[-1]:
            tables.append([])
    found = []
    for table in tables:
        cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in table[2:]]
        # A row may name several classes of one kernel family: "`FusedRAdam`, `FusedNAdam`".
        rows = {
            name: row[-1]
            for row in cells
            if re.fullmatch(r"`[^`]+`(, `[^`]+`)*", row[0])
            for name in re.findall(r"`([^`]+)`", row[0])
        }
        if "FusedSGD" in rows:
            found.append(("byte" not in table[0].lower(), rows))
    assert found, "README.md: no table with a `FusedSGD` row"
    return min(found, key=lambda f: f[0])[1]


@pytest.mark.parametrize("name", README_FIGURES)
def test_readme_bytes_table(name):
    rows = readme_rows()
    assert name in rows, f"README.md's bytes table has no `{name}` row"
    first = re.search(r"\d+", rows[name])
    assert first, rows[name]
    assert int(first.group()) == fp32(README_FIGURES[name]())


@pytest.mark.parametrize(
    "cls", [SGD, ADAM, ADAMW, RMSPROP, ADAGRAD, LION, ADAMAX, RADAM, NADAM, ADADELTA, RPROP]
)
def test_step_floor_reads_and_writes_every_state_tensor_the_step_creates(cls):
    """The floor's state columns are the state a real step creates (the kernel's table columns)."""
    options = {"momentum": 0.9} if cls in (SGD, RMSPROP) else {}
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.ones(3)
    opt = cls([p], **options)
    opt.step()
    created = [k for k in opt.state[p] if k != "step" and k not in cls.algorithm.carried]
    assert set(created) <= set(cls.algorithm.kernels.COLUMNS)
    (step,) = floors.step(cls, **options).passes
    assert step.reads == ("param", "grad", *created) and step.writes == ("param", *created)
    assert floors.step(cls, **options, max_grad_norm=1.0).passes == (*floors.NORM.passes, step)


def test_amp_phase_floors():
    adamw = fp32(floors.step(ADAMW))
    assert adamw == 28
    assert fp32(floors.amp_phase("torch")) == adamw + 4 + 8 + 8  # unscale_ r+w, norm r, clip r+w
    assert fp32(floors.amp_phase("torch-graph")) == adamw + 4 + 8
    assert fp32(floors.amp_phase("fusedopt")) == adamw + 4  # the norm, which is also the inf check
    assert floors.step(SGD, momentum=0.9).bytes_per_element(torch.bfloat16) == 10
    assert floors.LOSSES["cross_entropy"].bytes_per_element(torch.bfloat16) == 4


def test_low_precision_table_matches_the_floors():
    """docs/low-precision.md's "step B/elt" column: floors.step(FusedAdamW, dtype, **options)."""
    text = (ROOT / "docs" / "low-precision.md").read_text()
    rows = re.findall(r"^\| (fp32|bf16) \| (.+?) \| ([\d.]+) \| (\d+)", text, flags=re.M)
    assert len(rows) == 9, rows
    for dtype_name, options, _, step_bytes in rows:
        code = re.search(r"`(.+)`", options)
        kwargs = eval(f"dict({code.group(1)})", {"torch": torch}) if code else {}
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        assert floors.step(ADAMW, dtype, **kwargs).bytes_per_element(dtype) == int(step_bytes), options
