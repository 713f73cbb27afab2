"""``fusedopt bench --suites sm90``: the compiler's own facts about every kernel variant the
launchers launch on CUDA, for an H100 (sm_90), on any machine with Triton (no GPU).

How: the public API (``FusedAdamW(...).step()``, ``functional.cross_entropy(...).backward()``,
...) runs on CPU tensors with the launchers on their Triton path, a stand-in Triton driver that
reports an sm_90 GPU, and Triton's ``jit_cache_hook`` answering every launch: Triton has by then
specialised the arguments as a real launch would (divisibility by 16 of every pointer and
integer), the hook records that specialisation and tells Triton to compile and launch nothing
(:func:`capture`). Each recorded launch is then compiled for sm_90 twice, with its block
constexpr as launched and doubled (:func:`analyse`, in worker processes), and the two SASS
listings are read (:class:`Listing`): registers, spills, shared memory and occupancy of the
launch, and from their difference the per-element cost of full blocks. Nothing here names a
kernel's signature: the rows follow the kernels as they change.

The columns are explained in ``docs/benchmarks.md`` ("Static sm_90 facts"). Run as
``python -m fusedopt.cli.bench_sm90 [--out DIR] [--jobs N]``; ``fusedopt bench --suites sm90``
runs that in a child process without ``TRITON_INTERPRET`` (under the interpreter kernels are not
compiled).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import csv
import dataclasses
import importlib
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

COLUMNS = [
    "kernel", "variant", "triton", "num_warps", "block", "regs", "spill_bytes", "smem_bytes", "ctas_per_sm",
    "wide_access_fraction", "sass_per_element", "sass_before_first_load",
]  # fmt: skip

# sm_90 (H100) per-SM limits: registers, warps, resident CTAs, shared memory (bytes; 227 KB of the
# 228 KB usable by one CTA, 1 KB reserved by the system for each CTA).
SM90_REGS, REG_UNIT, SM90_WARPS, SM90_CTAS = 65536, 256, 64, 32
SM90_SMEM, SMEM_PER_CTA_MAX, SMEM_RESERVED = 228 * 1024, 227 * 1024, 1024
DEVICE = "fusedopt-sm90"  # the stand-in driver's device: a key no real device's caches use

# The block constexpr of a launch: BLOCK, else the first of these the kernel has (its per-program
# tile along the data it streams; the matmul's is its k-step). ROWS multiplies the tile when present.
BLOCK_NAMES = ("BLOCK", "BLOCK_K", "BLOCK_N", "BLOCK_M")
GLOBAL_ACCESS = ("LDG", "STG", "LDGSTS")  # global loads and stores (LDGSTS: global -> shared copy)
GLOBAL_LOADS = ("LDG", "LDGSTS")


# SASS -------------------------------------------------------------------------------------------

_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_PRED = re.compile(r"^@!?U?P[T0-9]+\s+")
_REG = re.compile(r"(?<![\w.])R(\d+)(?:\.64)?")


@dataclasses.dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # with its modifiers, e.g. LDG.E.128
    operands: tuple[str, ...]
    predicated: bool

    @property
    def op(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def width(self) -> int:
        """Bits a memory instruction moves per thread (from its modifiers; 32 without one)."""
        mods = self.opcode.split(".")[1:]
        for mod, bits in (("128", 128), ("64", 64), ("U16", 16), ("S16", 16), ("U8", 8), ("S8", 8)):
            if mod in mods:
                return bits
        return 32


def parse_sass(text: str) -> list[Instruction]:
    """The instructions of a ``cuobjdump -sass`` listing (one kernel), in listing order."""
    out = []
    for line in text.splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        body = match.group(2)
        pred = _PRED.match(body)
        if pred:
            body = body[pred.end() :]
        opcode, _, rest = body.partition(" ")
        operands = tuple(o.strip() for o in rest.split(",")) if rest.strip() else ()
        out.append(Instruction(int(match.group(1), 16), opcode, operands, pred is not None))
    return out


def _regs(operand: str) -> list[int]:
    """Register numbers an operand names (a ``.64`` address or a 64-bit value: the pair)."""
    regs = []
    for m in _REG.finditer(operand):
        r = int(m.group(1))
        regs += [r, r + 1] if m.group(0).endswith(".64") else [r]
    return regs


def _dest_count(ins: Instruction) -> int:
    mods = ins.opcode.split(".")
    if "128" in mods:
        return 4
    if "64" in mods or "WIDE" in mods or ins.op in ("DADD", "DMUL", "DFMA", "DMNMX"):
        return 2
    if ins.op in ("F2F", "I2F") and len(mods) > 1 and mods[1].endswith("64"):
        return 2
    return 1


_NO_DEST = {"STG", "STS", "STL", "ST", "RED", "REDG", "BRA", "EXIT", "BAR", "BSYNC", "BSSY", "WARPSYNC", "NOP",
            "CALL", "RET", "MEMBAR", "FENCE", "DEPBAR", "LDGDEPBAR", "ERRBAR", "CCTL", "FCHK", "PLOP3", "R2P",
            "LDGSTS"}  # fmt: skip


def _split(ins: Instruction) -> tuple[int | None, list[int]]:
    """The first destination register of ``ins`` (None if it writes none) and its source
    registers. The destination is the first operand after any leading predicates (``SHFL PT,
    R3, ...``), if that is a register; comparisons and stores write none."""
    every = [r for o in ins.operands for r in _regs(o)]
    if ins.op in _NO_DEST or "SETP" in ins.op:
        return None, every
    k = 0
    while k < len(ins.operands) and re.fullmatch(r"!?U?P[T0-9]+", ins.operands[k]):
        k += 1
    if k < len(ins.operands) and re.fullmatch(r"R\d+(\.\w+)?", ins.operands[k]):
        return int(re.match(r"R(\d+)", ins.operands[k]).group(1)), [
            r for o in ins.operands[k + 1 :] for r in _regs(o)
        ]
    return None, every


def _address(ins: Instruction) -> list[int]:
    """The registers of a memory instruction's address operand (``desc[UR4][R8.64+0x10]``)."""
    return [r for o in ins.operands if o.startswith(("[", "desc[")) for r in _regs(o.split("][")[-1])]


