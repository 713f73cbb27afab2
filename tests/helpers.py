"""Shared test helpers: the one module the test files import from (never from each other or
from the fixture file, which keeps only fixtures).

* Optimizer runs: :func:`make`, :func:`grads_for`, :func:`give`, :func:`step_both`,
  :func:`sparse_grad`; the comparisons :func:`close` and :func:`check_same` (the tolerance
  contract of :mod:`fusedopt.tolerance`), :func:`snapshot` / :func:`assert_unchanged`;
  :func:`run_parity` (:func:`fusedopt.testing.compare_optimizer` on odd layouts) and
  :func:`parity_params` (its ``(case, dtype)`` parameters).
* Probes: :class:`Launches` / :func:`record_launches` (Triton kernel launches),
  :class:`CountOps` (aten ops), :class:`Graphs` and :class:`Recorder` (recording ``torch.compile``
  backends: the dynamo graphs; the fusedopt ops of the AOT forward and backward graphs),
  :func:`compile_in_child` (sm_90 compilation without a GPU).
* Small things: :func:`outcome`, :func:`roundtrip`, :func:`case_id`, :func:`kernel_name`.

The cases themselves are ``fusedopt.testing.OPTIM_CASES`` (by ``case.group``) or ad-hoc
``OptimCase(FusedX, torch.optim.X, dict(...))``.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch.utils._python_dispatch import TorchDispatchMode

import fusedopt
from fusedopt.testing import OptimCase, assert_close, compare_optimizer, odd_params
from fusedopt.tolerance import OPTIM_TOLERANCE

F32 = torch.float32
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


# Cases -----------------------------------------------------------------------------------------


def case_id(case: OptimCase) -> str:
    return case.id


KERNEL_NAMES = {
    torch.optim.SGD: "sgd",
    torch.optim.Adam: "adam",
    torch.optim.AdamW: "adam",
    torch.optim.RMSprop: "rmsprop",
    torch.optim.Adagrad: "adagrad",
    torch.optim.Adamax: "adamax",
    torch.optim.Rprop: "rprop",
    torch.optim.Adadelta: "adadelta",
    torch.optim.RAdam: "radam",
    torch.optim.NAdam: "nadam",
    fusedopt.optim.lion.Lion: "lion",
}


def kernel_name(case: OptimCase) -> str:
    """The Triton kernel ``case.fused_cls`` launches (the name :func:`record_launches` and the
    ``launches`` fixture record it by)."""
    return KERNEL_NAMES[case.torch_cls]


def parity_params(cases: list[OptimCase], dtypes: list[torch.dtype]) -> list:
    """``(case, dtype)`` parameters for :func:`run_parity`, with readable ids."""
    return [pytest.param(case, dtype, id=f"{case.id}-{dtype}") for case in cases for dtype in dtypes]


def parity_tests(group: str) -> tuple[Callable, Callable]:
    """The two parity tests of an optimizer's test file, for ``OPTIM_CASES`` of ``group``: its
    kernel (CUDA, or CPU through the interpreter) in every dtype, and its CPU path without the
    interpreter (fp32, bf16; no Triton launch there)."""
    from fusedopt.testing import OPTIM_CASES

    cases = [c for c in OPTIM_CASES if c.group == group]

    @pytest.mark.parametrize(("case", "dtype"), parity_params(cases, DTYPES))
    def test_matches_torch(case, dtype, device):
        run_parity(case, device, dtype)

    @pytest.mark.parametrize(("case", "dtype"), parity_params(cases, [torch.float32, torch.bfloat16]))
    def test_cpu_path_matches_torch(case, dtype, plain_cpu, launches):
        run_parity(case, "cpu", dtype)
        assert not launches, "no Triton kernel on this path"

    return test_matches_torch, test_cpu_path_matches_torch


def run_parity(case: OptimCase, device: str, dtype: torch.dtype, steps: int = 7) -> None:
    """``steps`` steps of ``case`` beside torch on odd layouts (0-d, empty, strided, ...): every
    param and state tensor within the tolerance contract, state keys and ``step`` exact."""
    result = compare_optimizer(case, odd_params(device, dtype), steps=steps)
    assert result.verdict == "PASS", result.explain()


# Params, grads, steps --------------------------------------------------------------------------


def for_device(kwargs: dict, device) -> dict:
    """An optimizer's kwargs for ``device``: without ``capturable`` on CPU, where torch (and
    fusedopt) refuse it (the algorithm is the same)."""
    if torch.device(device).type == "cpu":
        return {k: v for k, v in kwargs.items() if k != "capturable"}
    return kwargs


def make(device, specs=((3, 4), (5,), ()), seed=0, requires_grad=True) -> list[torch.Tensor]:
    """Leaf params; ``specs`` are shapes or (shape, dtype) pairs (default dtype fp32)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for spec in specs:
        shape, dtype = spec if len(spec) == 2 and isinstance(spec[1], torch.dtype) else (spec, F32)
        if dtype.is_floating_point or dtype.is_complex:
            t = torch.randn(shape, generator=gen, dtype=torch.complex64 if dtype.is_complex else F32)
        else:
            t = torch.randint(-5, 5, shape, generator=gen)
        t = t.to(device=device, dtype=dtype)
        out.append(t.requires_grad_(requires_grad and (t.is_floating_point() or t.is_complex())))
    return out


