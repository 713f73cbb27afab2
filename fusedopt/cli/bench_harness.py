"""How ``fusedopt bench`` measures its rows: the suites, the run's :class:`Context` (timing
settings, shared params, :meth:`Context.measure`), the device-to-device copy that ``% copy``
refers to, the derived columns of a finished row (:func:`finish_row`), and the SIGTERM guard that
lets a run cut by ``timeout`` still write its report.

A suite is a module with ``TITLE`` (its table's heading), ``HEADERS`` (what its case and layout
columns hold), ``FLOOR_TITLE``, ``IMPLS`` (fusedopt first), ``cases(args, ctx)`` (its rows, in
the order they run: objects with ``impl``, ``base_row()`` and ``run(ctx) -> row``) and
``floor_rows(args)`` (its byte-floor table, no timing).
"""

from __future__ import annotations

import functools
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fusedopt.cli import bench_amp, bench_host, bench_losses, bench_optim, common

SUITES = {"optim": bench_optim, "losses": bench_losses, "amp": bench_amp, "host": bench_host}
# fmt: off
IMPLS = ("fusedopt", "fusedopt-recipe", "torch-forloop", "torch-foreach", "torch-fused", "torch-eager",
         "torch-compile")
# fmt: on
assert set(IMPLS) == {i for suite in SUITES.values() for i in suite.IMPLS}


@dataclass
class Context:
    """How rows are measured in this run."""

    device: str
    smoke: bool  # --smoke: every path once on tiny inputs, nothing timed
    timed: bool  # do_bench timings: CUDA and not --smoke
    warmup: int
    rep: int
    host_steps: int
    compile_backend: str
    graph_layouts: tuple[str, ...]
    _shared: tuple = (None, [])  # the key and the params of the last ``params`` call

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def tiny(self) -> bool:
        """Smoke-sized inputs for the device suites: --smoke, or no CUDA."""
        return self.smoke or not self.cuda

    def params(self, key: tuple, make: Callable[[], list[torch.Tensor]]) -> list[torch.Tensor]:
        """``make()``'s params, reused by the next rows asking for the same ``key`` (only the
        last key's are kept)."""
        if self._shared[0] != key:
            self.drop_params()
            self._shared = (key, make())
        return self._shared[1]

    def drop_params(self) -> None:
        self._shared = (None, [])
        self.release()

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


def copy_row(numel: int, ctx: Context) -> dict:
    """The device-to-device copy of ``numel`` fp32 elements (read + write bytes), timed: the
    reference of ``% copy``."""
    src = torch.randn(numel, device=ctx.device)
    dst = torch.empty_like(src)
    t = common.do_bench(functools.partial(dst.copy_, src), ctx.warmup, ctx.rep)
    del src, dst
    ctx.release()
    row = dict(
        suite="copy", case="copy_", impl="torch", layout=str(numel), dtype="fp32", tensors=1, numel=numel
    )
    return {**row, "bytes_per_elt": 8, "bytes": 8 * numel, "ms": t.ms, "ms_p20": t.p20, "ms_p80": t.p80}


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
    """Derived columns: status, MB, GB/s, % of copy, fusedopt's speed-up over the row; environment."""
    row.update(env)
    row.setdefault("status", "timed" if row.get("ms") else "smoke")
    row["mb"] = row["bytes"] / 1e6 if row.get("bytes") else None
    for prefix in ("", "graph_"):
        ms = row.get(f"{prefix}ms")
        if ms and row.get("bytes"):
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