def _successors(code: list[Instruction], index: dict[int, int], i: int) -> list[int]:
    ins = code[i]
    nxt = [i + 1] if i + 1 < len(code) else []
    if ins.op in ("EXIT", "RET"):
        return nxt if ins.predicated else []
    if ins.op == "BRA":
        targets = [index[int(o, 16)] for o in ins.operands if o.startswith("0x") and int(o, 16) in index]
        conditional = ins.predicated or any(re.fullmatch(r"!?U?P\d", o) for o in ins.operands)
        return targets + (nxt if conditional else [])
    return nxt


def _marked_registers(code: list[Instruction], succ: list[list[int]]) -> list[set[int]]:
    """Per instruction, the registers that may hold a value computed from the thread index on
    entry to it (``SR_TID``, ``SR_LANEID``, or an operation or load on such a value): a forward
    data-flow analysis over the control-flow graph, joined by union."""
    transfer = []
    for ins in code:
        dest, sources = _split(ins)
        regs = frozenset(range(dest, dest + _dest_count(ins))) if dest is not None else frozenset()
        thread = any("SR_TID" in o or "SR_LANEID" in o for o in ins.operands)
        transfer.append((regs, frozenset(sources), thread, ins.predicated))
    entry: list[set[int]] = [set() for _ in code]
    work = [0] if code else []
    seen = [False] * len(code)
    while work:
        i = work.pop()
        seen[i] = True
        regs, sources, thread, predicated = transfer[i]
        out = entry[i]
        if regs:
            if thread or not sources.isdisjoint(out):
                out = out | regs
            elif not predicated:
                out = out - regs
        for j in succ[i]:
            if not seen[j] or not out <= entry[j]:
                entry[j] = entry[j] | out
                work.append(j)
    return entry


def _fewest_before(code: list[Instruction], succ: list[list[int]], targets: set[int]) -> int | None:
    """Fewest instructions (NOPs not counted) any path from the entry executes before reaching
    one of ``targets`` (a breadth-first search with 0-1 weights)."""
    if not code or not targets:
        return None
    dist = [math.inf] * len(code)
    dist[0] = 0
    queue = collections.deque([0])
    while queue:
        i = queue.popleft()
        if i in targets:
            return int(dist[i])
        cost = 0 if code[i].op == "NOP" else 1
        for j in succ[i]:
            if dist[i] + cost < dist[j]:
                dist[j] = dist[i] + cost
                (queue.appendleft if cost == 0 else queue.append)(j)
    return None


