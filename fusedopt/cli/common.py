"""What ``check`` and ``bench`` share: dtypes by name, the environment line, tables, CSV, timing
and a progress bar."""

from __future__ import annotations

import csv
import datetime
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
import triton

from fusedopt import _multi_tensor, testing

DTYPE_NAMES = testing.DTYPE_NAMES
DTYPES: dict[str, torch.dtype] = {name: dtype for dtype, name in DTYPE_NAMES.items()}
MIB = 2**20
QUANTILES = [0.5, 0.2, 0.8]  # do_bench returns median, p20, p80 in this order


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def kernel_path(device: torch.device | str) -> str:
    """How fusedopt runs on ``device``: compiled kernels, the interpreter or the torch reference."""
    if not _multi_tensor.runs_triton(torch.device(device)):
        return "plain-torch reference (Triton kernels NOT exercised; set TRITON_INTERPRET=1)"
    if _multi_tensor.INTERPRET:
        return "Triton kernels through the CPU interpreter (TRITON_INTERPRET=1)"
    return "compiled Triton kernels"


def environment() -> dict[str, str]:
    """GPU name (or CPU), torch / triton / CUDA versions and a UTC timestamp, for every result row."""
    cuda = torch.cuda.is_available()
    return {
        "gpu": torch.cuda.get_device_name() if cuda else "CPU",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": str(torch.version.cuda) if cuda else "",
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def slug(text: str) -> str:
    """File-name form of a device name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


class CsvLog:
    """CSV file written row by row (a run cut short still leaves its rows)."""

    def __init__(self, path: Path, fields: Sequence[str]):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = path.open("w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=list(fields), extrasaction="ignore")
        self._writer.writeheader()

    def write(self, row: dict) -> None:
        self._writer.writerow({k: "" if v is None else v for k, v in row.items()})
        self._file.flush()

    def close(self) -> None:
        self._file.close()


Column = tuple[str, str, str]  # (row key, header, format spec)


def format_cells(rows: list[dict], columns: Sequence[Column]) -> list[list[str]]:
    """Cell strings: numbers through their format spec, missing values as '-'."""

    def cell(value, spec: str) -> str:
        if value is None or value == "":
            return "-"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return str(value)
        return format(value, spec)

    return [[cell(r.get(k), f) for k, _, f in columns] for r in rows]


def table_text(rows: list[dict], columns: Sequence[Column], markdown: bool = False) -> str:
    """``rows`` as a fixed-width text table, or a Markdown table."""
    cells = format_cells(rows, columns)
    headers = [h for _, h, _ in columns]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |"]
        lines.append("|" + "|".join("---:" if f else "---" for _, _, f in columns) + "|")
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        return "  ".join(
            v.rjust(w) if f else v.ljust(w) for v, w, (_, _, f) in zip(values, widths, columns, strict=True)
        ).rstrip()

    return "\n".join([line(headers), *(line(c) for c in cells)])


def print_table(rows: list[dict], columns: Sequence[Column]) -> None:
    print(table_text(rows, columns))


class Progress:
    """A text progress bar on stderr: redrawn in place on a terminal, a line per tenth otherwise."""

    def __init__(self, total: int, label: str, enabled: bool = True, stream: TextIO | None = None):
        self.total = max(total, 1)
        self.label = label
        self.done = 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.start = time.perf_counter()
        self._last_tenth = -1

    def advance(self, what: str = "") -> None:
        self.done += 1
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        if self.tty:
            filled = 30 * self.done // self.total
            bar = "#" * filled + "." * (30 - filled)
            text = f"\r{self.label} [{bar}] {self.done}/{self.total} {elapsed:5.1f}s {what}"
            self.stream.write(text[:150].ljust(150) if self.done < self.total else text[:150] + "\n")
        elif 10 * self.done // self.total != self._last_tenth:
            self._last_tenth = 10 * self.done // self.total
            self.stream.write(f"{self.label}: {self.done}/{self.total} ({elapsed:.1f}s) {what}\n")
        self.stream.flush()


# Timing (CUDA) ------------------------------------------------------------------------------


@dataclass
class Timing:
    ms: float  # median
    p20: float
    p80: float


def do_bench(fn: Callable[[], object], warmup: int, rep: int) -> Timing:
    """``triton.testing.do_bench`` (L2 flushed before each run): median and 20/80 quantiles, in ms."""
    import triton.testing

    median, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=QUANTILES)
    return Timing(median, p20, p80)


def peak_extra_mib(fn: Callable[[], object]) -> float:
    """Memory one call of ``fn`` allocates above what was allocated before it, in MiB (CUDA)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / MIB


def short_error(e: BaseException, limit: int = 160) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def interpreter_warning() -> str | None:
    """A line for headers when CUDA tensors would run in the interpreter (timings meaningless)."""
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1":
        return "WARNING: TRITON_INTERPRET=1 with a CUDA GPU: fusedopt's kernels run in the interpreter."
    return None
