"""Compile the kernels for an H100 (sm_90) without a GPU: catches what the interpreter
accepts but the compiler refuses, and checks that full blocks use vector memory accesses.

The tests run under ``TRITON_INTERPRET=1`` (kernels are then interpreted functions), so the
compilation happens in a child process without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia", reason="triton without its NVIDIA backend")

ADAM_FLAGS = ["AMSGRAD", "MAXIMIZE", "DECOUPLED", "HAS_WD", "HAS_GRAD_SCALE", "HAS_FOUND_INF"]
SGD_FLAGS = ["HAS_MOMENTUM", "NESTEROV", "MAXIMIZE", "HAS_WD", "HAS_GRAD_SCALE", "HAS_FOUND_INF"]
DTYPES = ["float32", "bfloat16", "float16", "float64"]

CHILD = r"""
import json, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from fusedopt.kernels import adam, sgd

POINTERS = {"ptrs": "*i64", "grad_ptrs": "*i64", "meta": "*i64", "owner": "*i32",
            "scalars": "*fp64", "grad_scale": "*fp32", "found_inf": "*fp32"}
out = []
for name, dtype, flags, aligned in json.loads(sys.argv[1]):
    kernel = {"adam": adam.adam_kernel, "sgd": sgd.sgd_kernel}[name]
    dt = getattr(tl, dtype)
    constexprs = dict(DTYPE=dt, COMPUTE=tl.float64 if dtype == "float64" else tl.float32,
                      BLOCK=4096, ALIGNED=aligned, **flags)
    signature = dict(POINTERS, **dict.fromkeys(constexprs, "constexpr"))
    try:
        source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ptx"]
        out.append({"ok": ".visible .entry" in ptx, "vector_loads": ptx.count("ld.global.v"), "error": ""})
    except Exception as e:
        out.append({"ok": False, "vector_loads": 0, "error": f"{type(e).__name__}: {e}"[:2000]})
print(json.dumps(out))
"""


def _variants(name: str, flags: list[str]) -> list:
    """All flags off, all on, and each one alone, for every dtype; plus an unaligned launch."""
    sets = [dict.fromkeys(flags, False), dict.fromkeys(flags, True)]
    sets += [dict(dict.fromkeys(flags, False), **{f: True}) for f in flags]
    out = [[name, dtype, chosen, True] for dtype in DTYPES for chosen in sets]
    out.append([name, "float32", dict.fromkeys(flags, False), False])
    return out


VARIANTS = _variants("adam", ADAM_FLAGS) + _variants("sgd", SGD_FLAGS)


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    run = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(VARIANTS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "index", range(len(VARIANTS)), ids=lambda i: "-".join(map(str, VARIANTS[i][:2])) + f"-{i}"
)
def test_kernel_compiles_for_sm90(compiled, index):
    result = compiled[index]
    assert result["ok"], f"{VARIANTS[index]}: {result['error']}"


def test_full_blocks_use_vector_accesses_only_when_aligned(compiled):
    for variant, result in zip(VARIANTS, compiled, strict=True):
        aligned = variant[3]
        assert (result["vector_loads"] > 0) is aligned, variant