class Listing:
    """The facts of one compiled kernel's SASS that the columns need.

    ``instructions``: the kernel's instructions up to its last EXIT, NOPs excluded (what follows
    the last EXIT is padding and out-of-line slow paths, e.g. of IEEE division). ``accesses``:
    global loads and stores (LDG, STG, LDGSTS) by width in bits. ``spill_bytes``: bytes of
    local-memory stores and loads (STL, LDL), which for Triton's kernels (no local arrays) is
    what ``ptxas -v`` reports as spill stores plus spill loads. :meth:`first_data_load`: the
    fewest instructions before the first element-data load.
    """

    def __init__(self, sass: str):
        code = parse_sass(sass)
        exits = [i for i, ins in enumerate(code) if ins.op == "EXIT"]
        self.code = code[: exits[-1] + 1] if exits else code
        body = self.code[:-1] if exits else self.code
        self.instructions = sum(ins.op != "NOP" for ins in body)
        self.accesses: dict[int, int] = {}
        for ins in self.code:
            if ins.op in GLOBAL_ACCESS:
                self.accesses[ins.width] = self.accesses.get(ins.width, 0) + 1
        self.spill_bytes = sum(ins.width // 8 for ins in self.code if ins.op in ("STL", "LDL"))

    def first_data_load(self) -> int | None:
        """The fewest instructions a program executes (over the control-flow graph from the
        entry) before a global load whose address depends on the thread index: an element's
        data, not a table entry or a scalar (:func:`_marked_registers`). None if there is none."""
        code = self.code
        index = {ins.address: i for i, ins in enumerate(code)}
        succ = [_successors(code, index, i) for i in range(len(code))]
        marked = _marked_registers(code, succ)
        loads = {
            i
            for i, ins in enumerate(code)
            if ins.op in GLOBAL_LOADS and not marked[i].isdisjoint(_address(ins))
        }
        return _fewest_before(code, succ, loads)


def res_usage(text: str) -> dict[str, int]:
    """``cuobjdump -res-usage``'s line for the kernel: REG, STACK, SHARED, LOCAL, ..."""
    match = re.search(r"REG:(\d+)[^\n]*", text)
    if not match:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {text[:400]!r}")
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", match.group(0))}


def ctas_per_sm(regs: int, num_warps: int, smem_bytes: int) -> int:
    """Resident CTAs per sm_90 SM: the least of the register, warp, CTA and shared-memory limits
    (registers allocated per warp in units of 256; 1 KB of shared memory reserved per CTA)."""
    per_warp = -(-max(regs, 1) * 32 // REG_UNIT) * REG_UNIT
    by_regs = SM90_REGS // (per_warp * num_warps)
    by_warps = SM90_WARPS // num_warps
    by_smem = SM90_SMEM // (smem_bytes + SMEM_RESERVED) if smem_bytes <= SMEM_PER_CTA_MAX else 0
    return min(by_regs, by_warps, SM90_CTAS, by_smem)


# Capture ---------------------------------------------------------------------------------------


class _Driver:
    """A stand-in Triton driver for an sm_90 GPU: enough for Triton to specialise and compile."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", 90, 32)

    def is_active(self) -> bool:
        return True

    def get_current_device(self):
        return DEVICE

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self):
        return self.target


@contextlib.contextmanager
def sm90_driver() -> Iterator[None]:
    """Within this block Triton compiles for sm_90 (the stand-in driver); restored after."""
    from triton.runtime.driver import driver

    saved = driver._active  # not driver.active: that would initialise the real driver (none here)
    driver.set_active(_Driver())
    try:
        yield
    finally:
        driver._active = saved


@dataclasses.dataclass
class Launch:
    """One kernel launch as Triton specialised it, in a scenario: ``spec`` is Triton's
    serialised specialisation (signature, constexprs, attributes, options), what
    ``JITFunction.preload`` compiles."""

    scenario: str
    kernel: str
    variant: str
    module: str
    name: str
    spec: str
    constexprs: dict = dataclasses.field(default_factory=dict)


class Recorder:
    """Triton's ``jit_cache_hook`` during :func:`capture`: records each launch (once per
    specialisation and variant) under the current scenario and variant, and tells Triton to
    neither compile nor launch it."""

    def __init__(self):
        self.launches: list[Launch] = []
        self.scenario = self.variant = ""
        self.jitted: list = []  # the JITFunctions whose caches the capture touched

    def __call__(self, *, key, fn, compile, **_) -> bool:
        jit = fn.jit_function
        spec = compile["specialization_data"]
        if not any(x.variant == self.variant and x.spec == spec for x in self.launches):
            where = (self.scenario, jit.fn.__name__, self.variant, jit.fn.__module__, jit.fn.__qualname__)
            self.launches.append(Launch(*where, spec, constexprs(spec)))
        if jit not in self.jitted:
            self.jitted.append(jit)
        return True  # skip the compilation, and so the launch


def _serialize_jit_constants(serialize):
    """Triton's ``serialize_specialization_data`` with ``@triton.jit`` constexprs (the optimizer
    kernel's ``UPDATE``) written as triton 3.9 writes them, ``{"jit_function": "module:name"}``:
    triton 3.6 cannot serialize them at all."""
    from triton.runtime.jit import JITFunction

    def wrapped(name, signature, constants, *args, **kwargs):
        constants = {
            k: {"jit_function": f"{v.fn.__module__}:{v.fn.__qualname__}"} if isinstance(v, JITFunction) else v
            for k, v in constants.items()
        }
        return serialize(name, signature, constants, *args, **kwargs)

    return wrapped


def _preload(jit, spec: str):
    """``jit.preload(spec)``; where this triton's preload cannot resolve a ``jit_function``
    constexpr (3.6), the same steps with it resolved."""
    import triton
    import triton.language as tl

    if "jit_function" not in spec or hasattr(triton.runtime.jit, "_triton_jit_function_registry"):
        return jit.preload(spec)
    data = json.loads(spec)

    def decode(value):
        if tl.dtype.is_dtype(value):
            return tl.dtype(value)
        if isinstance(value, dict) and "constexpr" in value:
            return tl.constexpr(value["constexpr"])
        if isinstance(value, dict) and "jit_function" in value:
            module, name = value["jit_function"].split(":")
            obj = importlib.import_module(module)
            for part in name.split("."):
                obj = getattr(obj, part)
            return obj
        return value

    constexprs = {
        tuple(k): decode(v) for k, v in zip(data["constant_keys"], data["constant_vals"], strict=True)
    }
    attrs = dict(zip(map(tuple, data["attrs_keys"]), data["attrs_vals"], strict=True))
    signature = {k: tuple(v) if isinstance(v, list) else v for k, v in data["signature"].items()}
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in data["options"].items()}
    from triton.runtime.driver import driver

    device = driver.active.get_current_device()
    backend = jit.device_caches[device][3]
    options = backend.parse_options(options)
    return jit._do_compile(data["key"], signature, device, constexprs, options, attrs, warmup=True)


@contextlib.contextmanager
def capture() -> Iterator[Recorder]:
    """Within this block fusedopt's launchers take their Triton path for CPU tensors and every
    launch is recorded, not compiled nor run. A kernel's outputs stay as allocated, filled by
    torch's deterministic mode (NaN, or an integer's largest value: a host check that reads one,
    like cross-entropy's target check on CPU, sees "no error"). Restores everything."""
    import torch
    import triton

    from fusedopt import _multi_tensor

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError(
            "sm90 capture needs a process without TRITON_INTERPRET=1 (kernels must be JITFunctions)"
        )
    recorder = Recorder()
    saved = triton.knobs.runtime.jit_cache_hook, _multi_tensor.INTERPRET
    deterministic = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    fill = torch.utils.deterministic.fill_uninitialized_memory
    triton.knobs.runtime.jit_cache_hook = recorder
    serialize = triton.runtime.jit.serialize_specialization_data
    triton.runtime.jit.serialize_specialization_data = _serialize_jit_constants(serialize)
    _multi_tensor.INTERPRET = True  # runs_triton(cpu): the launchers' Triton path for CPU tensors
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        with sm90_driver():
            yield recorder
    finally:
        triton.knobs.runtime.jit_cache_hook, _multi_tensor.INTERPRET = saved
        triton.runtime.jit.serialize_specialization_data = serialize
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.utils.deterministic.fill_uninitialized_memory = fill
        for jit in recorder.jitted:
            jit.device_caches.pop(DEVICE, None)


# Scenarios -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Scenario:
    """Public-API calls on CPU tensors whose launches become rows. ``name`` is unique (what the
    budget test refers to); ``variant`` is the rows' variant column (dtype and options in words;
    a loss's launches add the phase, ``forward`` or ``backward``); ``kind``: optimizer or loss."""

    name: str
    variant: str
    kind: str
    run: Callable  # run(phase): phase("forward") etc. names the launches that follow


# Optimizer params: 4M elements in all (the launchers' large config), each a multiple of 4096 (whole blocks).
OPTIM_SHAPES = [(768 * 4096,), (256 * 4096,)]


# A launch with a tensor that ends in a partial block (the kernel's masked path, TAIL) and one
# whose address is not 16-byte aligned (alignment then decided per tensor).
TAIL_SHAPES = [*OPTIM_SHAPES, (4097,)]


def _optimizer(
    cls_name: str,
    variant: str,
    dtype_name: str,
    amp: bool = False,
    shapes=OPTIM_SHAPES,
    misaligned=False,
    **options,
) -> Scenario:
    """Two steps of ``fusedopt.<cls_name>`` (the second one is the steady state; both are
    recorded), through ``torch.amp.GradScaler`` if ``amp`` (the step then gets grad_scale and
    found_inf). The rows' variant starts with the algorithm (one kernel runs them all):
    ``adamw fp32 amsgrad``; ``misaligned``: the last param is a view one element in."""

    def run(phase: Callable[[str], None]) -> None:
        import torch

        import fusedopt

        params = [torch.zeros(s, dtype=getattr(torch, dtype_name), requires_grad=True) for s in shapes]
        if misaligned:
            params[-1] = torch.zeros(shapes[-1][0] + 1, dtype=params[-1].dtype)[1:].requires_grad_()
        for p in params:
            p.grad = torch.full_like(p, 1e-3)
        opt = getattr(fusedopt, cls_name)(params, lr=1e-3, **options)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if amp else None
        with torch.no_grad():
            for _ in range(2):
                if scaler is not None:
                    scaler.scale(torch.ones(()))  # what a backward of the scaled loss starts from
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()

    name = cls_name.removeprefix("Fused")
    return Scenario(f"{name} {variant}", f"{name.lower()} {variant}", "optimizer", run)


# Muon's matrices: the same 4M elements as OPTIM_SHAPES (the launchers' large config), a wide and a
# tall one (Newton-Schulz runs on CPU on whatever the workspace holds: its kernels are not run).
MUON_SHAPES = [(768, 4096), (4096, 256)]


def _muon(variant: str, dtype_name: str, amp: bool = False, **options) -> Scenario:
    """Two steps of FusedMuon over :data:`MUON_SHAPES` (one Newton-Schulz step: the matmuls are
    torch's, not rows here); as :func:`_optimizer` otherwise."""
    return _optimizer("FusedMuon", variant, dtype_name, amp=amp, shapes=MUON_SHAPES, ns_steps=1, **options)


def _loss(name: str, variant: str, forward: Callable) -> Scenario:
    """``forward()`` (returns the loss) then its backward, the launches named by phase."""

    def run(phase: Callable[[str], None]) -> None:
        phase("forward")
        loss = forward()
        phase("backward")
        loss.backward()

    return Scenario(f"{name} {variant}", variant, "loss", run)


def _cross_entropy(rows: int, vocab: int, dtype_name: str) -> Scenario:
    def forward():
        import torch

        import fusedopt

        logits = torch.zeros(rows, vocab, dtype=getattr(torch, dtype_name), requires_grad=True)
        return fusedopt.functional.cross_entropy(logits, torch.arange(rows) * 7 % vocab)

    return _loss("cross_entropy", f"{_DTYPES[dtype_name]} V={vocab}", forward)


def _pointwise(loss_name: str, numel: int) -> Scenario:
    def forward():
        import torch

        import fusedopt

        x = torch.zeros(numel, requires_grad=True)
        return getattr(fusedopt.functional, loss_name)(x, torch.ones(numel))

    return _loss(loss_name, f"{loss_name.removesuffix('_loss')} fp32 numel={numel}", forward)


def _linear_cross_entropy(rows: int, hidden: int, vocab: int, dtype_name: str, **options) -> Scenario:
    """The op's forward and backward; ``options`` (``chunk_classes``, ``softcap``) passed to it
    and named in the variant."""

    def forward():
        import torch

        import fusedopt

        dtype = getattr(torch, dtype_name)
        x = torch.zeros(rows, hidden, dtype=dtype, requires_grad=True)
        w = torch.zeros(vocab, hidden, dtype=dtype, requires_grad=True)
        target = torch.arange(rows) * 7 % vocab
        return fusedopt.functional.linear_cross_entropy(x, w, target, **options)

    named = (f"{k}={v}" for k, v in options.items())
    variant = " ".join([f"{_DTYPES[dtype_name]} H={hidden} V={vocab}", *named])
    return _loss("linear_cross_entropy", variant, forward)


def _linear_log_probs(rows: int, hidden: int, vocab: int, dtype_name: str) -> Scenario:
    """Log-probs and entropy at a temperature, back-propagated through both."""

    def forward():
        import torch

        import fusedopt

        dtype = getattr(torch, dtype_name)
        x = torch.zeros(rows, hidden, dtype=dtype, requires_grad=True)
        w = torch.zeros(vocab, hidden, dtype=dtype, requires_grad=True)
        target = torch.arange(rows) * 7 % vocab
        log_prob, entropy = fusedopt.functional.linear_log_probs(
            x, w, target, temperature=0.7, return_entropy=True
        )
        return log_prob.sum() + entropy.sum()

    return _loss("linear_log_probs", f"{_DTYPES[dtype_name]} H={hidden} V={vocab} entropy", forward)


def _linear_distillation(rows: int, hidden: int, vocab: int, dtype_name: str, **options) -> Scenario:
    """The student's head against a teacher of the same shape (its own tensors); ``options``
    of ``linear_distillation_loss`` (none's loss summed for the backward)."""

    def forward():
        import torch

        import fusedopt

        dtype = getattr(torch, dtype_name)
        x = torch.zeros(rows, hidden, dtype=dtype, requires_grad=True)
        w = torch.zeros(vocab, hidden, dtype=dtype, requires_grad=True)
        xt, wt = torch.zeros(rows, hidden, dtype=dtype), torch.zeros(vocab, hidden, dtype=dtype)
        target = torch.arange(rows) * 7 % vocab
        return fusedopt.functional.linear_distillation_loss(x, w, xt, wt, target, **options).sum()

    words = " ".join(f"{k}={v}" for k, v in options.items())
    return _loss("linear_distillation_loss", f"{_DTYPES[dtype_name]} H={hidden} V={vocab} {words}", forward)


_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

SCENARIOS: list[Scenario] = [
    _optimizer("FusedAdamW", "fp32", "float32"),
    _optimizer("FusedAdamW", "fp32 amsgrad", "float32", amsgrad=True),
    _optimizer("FusedAdamW", "bf16", "bfloat16"),
    _optimizer("FusedAdamW", "bf16 master", "bfloat16", master_weights=True),
    _optimizer("FusedAdamW", "bf16 kahan", "bfloat16", kahan_summation=True),
    _optimizer("FusedAdamW", "bf16 sr", "bfloat16", stochastic_rounding=True),
    _optimizer("FusedAdamW", "fp16", "float16"),
    _optimizer("FusedAdamW", "fp32 int8", "float32", state_dtype="int8"),
    _optimizer("FusedAdamW", "fp32 amp", "float32", amp=True),
    _optimizer("FusedAdamW", "fp32 clip", "float32", max_grad_norm=1.0),
    _optimizer("FusedAdamW", "fp32 amsgrad amp tail", "float32", amp=True, shapes=TAIL_SHAPES, amsgrad=True),
    _optimizer(
        "FusedAdamW",
        "bf16 master amp tail misaligned",
        "bfloat16",
        amp=True,
        shapes=TAIL_SHAPES,
        misaligned=True,
        master_weights=True,
    ),
    _optimizer("FusedSGD", "fp32 momentum", "float32", momentum=0.9),
    _optimizer("FusedSGD", "bf16 momentum", "bfloat16", momentum=0.9),
    _optimizer("FusedRMSprop", "fp32 centered momentum", "float32", centered=True, momentum=0.9),
    _optimizer("FusedAdagrad", "fp32", "float32"),
    _optimizer("FusedAdamax", "fp32", "float32", weight_decay=0.1),
    _optimizer("FusedRAdam", "fp32", "float32", weight_decay=0.1, decoupled_weight_decay=True),
    _optimizer("FusedNAdam", "fp32", "float32", weight_decay=0.1, decoupled_weight_decay=True),
    _optimizer("FusedAdadelta", "fp32", "float32", weight_decay=0.1),
    _optimizer("FusedRprop", "fp32", "float32"),
    _optimizer("FusedLion", "fp32", "float32", weight_decay=0.1),
    _optimizer("FusedLion", "bf16", "bfloat16"),
    _muon("fp32", "float32"),
    _muon("bf16 amp clip", "bfloat16", amp=True, max_grad_norm=1.0),
    _muon("fp32 plain momentum", "float32", nesterov=False),
    _cross_entropy(8, 50257, "bfloat16"),
    _cross_entropy(8, 128256, "bfloat16"),
    _cross_entropy(8, 50257, "float32"),
    _pointwise("mse_loss", 4097 * 3),  # odd numel
    _pointwise("mse_loss", 4096 * 3),  # a multiple of 16
    _pointwise("l1_loss", 4097 * 3),
    _pointwise("huber_loss", 4097 * 3),
    _pointwise("smooth_l1_loss", 4097 * 3),
    _linear_cross_entropy(16, 768, 50257, "bfloat16"),
    _linear_cross_entropy(16, 768, 50257, "bfloat16", chunk_classes=4096),  # the vocabulary order
    _linear_cross_entropy(16, 768, 50257, "bfloat16", softcap=30.0),  # Gemma 2's logit soft-capping
    # the forward KL (loss and gradient in 2 passes), the JSD (3), none's backward (the gradient pass alone)
    _linear_distillation(16, 768, 50257, "bfloat16", divergence="kl"),
    _linear_distillation(16, 768, 50257, "bfloat16", divergence="jsd"),
    _linear_distillation(16, 768, 50257, "bfloat16", divergence="reverse_kl", reduction="none"),
    _linear_distillation(16, 768, 50257, "float32", divergence="jsd", beta=0.3),
    _linear_log_probs(16, 768, 50257, "bfloat16"),
    _linear_log_probs(16, 768, 128256, "bfloat16"),
    _linear_log_probs(16, 768, 50257, "float32"),
]


def capture_all(scenarios: list[Scenario] = SCENARIOS) -> list[Launch]:
    """Every scenario's launches, one per distinct specialisation, named (:func:`_disambiguate`)."""
    with capture() as recorder:
        for scenario in scenarios:
            recorder.scenario = scenario.name

            def phase(name: str, variant: str = scenario.variant) -> None:
                recorder.variant = f"{variant} {name}"

            recorder.variant = scenario.variant
            scenario.run(phase if scenario.kind == "loss" else lambda name: None)
    return _disambiguate(recorder.launches)


def _disambiguate(launches: list[Launch]) -> list[Launch]:
    """Launches of one kernel in one variant with different specialisations: their variant
    names the constexprs that differ (``FIRST=True LAST=False``), else a number."""
    groups: dict[tuple[str, str], list[Launch]] = {}
    for launch in launches:
        groups.setdefault((launch.kernel, launch.variant), []).append(launch)
    for group in (g for g in groups.values() if len(g) > 1):
        keys = sorted({k for launch in group for k in launch.constexprs})
        differ = [k for k in keys if len({repr(launch.constexprs.get(k)) for launch in group}) > 1]
        for i, launch in enumerate(group, 1):
            words = " ".join(f"{k}={launch.constexprs.get(k)}" for k in differ)
            launch.variant += f" {words}" if words else f" #{i}"
    return launches


def constexprs(spec: str) -> dict:
    """The constexprs of a serialised specialisation, by parameter name (dtypes by name)."""
    data = json.loads(spec)
    names = _param_names(data)
    out = {}
    for path, value in zip(data["constant_keys"], data["constant_vals"], strict=True):
        if len(path) == 1 and path[0] < len(names):
            out[names[path[0]]] = (
                value["constexpr"] if isinstance(value, dict) and "constexpr" in value else value
            )
    return out


def _param_names(data: dict) -> list[str]:
    return list(data["signature"])


# Analysis --------------------------------------------------------------------------------------


def _jit(launch: Launch):
    obj = importlib.import_module(launch.module)
    for part in launch.name.split("."):
        obj = getattr(obj, part)
    return obj


def _with_constexpr(spec: str, name: str, value) -> str:
    data = json.loads(spec)
    index = _param_names(data).index(name)
    for i, path in enumerate(data["constant_keys"]):
        if path == [index]:
            data["constant_vals"][i] = value
    return json.dumps(data)


def _tool(name: str) -> str:
    import triton

    return getattr(triton.knobs.nvidia, name).path


def disassemble(kernel) -> tuple[Listing, dict[str, int]]:
    """The SASS facts and resource usage of a compiled kernel (``cuobjdump`` on its cubin)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        run = subprocess.run(
            [_tool("cuobjdump"), "-sass", "-res-usage", f.name], capture_output=True, text=True
        )
    if run.returncode != 0:
        raise RuntimeError(f"cuobjdump failed: {run.stderr.strip()[:400]}")
    return Listing(run.stdout), res_usage(run.stdout)


def _smallest_element(launch: Launch) -> int:
    """Bytes of the smallest element type among the kernel's data pointers and dtype constexprs
    (int64 pointer tables excluded); 4 if none is named."""
    import triton.language as tl

    data = json.loads(launch.spec)
    names = [v[1:] for v in data["signature"].values() if isinstance(v, str) and v.startswith("*")]
    names += [v for v in launch.constexprs.values() if isinstance(v, str)]
    sizes = []
    for name in names:
        try:
            dtype = tl.dtype(name)
        except (ValueError, TypeError, AssertionError, KeyError):
            continue
        if dtype.is_floating() or (dtype.is_int() and dtype.primitive_bitwidth < 64):
            sizes.append(dtype.primitive_bitwidth // 8)
    return min(sizes, default=4)


def block_constexpr(constexprs: dict) -> tuple[str | None, int | None]:
    """The launch's block constexpr (:data:`BLOCK_NAMES`) and its value."""
    for name in BLOCK_NAMES:
        value = constexprs.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return name, value
    return None, None


def analyse(launch: Launch) -> dict:
    """The row of one launch: compiled as launched and with its block doubled (halved where the
    doubled one spills or does not compile), both disassembled. A failure is the row's
    ``error``; a column that cannot be read says why in ``note``."""
    row: dict = {"scenario": launch.scenario, "kernel": launch.kernel, "variant": launch.variant}
    start = time.perf_counter()
    try:
        import triton

        row["triton"] = triton.__version__
        jit = _jit(launch)
        name, block = block_constexpr(launch.constexprs)
        with sm90_driver():
            kernel = _preload(jit, launch.spec)
            listing, usage = disassemble(kernel)
            warps, smem = kernel.metadata.num_warps, kernel.metadata.shared
            row.update(num_warps=warps, block=block, regs=usage["REG"], smem_bytes=smem)
            row["spill_bytes"] = listing.spill_bytes if usage.get("STACK") or usage.get("LOCAL") else 0
            row["ctas_per_sm"] = ctas_per_sm(usage["REG"], warps, smem)
            row["sass_before_first_load"] = listing.first_data_load()
            if block is None:
                row["note"] = "no block constexpr: per-element columns not measured"
                return row
            other, scale, why = None, 2, ""
            try:
                other, other_usage = disassemble(_preload(jit, _with_constexpr(launch.spec, name, 2 * block)))
                if other_usage.get("STACK") and not usage.get("STACK"):
                    other, why = None, "spills"  # its spills would count as per-element work
            except Exception as e:  # e.g. a static_assert on the block size: try half
                why = f"does not compile ({type(e).__name__})"
            if other is None and block < 2:
                row["note"] = f"per-element columns not measured (the doubled block {why})"
                return row
            if other is None:
                other, _ = disassemble(_preload(jit, _with_constexpr(launch.spec, name, block // 2)))
                scale = 0.5
                row["note"] = f"per-element columns from the block halved (doubled, it {why})"
        row.update(per_element(launch, listing, other, scale, warps))
    except Exception as e:  # a kernel that fails to compile: a row with its error
        row["error"] = f"{type(e).__name__}: {e}".strip().splitlines()[0][:300]
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def per_element(launch: Launch, base: Listing, other: Listing, scale: float, warps: int) -> dict:
    """``wide_access_fraction`` and ``sass_per_element`` from the listings of one launch with its
    block as launched (``base``) and times ``scale`` (``other``): what the extra (or fewer)
    elements per thread cost. Elements per thread: the block times ``ROWS`` (where the kernel
    has it) over the launch's threads; no ``sass_per_element`` below one element per thread (a
    one-program reduction over a few values) or for a tile that is not ``BLOCK`` (the matmul's
    k-step)."""
    name, block = block_constexpr(launch.constexprs)
    per_thread = block * launch.constexprs.get("ROWS", 1) / (32 * warps)
    smallest = _smallest_element(launch)

    def wide(listing: Listing, elements: float) -> int:
        # 128-bit, or 64-bit where 1-2 byte operands cannot fill 128 bits with these elements a thread
        narrow = name == "BLOCK" and elements * smallest <= 8
        return listing.accesses.get(128, 0) + (listing.accesses.get(64, 0) if narrow else 0)

    d_wide = wide(other, per_thread * scale) - wide(base, per_thread)
    d_all = sum(other.accesses.values()) - sum(base.accesses.values())
    out: dict = {"wide_access_fraction": round(d_wide / d_all, 3) if d_all else None}
    if name == "BLOCK" and per_thread >= 1:
        d_elements = per_thread * (scale - 1)
        out["sass_per_element"] = round((other.instructions - base.instructions) / d_elements, 1)
    return out


# The suite -------------------------------------------------------------------------------------


def analyse_all(launches: list[Launch], jobs: int) -> list[dict]:
    """:func:`analyse` for every launch, over ``jobs`` processes (each compile is single-threaded);
    identical specialisations once."""
    unique: dict[tuple, Launch] = {}
    for launch in launches:
        unique.setdefault((launch.module, launch.name, launch.spec), launch)
    todo = list(unique.values())
    if jobs <= 1 or len(todo) <= 1:
        results = [analyse(launch) for launch in todo]
    else:  # spawned, not forked: the parent has run torch's thread pools
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(min(jobs, len(todo)), mp_context=context) as pool:
            results = list(pool.map(analyse, todo))
    by_spec = dict(zip(unique, results, strict=True))
    rows = []
    for launch in launches:
        row = dict(by_spec[(launch.module, launch.name, launch.spec)])
        row.update(scenario=launch.scenario, kernel=launch.kernel, variant=launch.variant)
        rows.append(row)
    return rows


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def write(rows: list[dict], out: Path, seconds: float) -> list[Path]:
    """``sm90.csv`` (exactly :data:`COLUMNS`), ``sm90.md`` and ``sm90.png`` in ``out``."""
    import triton

    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "sm90.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows([[_cell(r.get(c)) for c in COLUMNS] for r in rows])
    lines = [
        f"# fusedopt: static sm_90 facts (triton {triton.__version__})",
        "",
        f"Every kernel variant the launchers launch on CUDA, compiled for sm_90 on this machine in {seconds:.0f} s "
        '(no GPU). Columns: docs/benchmarks.md, "Static sm_90 facts".',
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" if c in ("kernel", "variant", "triton") else "---:" for c in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(_cell(r.get(c)) or "-" for c in COLUMNS) + " |" for r in rows]
    notes = [r for r in rows if r.get("error") or r.get("note")]
    if notes:
        lines += ["", "## Notes", ""]
        lines += [f"- {r['kernel']} {r['variant']}: {r.get('error') or r['note']}" for r in notes]
    md = out / "sm90.md"
    md.write_text("\n".join(lines) + "\n")
    paths = [csv_path, md]
    png = plot(rows, out / "sm90.png")
    if png:
        paths.append(png)
    return paths


def plot(rows: list[dict], path: Path) -> Path | None:
    """Registers and SASS per element of each row, two bar panels (None without matplotlib)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    labels = [f"{r['kernel'].removesuffix('_kernel')} {r['variant']}" for r in rows]
    fig = Figure(figsize=(max(10.0, 0.28 * len(rows)), 11), layout="constrained")
    axes = fig.subplots(2, 1)
    for ax, key, title, limit in (
        (axes[0], "regs", "registers per thread (sm_90)", 128),
        (axes[1], "sass_per_element", "SASS instructions per element (full blocks)", None),
    ):
        values = [r.get(key) if isinstance(r.get(key), int | float) else 0 for r in rows]
        ax.bar(range(len(rows)), values)
        if limit:
            ax.axhline(limit, linestyle="--", color="gray", label=f"{limit}: 2 CTAs/SM at 8 warps")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=6)
        ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=110)
    return path


def run(out: str | Path = "fusedopt-bench", jobs: int | None = None) -> list[dict]:
    """Capture, analyse and write; the rows."""
    import triton

    start = time.perf_counter()
    jobs = jobs or min(8, os.cpu_count() or 1)
    print(
        f"sm90: triton {triton.__version__}: compiling every launched kernel variant for sm_90 ({jobs} processes)"
    )
    launches = capture_all()
    rows = analyse_all(launches, jobs)
    seconds = time.perf_counter() - start
    paths = write(rows, Path(out), seconds)
    print(Path(out, "sm90.md").read_text())
    for r in rows:
        if r.get("error"):
            print(f"sm90: {r['kernel']} {r['variant']}: {r['error']}", file=sys.stderr)
    for path in paths:
        print(f"sm90: {path}")
    print(f"sm90: {len(rows)} rows in {seconds:.1f} s")
    return rows


def run_in_child(out: str | Path, jobs: int | None = None) -> int:
    """:func:`run` in a child process without ``TRITON_INTERPRET``; its exit status."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    if root.name not in ("site-packages", "dist-packages"):  # a checkout: the child imports it too
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)
    argv = [sys.executable, "-m", "fusedopt.cli.bench_sm90", "--out", str(out)]
    if jobs:
        argv += ["--jobs", str(jobs)]
    return subprocess.run(argv, env=env).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fusedopt.cli.bench_sm90", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--out", default="fusedopt-bench", metavar="DIR", help="folder of sm90.csv, .md, .png"
    )
    parser.add_argument(
        "--jobs", type=int, metavar="N", help="compiling processes (default: CPUs, at most 8)"
    )
    args = parser.parse_args(argv)
    rows = run(args.out, args.jobs)
    return 1 if any(r.get("error") for r in rows) else 0  # every row is written all the same


if __name__ == "__main__":
    sys.exit(main())
