"""What ``check`` and ``bench`` share: dtypes and option lists by name, the header, the table,
CSV and bar-plot writers, a progress bar and timing."""

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
Panel = tuple[str, str, list[str], dict[str, list], tuple | None]  # title, y label, groups, series, line


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


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
    parser.add_argument(
        flag,
        nargs=nargs,
        action=Names,
        names=names,
        default=list(default),
        metavar="NAME",
        help=f"{what}; from: {', '.join(names)} (default: {' '.join(default) or 'none'})",
    )


# Writers --------------------------------------------------------------------------------------


def table_text(rows: list[dict], columns: Sequence[Column], markdown: bool = False) -> str:
    """``rows`` as a fixed-width text table or a Markdown table; missing values as '-'."""

    def cell(value, spec: str) -> str:
        if value is None or value == "":
            return "-"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return str(value)
        return format(value, spec)

    cells = [[cell(r.get(k), f) for k, _, f in columns] for r in rows]
    headers = [h for _, h, _ in columns]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |"]
        lines.append("|" + "|".join("---:" if f else "---" for _, _, f in columns) + "|")
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        aligned = [
            v.rjust(w) if f else v.ljust(w) for v, w, (_, _, f) in zip(values, widths, columns, strict=True)
        ]
        return "  ".join(aligned).rstrip()

    return "\n".join([line(headers), *(line(c) for c in cells)])


class CsvLog:
    """``folder/<name>_<UTC time of env>.csv``, written row by row (a run cut short leaves its rows)."""

    def __init__(self, folder: str, name: str, env: dict, fields: Sequence[str]):
        stamp = env["timestamp_utc"].replace("-", "").replace(":", "")
        self.path = Path(folder) / f"{name}_{stamp}.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=list(fields), extrasaction="ignore")
        self._writer.writeheader()

    def write(self, row: dict) -> None:
        self._writer.writerow({k: "" if v is None else v for k, v in row.items()})
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def bar_plot(path: Path, panels: list[Panel]) -> str | None:
    """One bar chart per panel: a bar per series in each group (``None``: no bar), and a dashed
    line at ``(y, label)`` if given. Returns why no PNG was written, or None. Uses matplotlib's
    object API (Agg), so the process's pyplot backend is left alone."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed"
    if not panels:
        return "no rows to plot"
    bars = max(len(groups) * max(len(series), 1) for _, _, groups, series, _ in panels)
    fig = Figure(figsize=(min(24.0, max(8.0, 0.25 * bars)), 4.8 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (title, ylabel, groups, series, line) in zip(axes, panels, strict=True):
        width = 0.8 / max(len(series), 1)
        for i, (label, values) in enumerate(series.items()):
            offset = (i - (len(series) - 1) / 2) * width
            points = [(g + offset, v) for g, v in enumerate(values) if v is not None]
            ax.bar([x for x, _ in points], [v for _, v in points], width, label=label)
        if line:
            ax.axhline(line[0], linestyle="--", color="gray", label=line[1])
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    return None


def save_plot(csv_path: Path, panels: list[Panel]) -> Path | None:
    """The PNG of ``panels`` next to the CSV, and a line for each; the PNG's path if written."""
    png = csv_path.with_suffix(".png")
    problem = bar_plot(png, panels)
    print(f"CSV: {csv_path}")
    print(f"PNG: {png}" if not problem else f"PNG: not written ({problem})")
    return None if problem else png


class Progress:
    """A progress bar on stderr: redrawn in place on a terminal, a line per tenth otherwise."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total = max(total, 1)
        self.label = label
        self.enabled = enabled
        self.done = 0
        self.tenth = -1
        self.start = time.perf_counter()

    def advance(self, what: str = "") -> None:
        self.done += 1
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        if sys.stderr.isatty():
            bar = ("#" * (30 * self.done // self.total)).ljust(30, ".")
            text = f"\r{self.label} [{bar}] {self.done}/{self.total} {elapsed:5.1f}s {what}"[:150]
            sys.stderr.write(text.ljust(150) if self.done < self.total else text + "\n")
        elif 10 * self.done // self.total != self.tenth:
            self.tenth = 10 * self.done // self.total
            sys.stderr.write(f"{self.label}: {self.done}/{self.total} ({elapsed:.1f}s) {what}\n")
        sys.stderr.flush()


# Timing (CUDA) --------------------------------------------------------------------------------


def do_bench(fn: Callable[[], object], warmup: int, rep: int) -> dict[str, float]:
    """``triton.testing.do_bench`` (L2 flushed before each run): median, p20 and p80, in ms."""
    import triton.testing

    median, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return {"ms": median, "ms_p20": p20, "ms_p80": p80}


def peak_extra_mib(fn: Callable[[], object]) -> float:
    """Memory one call of ``fn`` allocates above what was allocated before it, in MiB (CUDA)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def compiled(fn: Callable, backend: str) -> Callable:
    """``torch.compile(fn)`` on a fresh cache (no recompile limit reached, no stale graphs)."""
    torch.compiler.reset()
    return torch.compile(fn, backend=backend)


def short_error(e: BaseException, limit: int = 160) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Bench suites ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One bench row: its fixed columns, and what measures it (``run(ctx)`` returns the rest)."""

    row: dict
    run: Callable[..., dict]


@dataclass(frozen=True)
class Suite:
    """A bench suite: its table's title, what its case and layout columns hold, its
    implementations (fusedopt first), its rows, and its byte-floor table (host: none)."""

    title: str
    headers: tuple[str, str]
    impls: tuple[str, ...]
    jobs: Callable[..., list[Job]]  # (args, ctx) -> the rows, in the order they run
    floor_title: str | None = None
    floor_rows: Callable[..., list[dict]] = lambda args: []
