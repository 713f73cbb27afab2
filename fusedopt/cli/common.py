"""What ``check`` and ``bench`` share: dtypes by name, the header, name-list options, the table,
CSV and bar-plot writers, progress lines; the bench suites' record."""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

import fusedopt
from fusedopt import _multi_tensor, testing

DTYPE_NAMES = testing.DTYPE_NAMES
DTYPES: dict[str, torch.dtype] = {name: dtype for dtype, name in DTYPE_NAMES.items()}
Column = tuple[str, str, str]  # (row key, header, format spec; "" for text)
Job = tuple[dict, Callable[..., dict]]  # a bench row's fixed columns, and run(ctx) -> the rest
# A bar chart: title, y label, its bars as (group, series, height; None: no bar), a dashed line (y, label).
Panel = tuple[str, str, list[tuple[str, str, float | None]], tuple | None]


def environment() -> dict[str, str]:
    """GPU name (or CPU), torch / triton / CUDA versions and a UTC timestamp, for every CSV row."""
    cuda = torch.cuda.is_available()
    return {
        "gpu": torch.cuda.get_device_name() if cuda else "CPU",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": str(torch.version.cuda) if cuda else "",
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def header(command: str, device: str) -> dict[str, str]:
    """Print the versions, the device and how fusedopt runs there; return :func:`environment`."""
    env = environment()
    versions = f"torch {env['torch']}, triton {env['triton']}, {env['timestamp_utc']}"
    print(f"fusedopt {fusedopt.__version__} {command}: {versions}")
    if not _multi_tensor.runs_triton(torch.device(device)):
        path = "plain-torch reference (Triton kernels NOT exercised; set TRITON_INTERPRET=1)"
    elif _multi_tensor.INTERPRET:
        path = "Triton kernels through the CPU interpreter (TRITON_INTERPRET=1)"
    else:
        path = "compiled Triton kernels"
    cuda = f"CUDA {env['cuda']}" if env["cuda"] else "no CUDA GPU"
    print(f"device: {env['gpu']} ({cuda}): {path}")
    if env["cuda"] and os.environ.get("TRITON_INTERPRET") == "1":
        print(
            "WARNING: TRITON_INTERPRET=1 with a CUDA GPU: the kernels run in the interpreter; timings mean nothing."
        )
    return env


class Names(argparse.Action):
    """Names from ``names``, space- or comma-separated (``--suites optim,losses``)."""

    def __init__(self, *args, names, **kwargs):
        self.names = list(names)
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        out = [n for v in values for n in v.split(",") if n]
        if bad := [n for n in out if n not in self.names]:
            parser.error(f"{option_string}: unknown {', '.join(bad)} (choose from {', '.join(self.names)})")
        setattr(namespace, self.dest, out)


def add_names(parser, flag: str, names, default, what: str, nargs: str = "+") -> None:
    """A ``flag`` taking names from ``names`` (``nargs="*"``: none given selects none)."""
    help = f"{what}; from: {', '.join(names)} (default: {' '.join(default) or 'none'})"
    parser.add_argument(
        flag, nargs=nargs, action=Names, names=names, default=list(default), metavar="NAME", help=help
    )


def table_text(rows: list[dict], columns: Sequence[Column], markdown: bool = False) -> str:
    """``rows`` as a fixed-width text table or a Markdown table: the columns some row fills, a
    missing value as '-'."""

    def cell(value, spec: str) -> str:
        if value is None or value == "":
            return "-"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return str(value)
        return format(value, spec)

    columns = [c for c in columns if any(r.get(c[0]) not in (None, "") for r in rows)]
    cells = [[cell(r.get(k), f) for k, _, f in columns] for r in rows]
    headers = [h for _, h, _ in columns]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |"]
        lines.append("|" + "|".join("---:" if f else "---" for _, _, f in columns) + "|")
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        padded = (v.rjust(w) if c[2] else v.ljust(w) for v, w, c in zip(values, widths, columns, strict=True))
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), *(line(c) for c in cells)])


class CsvLog(csv.DictWriter):
    """``folder/<name>_<UTC time of env>.csv``, line-buffered: a run cut short leaves its rows."""

    def __init__(self, folder: str, name: str, env: dict, fields: Sequence[str]):
        stamp = env["timestamp_utc"].replace("-", "").replace(":", "")
        self.path = Path(folder) / f"{name}_{stamp}.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = self.path.open("w", newline="", buffering=1)
        super().__init__(self.file, list(fields), extrasaction="ignore")
        self.writeheader()


def save_plot(csv_path: Path, panels: list[Panel]) -> Path | None:
    """A bar chart per panel in a PNG next to the CSV (a bar per series in each group), a line
    for each file; the PNG's path if written. matplotlib's object API: pyplot is left alone."""
    png = csv_path.with_suffix(".png")
    print(f"CSV: {csv_path}")
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("PNG: not written (matplotlib is not installed)")
        return None
    if not panels:
        print("PNG: not written (no rows to plot)")
        return None
    most = max(sum(v is not None for _, _, v in bars) for _, _, bars, _ in panels)
    fig = Figure(figsize=(min(24.0, max(8.0, 0.25 * most)), 4.8 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (title, ylabel, bars, line) in zip(axes, panels, strict=True):
        groups = list(dict.fromkeys(group for group, _, _ in bars))
        series: dict[str, list[tuple[int, float]]] = {}
        for group, label, value in bars:
            if value is not None:
                series.setdefault(label, []).append((groups.index(group), value))
        width = 0.8 / max(len(series), 1)
        for i, (label, points) in enumerate(series.items()):
            offset = (i - (len(series) - 1) / 2) * width
            ax.bar([x + offset for x, _ in points], [v for _, v in points], width, label=label)
        if line:
            ax.axhline(line[0], linestyle="--", color="gray", label=line[1])
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.savefig(png, dpi=110)
    print(f"PNG: {png}")
    return png


def progress(label: str, done: int, total: int, start: float, what: str) -> None:
    """A line on stderr after the first item and at each tenth of ``total``."""
    if done == 1 or 10 * done // total > 10 * (done - 1) // total:
        elapsed = time.perf_counter() - start
        print(f"{label}: {done}/{total} ({elapsed:.1f}s) {what}", file=sys.stderr, flush=True)


def compiled(fn: Callable, backend: str) -> Callable:
    """``torch.compile(fn)`` on a fresh cache (no recompile limit reached, no stale graphs)."""
    torch.compiler.reset()
    return torch.compile(fn, backend=backend)


def short_error(e: BaseException, limit: int = 160) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Suite:
    """A bench suite: its table's title, the headers of its case and layout columns, its
    implementations (fusedopt first), its rows and its byte-floor table (host: none)."""

    title: str
    headers: tuple[str, str]
    impls: tuple[str, ...]
    jobs: Callable[..., list[Job]]  # (args, ctx) -> the rows, in the order they run
    floor_title: str | None = None
    floor_rows: Callable[..., list[dict]] = lambda args: []
