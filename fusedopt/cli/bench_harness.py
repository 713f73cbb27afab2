"""How ``fusedopt bench`` measures its rows: the suites and implementations, the run's
:class:`Context` (do_bench settings, :meth:`Context.measure`), the device-to-device copy that
``% copy`` refers to, the derived columns of a finished row (:func:`finish_row`), and the
SIGTERM guard that lets a run cut by ``timeout`` still write its report.
"""

from __future__ import annotations

import functools
import signal
import threading
from dataclasses import dataclass

import torch

from fusedopt.cli import bench_losses, bench_optim, common

SUITES = ("optim", "losses")
IMPLS = ("fusedopt", "torch-forloop", "torch-foreach", "torch-fused", "torch-eager", "torch-compile")
assert set(IMPLS) == set(bench_optim.IMPLS + bench_losses.IMPLS)


@dataclass
class Context:
    """How rows are measured in this run."""

    device: str
    timed: bool  # CUDA and not --smoke
    warmup: int
    rep: int
    compile_backend: str
    graph_layouts: tuple[str, ...]

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def measure(self, fn, memory: bool = True) -> dict:
        """Timing (median, p20, p80) and peak extra memory of ``fn``; a smoke run only calls it."""
        if not self.timed:
            fn()
            return {}
        t = common.do_bench(fn, self.warmup, self.rep)
        out = {"ms": t.ms, "ms_p20": t.p20, "ms_p80": t.p80}
        if memory:
            out["peak_extra_mib"] = common.peak_extra_mib(fn)
        return out

    def release(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


def copy_bandwidth(numel: int, ctx: Context) -> tuple[common.Timing, float]:
    """Device-to-device copy of ``numel`` fp32 elements: its timing and GB/s (read + write bytes)."""
    src = torch.randn(numel, device="cuda")
    dst = torch.empty_like(src)
    timing = common.do_bench(functools.partial(dst.copy_, src), ctx.warmup, ctx.rep)
    del src, dst
    ctx.release()
    return timing, 2 * numel * 4 / (timing.ms * 1e-3) / 1e9


class Stopped(BaseException):
    """SIGTERM (e.g. from ``timeout``) during a row: not an ``Exception``, so no row swallows it."""


class SigtermGuard:
    """While installed, the first SIGTERM raises ``Stopped`` in the rows loop; later ones, and any
    during the report, are ignored, so a run cut by ``timeout`` still writes its tables, plot
    and summary (``timeout --kill-after`` leaves a few seconds for that)."""

    def __init__(self):
        self.raising = True
        self.received = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        first = not self.received
        self.received = True
        if first and self.raising:
            raise Stopped("stopped by SIGTERM")

    def __enter__(self) -> SigtermGuard:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def finish_row(row: dict, env: dict, copy_gbps: float | None, ours: dict[tuple, dict]) -> None:
    """Derived columns: GB/s, % of copy, fusedopt's speed-up over the row; environment."""
    row.update(env)
    row["mb"] = row["bytes"] / 1e6
    for prefix in ("", "graph_"):
        ms = row.get(f"{prefix}ms")
        if ms:
            row[f"{prefix}gbps"] = row["bytes"] / (ms * 1e-3) / 1e9
    if row.get("gbps") and copy_gbps:
        row["copy_gbps"] = copy_gbps
        row["pct_copy_bw"] = 100 * row["gbps"] / copy_gbps
    key = (row["suite"], row["case"], row["layout"], row["dtype"])
    if row["impl"] == "fusedopt":
        ours[key] = row
    mine = ours.get(key, {})
    for prefix in ("", "graph_"):
        if row.get(f"{prefix}ms") and mine.get(f"{prefix}ms"):
            row[f"{prefix}fusedopt_speedup"] = row[f"{prefix}ms"] / mine[f"{prefix}ms"]
    row["notes"] = "; ".join(n for n in (row.get("note"), row.get("graph_note")) if n)