def grads_for(params, step: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * seed + step)
    out = []
    for p in params:
        if p.is_floating_point() or p.is_complex():
            g = torch.randn(p.shape, generator=gen, dtype=torch.complex64 if p.is_complex() else F32)
        else:
            g = torch.randint(-3, 4, p.shape, generator=gen)
        out.append(g.to(device=p.device, dtype=p.dtype))
    return out


def give(params, grads) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = None if g is None else g.clone().to(p.dtype)


def step_both(opt, ref, ours, theirs, step: int, mask=None) -> None:
    """Same fresh grads to both param lists (``mask[i]`` False: no grad), then step both."""
    grads = grads_for(ours, step)
    if mask is not None:
        grads = [g if m else None for g, m in zip(grads, mask, strict=True)]
    give(ours, grads)
    give(theirs, grads)
    opt.step()
    ref.step()


def sparse_grad(p: torch.Tensor, seed: int) -> torch.Tensor:
    """Uncoalesced COO grad for a 2-d param: some rows, one repeated."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.tensor([[0, 2, 2, p.shape[0] - 1]])
    values = torch.randn(4, p.shape[1], generator=gen)
    return torch.sparse_coo_tensor(rows, values, p.shape, check_invariants=True).to(
        device=p.device, dtype=p.dtype
    )


# Comparisons -----------------------------------------------------------------------------------


def close(actual, expected, what: str) -> None:
    """Same dtype; integers equal, floats (complex: both parts) within the optimizer contract."""
    actual, expected = actual.detach(), expected.detach()
    if actual.is_sparse:
        actual = actual.to_dense()
    if expected.is_sparse:
        expected = expected.to_dense()
    assert actual.dtype == expected.dtype, what
    if actual.is_complex():
        actual, expected = torch.view_as_real(actual), torch.view_as_real(expected)
    if not actual.is_floating_point():
        assert torch.equal(actual.cpu(), expected.cpu()), what
    else:
        assert_close(actual, expected, what, OPTIM_TOLERANCE)


def check_same(opt, ref, ours, theirs) -> None:
    """Params and every state entry of ``opt`` equal ``ref``'s (same keys, dtypes, values)."""
    for i, (p, q) in enumerate(zip(ours, theirs, strict=True)):
        close(p, q, f"param {i}")
        if q not in ref.state:
            assert p not in opt.state, f"param {i} got state torch does not create"
            continue
        mine, expected = opt.state[p], ref.state[q]
        assert mine.keys() == expected.keys(), f"state keys of param {i}"
        for key, v in expected.items():
            if key == "step":
                assert float(mine[key]) == float(v), f"step of param {i}"
            else:
                close(mine[key], v, f"state[{key}] of param {i}")


def snapshot(opt, params):
    return [
        (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()} if p in opt.state else None)
        for p in params
    ]


def assert_unchanged(snap, opt, params) -> None:
    for i, ((p0, s0), p) in enumerate(zip(snap, params, strict=True)):
        assert torch.equal(p.detach(), p0), f"param {i} changed"
        if s0 is None:
            assert p not in opt.state or not opt.state[p], f"param {i} got state"
            continue
        assert opt.state[p].keys() == s0.keys(), f"state keys of param {i} changed"
        for k, v in s0.items():
            assert torch.equal(opt.state[p][k], v), f"state[{k}] of param {i} changed"


def outcome(fn):
    """(exception type, message) raised by ``fn``, or None."""
    try:
        fn()
    except Exception as e:
        return type(e), str(e)
    return None


