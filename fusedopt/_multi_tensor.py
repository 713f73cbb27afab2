"""Launch plans shared by every fused optimizer.

One kernel launch walks all tensors of one device and dtype. The launcher builds, once per
set of tensors, device tables of data pointers and of blocks (see
``fusedopt.kernels.common``) and reuses them while the pointers stay the same; only the
grads' table is refreshed when autograd hands out new grad buffers.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Iterator, Sequence

import torch
import triton.language as tl

# Read once: set TRITON_INTERPRET=1 before importing fusedopt to run the kernels on CPU.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

TL_DTYPE = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}


_dry_run = False  # set by dry_run(): TensorTable.launch and launch_grid return without launching


@contextlib.contextmanager
def dry_run() -> Iterator[None]:
    """Within this block, :meth:`TensorTable.launch` and :func:`launch_grid` run no kernel: an
    optimizer step on the Triton path does all its host work (scan, plans, pointer tables,
    scalars; the step counters torch ops advance still advance, those ``prepare_kernel``
    advances do not) and leaves params and the state the kernels write unchanged. For measuring
    that host work (``fusedopt bench --suites host``).

    The norm and clip kernels of ``max_grad_norm`` and ``clip_grad_norm_`` still run. A
    process-wide switch, not per thread; blocks nest.
    """
    global _dry_run
    previous, _dry_run = _dry_run, True
    try:
        yield
    finally:
        _dry_run = previous


def runs_triton(device: torch.device) -> bool:
    """Whether tensors on ``device`` go through the Triton kernels (else the torch reference)."""
    return device.type == "cuda" or (INTERPRET and device.type == "cpu")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype of a kernel over ``dtype`` storage: fp64 stays fp64, all else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def launch_config(total_numel: int) -> tuple[int, int]:
    """Block size and warps, by a size rule (in-place steps cannot be autotuned at run time).

    Eight elements per thread: at sixteen, the optimizer kernel's variants with five streams
    (amsgrad, masters; AMP and clipping on) need 150-170 registers on sm_90, one CTA per SM;
    at eight every fp32/bf16/fp16 variant fits in 128 (``fusedopt bench --suites sm90``). The
    block size is a multiple of 256 (``fusedopt.kernels.common.QBLOCK``): blocks start at
    multiples of it within each tensor, so every absmax block of 8-bit state lies in one program.
    """
    return (2048, 8) if total_numel >= 1 << 22 else (1024, 4)


def tail_block(block: int, num_warps: int) -> int:
    """Elements per sub-block of a masked last (or misaligned) block: 4 per thread, so its code
    does not grow with the block (``fusedopt bench --suites sm90`` reads the doubled block)."""
    return min(block, 128 * num_warps)


_DENSE: dict[tuple, bool] = {}  # a plain dict: dynamo warns about tracing an lru_cache


def _dense(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """True if a tensor of this size and stride covers its memory exactly once, in some order."""
    known = _DENSE.get((size, stride))
    if known is None:
        if len(_DENSE) >= 4096:
            _DENSE.clear()
        known = _DENSE[(size, stride)] = _covers_once(size, stride)
    return known


def _covers_once(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    if 0 in size:
        return True
    expected = 1
    for s, n in sorted((s, n) for n, s in zip(size, stride, strict=True) if n != 1):
        if s != expected:
            return False
        expected *= n
    return True


def is_dense(t: torch.Tensor) -> bool:
    """True if ``t`` covers its memory exactly once, in some order."""
    return _dense(tuple(t.shape), t.stride())


def shares_dense_layout(tensors: Sequence[torch.Tensor]) -> bool:
    """True if all tensors have one dense layout, so they can be walked in memory order."""
    first = tensors[0]
    stride = first.stride()
    return _dense(tuple(first.shape), stride) and all(t.stride() == stride for t in tensors[1:])


def dense_copy(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` (in ``t``'s dtype) in ``like``'s layout if that is dense, else contiguous."""
    if _dense(tuple(like.shape), like.stride()):
        return torch.empty_like(like, dtype=t.dtype).copy_(t)
    return t.contiguous()


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a small host tensor to ``device`` without blocking the host on the GPU stream."""
    if x.device == device:
        return x
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def capturing(device: torch.device) -> bool:
    """Whether the current stream of ``device`` is being captured into a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _refuse_upload_while_capturing(device: torch.device) -> None:
    if capturing(device):
        raise RuntimeError(
            "fusedopt: the step's pointer tables must be built before CUDA graph capture (they are "
            "built when params, grads or their addresses change). Run the step eagerly once (the "
            "warm-up torch's capturable optimizers need too) with the grads the graph will use."
        )