def roundtrip(state_dict):
    """Save and load, as a checkpoint would (no tensor shared with the source optimizer)."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# Probes ----------------------------------------------------------------------------------------


class Launches(list):
    """Every launch of the recorded Triton kernels in a test, as ``(name, args, kwargs)``."""

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name, _, _ in self:
            out[name] = out.get(name, 0) + 1
        return out


def record_launches(monkeypatch, kernels: dict) -> Launches:
    """Record every launch of ``kernels`` (name -> Triton kernel, or ``(kernel, update)`` for the
    optimizer kernel launched with that ``UPDATE``) for the test's duration:
    ``kernel[grid](...)`` calls ``kernel.run``, which is wrapped."""
    record = Launches()
    named: dict[int, tuple] = {}  # id(kernel) -> (kernel, [(name, update or None)])
    for name, entry in kernels.items():
        kernel, update = entry if isinstance(entry, tuple) else (entry, None)
        named.setdefault(id(kernel), (kernel, []))[1].append((name, update))
    for kernel, names in named.values():

        def run(*args, _run=kernel.run, _names=names, **kwargs):
            for name, update in _names:
                if update is None or kwargs.get("UPDATE") is update:
                    record.append((name, args, kwargs))
                    break
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", run)
    return record


def optimizer_kernels() -> dict:
    """The optimizer kernel, named by each algorithm's update, for :func:`record_launches`."""
    from fusedopt.kernels import adadelta, adagrad, adam, adamax, lion, nadam, radam, rmsprop, rprop, sgd
    from fusedopt.kernels.optimizer import optimizer_kernel

    modules = (adam, sgd, rmsprop, adagrad, lion, adamax, radam, nadam, adadelta, rprop)
    return {m.__name__.rsplit(".", 1)[1]: (optimizer_kernel, m.update) for m in modules}


class CountOps(TorchDispatchMode):
    """Counts every aten op (each one a kernel launch on a device) run inside the block."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class Recorder:
    """A torch.compile backend: ``aot_eager`` that keeps the fusedopt ops of each graph."""

    def __init__(self):
        self.graphs: list[frozenset[str]] = []  # forward first, then backward
        self.backend = aot_autograd(fw_compiler=self._compile, bw_compiler=self._compile)

    def _compile(self, gm: torch.fx.GraphModule, example_inputs) -> Callable:
        targets = (n.target for n in gm.graph.nodes if n.op == "call_function")
        self.graphs.append(
            frozenset(
                t.name()
                for t in targets
                if isinstance(t, torch._ops.OpOverload) and t.namespace == "fusedopt"
            )
        )
        return make_boxed_func(gm.forward)


class Graphs(list):
    """A torch.compile backend that records each graph it compiles and runs it with aot_eager
    (functionalization included, the part that must keep our in-place ops in place)."""

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        from torch._dynamo.backends.registry import lookup_backend

        self.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    def targets(self) -> set[str]:
        return {str(n.target) for gm in self for n in gm.graph.nodes if n.op == "call_function"}


def compile_in_child(child: str, variants: list, timeout: int = 900) -> list[dict]:
    """Compile kernels for an H100 (sm_90) without a GPU, in a child process.

    The tests run under ``TRITON_INTERPRET=1``, where kernels are interpreted functions; the
    child runs without it. ``child`` is a script that reads the JSON list of variants on stdin
    and prints one JSON list of ``{"ok", "vector_loads", "error"}`` results as its
    last line.
    """
    pytest.importorskip("triton.backends.nvidia", reason="triton without its NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    run = subprocess.run(
        [sys.executable, "-c", child],
        input=json.dumps(variants),  # on stdin: one argv string is limited to 128 KiB
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


_COMPILER = r"""
import json, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from fusedopt.kernels import MODULE as k

T = {"fp32": tl.float32, "fp64": tl.float64, "bf16": tl.bfloat16, "fp16": tl.float16}
out = []
for name, signature, constexprs, aligned in json.load(sys.stdin):
    kernel = getattr(k, name)
    constexprs = {key: T.get(value, value) if isinstance(value, str) else value for key, value in constexprs.items()}
    # the launcher's 16-divisibility specialization of pointers, sizes and strides
    attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    try:
        source = triton.compiler.ASTSource(fn=kernel, signature=dict(signature, **dict.fromkeys(constexprs, "constexpr")),
                                           constexprs=constexprs, attrs=attrs)
        ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ptx"]
        out.append({"ok": ".visible .entry" in ptx, "vector_loads": ptx.count("ld.global.v"), "error": ""})
    except Exception as e:
        out.append({"ok": False, "vector_loads": 0, "error": f"{type(e).__name__}: {e}"[:2000]})
print(json.dumps(out))
"""


def kernels_compiler(module: str) -> str:
    """The child script of :func:`compile_in_child` for the kernels of
    ``fusedopt.kernels.<module>``: each variant ``[kernel name, signature, constexprs, aligned]``
    (dtype constexprs as ``"fp32"``...; ``aligned``: the arguments the launcher's 16-divisibility
    specialization marks) compiled for sm_90 at 8 warps."""
    return _COMPILER.replace("MODULE", module)


class PeakMemory(TorchDispatchMode):
    """Bytes of the storages created by ops inside the block that are alive at once: the peak
    and the largest single storage. A storage counts from the op that created it until Python
    frees it (a finalizer on the storage object, which torch keeps unique per storage)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.largest = 0
        self.seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in out if isinstance(out, tuple | list) else [out]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self.seen or key in inputs or storage.nbytes() == 0:  # views, in-place ops
                continue
            self.seen.add(key)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            self.largest = max(self.largest, storage.nbytes())
            weakref.finalize(storage, self._free, key, storage.nbytes())
        return out