class DeviceScalars:
    """Hyper-parameters as one float64 vector on ``device`` that kernels read by address.

    The vector is rewritten only when a Python value changes (one small copy; none while they
    stay the same) and always in place, so a CUDA graph that captured a step reads the current
    values when replayed. Tensor values (an lr an LR scheduler changes in place) are copied on
    the device at every call: no host read, no recompilation. While a CUDA graph is being
    captured, changed Python values are written with device fills (no host memory involved).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.vector: torch.Tensor | None = None
        self._key: tuple | None = None

    def __call__(self, values: Sequence[float | torch.Tensor]) -> torch.Tensor:
        key = tuple(None if isinstance(v, torch.Tensor) else float(v) for v in values)
        if key != self._key:
            numbers = [0.0 if k is None else k for k in key]
            if self.vector is None or self.vector.numel() != len(numbers):
                self.vector = torch.empty(len(numbers), dtype=torch.float64, device=self.device)
            if capturing(self.device):
                for i, x in enumerate(numbers):
                    self.vector[i].fill_(x)
            else:
                host = torch.tensor(numbers, dtype=torch.float64)
                if self.device.type == "cuda":
                    host = host.pin_memory()
                self.vector.copy_(host, non_blocking=True)
            self._key = key
        for i, v in enumerate(values):
            if isinstance(v, torch.Tensor):
                self.vector[i].copy_(v.reshape(()))
        return self.vector


def launch_grid(kernel, programs: int, device: torch.device, *args, **kwargs) -> None:
    """``kernel[(programs,)](*args, **kwargs)`` on ``device``; nothing when ``programs`` is 0 or
    inside :func:`dry_run`."""
    if programs == 0 or _dry_run:
        return
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        kernel[(programs,)](*args, **kwargs)


def float64_vector(values: Sequence[float | torch.Tensor], device: torch.device) -> torch.Tensor:
    """Hyper-parameters (numbers or 1-element tensors) as one float64 vector on ``device``.

    Tensors are read on their own device: no host sync, so a tensor lr is honoured under
    CUDA graphs and changing it never recompiles a kernel.
    """
    if not any(isinstance(v, torch.Tensor) for v in values):
        return to_device(torch.tensor(values, dtype=torch.float64), device)
    return torch.stack(
        [torch.as_tensor(v).to(device=device, dtype=torch.float64).reshape(()) for v in values]
    )


class TensorTable:
    """Device tables for one multi-tensor launch over tensors of one device and dtype.

    Args:
        columns: ``K`` lists of ``T`` tensors whose addresses the kernel reads from ``ptrs``
            (int64 [T, K]); column 0 sets each tensor's element count.
        device: where the tables live (the tensors' device).
    """

    def __init__(self, columns: Sequence[Sequence[torch.Tensor]], device: torch.device):
        _refuse_upload_while_capturing(device)
        numels = [t.numel() for t in columns[0]]
        self.block, self.num_warps = launch_config(sum(numels))
        blocks = [-(-n // self.block) for n in numels]
        firsts = [0, *itertools.accumulate(blocks)][:-1]
        self.num_blocks = sum(blocks)
        self.device = device
        rows = [[t.data_ptr() for t in row] for row in zip(*columns, strict=True)]
        self.aligned = all(ptr % 16 == 0 for row in rows for ptr in row)
        self.tail = any(n % self.block for n in numels)  # some tensor ends in a partial block
        self.ptrs = to_device(torch.tensor(rows, dtype=torch.int64), device)
        self.meta = to_device(torch.tensor(list(zip(numels, firsts, strict=True)), dtype=torch.int64), device)
        owner = torch.repeat_interleave(
            torch.arange(len(numels), dtype=torch.int32), torch.tensor(blocks, dtype=torch.int64)
        )
        self.owner = to_device(owner, device)
        self._dynamic_key: tuple | None = None
        self._dynamic: torch.Tensor | None = None
        self._dynamic_aligned = False

    def dynamic(self, key: tuple | None, rows: Callable[[], list[tuple[int, ...]]]) -> torch.Tensor:
        """Per-step table int64 [T, 1]: the grads' addresses.

        Rebuilt from ``rows()`` unless ``key`` (None: always rebuild) equals the last one.
        """
        if key is None or (key is not self._dynamic_key and key != self._dynamic_key):
            _refuse_upload_while_capturing(self.device)
            built = rows()
            self._dynamic = to_device(torch.tensor(built, dtype=torch.int64), self.device)
            self._dynamic_key = key
            self._dynamic_aligned = all(row[0] % 16 == 0 for row in built)
        return self._dynamic

    @property
    def dynamic_aligned(self) -> bool:
        """Whether every address in the last per-step table is 16-byte aligned."""
        return self._dynamic_aligned

    def launch(self, kernel, dynamic: torch.Tensor, *args, **constexprs) -> None:
        """Run ``kernel(ptrs, dynamic, meta, owner, *args)`` over every block of every tensor.

        One launch; none when every tensor is empty or inside :func:`dry_run`. ``ALIGNED`` tells
        the kernel that every address is 16-byte aligned, so full blocks use vector loads and
        stores (else the kernel checks each tensor's addresses); ``TAIL`` that some tensor ends in
        a partial block (else the kernel has no masked path), walked in sub-blocks of ``TAIL_BLOCK``.
        """
        if self.num_blocks == 0 or _dry_run:
            return
        if self.num_blocks >= 2**31:  # CUDA's grid limit (axis 0): a clear error, not a failed launch
            raise RuntimeError(f"fusedopt: {self.num_blocks} blocks exceed CUDA's limit of 2**31 - 1")
        guard = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with guard:
            kernel[(self.num_blocks,)](
                self.ptrs,
                dynamic,
                self.meta,
                self.owner,
                *args,
                BLOCK=self.block,
                num_warps=self.num_warps,
                ALIGNED=self.aligned and self._dynamic_aligned,
                TAIL=self.tail,
                TAIL_BLOCK=tail_block(self.block, self.num_warps),
                **constexprs,
            )
