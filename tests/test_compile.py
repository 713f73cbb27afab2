"""Compile the kernels for an H100 (sm_90) without a GPU: catches what the interpreter
accepts but the compiler refuses, and checks that full blocks use vector memory accesses.

The tests run under ``TRITON_INTERPRET=1`` (kernels are then interpreted functions), so the
compilation happens in a child process without it.
"""

from __future__ import annotations

import pytest
from helpers import compile_in_child

import fusedopt  # noqa: F401  (registers the algorithms)
from fusedopt.optim._step import ALGORITHMS

pytest.importorskip("triton.backends.nvidia", reason="triton without its NVIDIA backend")

DTYPES = ["float32", "bfloat16", "float16", "float64"]

CHILD = r"""
import json, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from fusedopt.kernels import (adadelta, adagrad, adam, adamax, clip, linear_cross_entropy, lion, losses, nadam, optimizer,
                              radam, rmsprop, rprop, sgd)

UPDATES = {m.__name__.rsplit(".", 1)[1]: m.update for m in (adam, sgd, rmsprop, adagrad, adamax, radam, nadam, adadelta, rprop, lion)}
KERNELS = {"optimizer": optimizer.optimizer_kernel, "pointwise_loss": losses.pointwise_loss_kernel,
           "sum_rows": losses.sum_rows_kernel, "pointwise_loss_backward": losses.pointwise_loss_backward_kernel,
           "scale_grad": losses.scale_grad_kernel, "norm_partials": clip.norm_partials_kernel,
           "norm_finish": clip.norm_finish_kernel, "scale": clip.scale_kernel,
           "matmul_accumulate": linear_cross_entropy.matmul_accumulate_kernel,
           "logsumexp_block": linear_cross_entropy.logsumexp_block_kernel}
out = []
for name, signature, constexprs in json.load(sys.stdin):
    constexprs = {k: getattr(tl, v[3:]) if isinstance(v, str) and v.startswith("tl.") else v
                  for k, v in constexprs.items()}
    if "UPDATE" in constexprs:
        constexprs["UPDATE"] = UPDATES[constexprs["UPDATE"]]
    signature = dict(signature, **dict.fromkeys(constexprs, "constexpr"))
    try:
        source = triton.compiler.ASTSource(fn=KERNELS[name], signature=signature, constexprs=constexprs)
        ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ptx"]
        out.append({"ok": ".visible .entry" in ptx, "vector_loads": ptx.count("ld.global.v"), "error": ""})
    except Exception as e:
        out.append({"ok": False, "vector_loads": 0, "error": f"{type(e).__name__}: {e}"[:2000]})
print(json.dumps(out))
"""

TABLES = {"ptrs": "*i64", "grad_ptrs": "*i64", "meta": "*i64", "owner": "*i32", "scalars": "*fp64"}
AMP = {"grad_scale": "*fp32", "found_inf": "*fp32", "clip_coef": "*fp32"}
STATE = {"seeds": "*i64", "absmax_ptrs": "*i64", "codebook": "*fp32"}
# Low-precision storage (fusedopt.optim._precision): (param dtype, state dtype, MODE, SR, Q8).
PRECISION = [
    ("bfloat16", "float32", 1, False, False),  # master weights
    ("float16", "float16", 2, False, False),  # Kahan summation
    ("bfloat16", "bfloat16", 0, True, False),  # stochastic rounding
    ("float16", "float16", 0, True, False),
    ("float32", "bfloat16", 0, True, False),  # bf16 state of fp32 params
    ("float32", "float32", 0, False, True),  # 8-bit state (state_dtype="int8")
    ("bfloat16", "float32", 1, False, True),  # 8-bit state with master weights
    ("bfloat16", "float32", 0, True, True),  # 8-bit state, stochastically rounded bf16 params
    ("float16", "float32", 2, False, True),  # 8-bit state with Kahan summation
]
PTR = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16", "float64": "*fp64"}


def _optimizer_variants(name: str) -> list:
    """The optimizer kernel with this algorithm's update: all flags off, all on, and each one
    alone, for every dtype, with and without a tail; plus launches with a misaligned tensor."""
    spec = ALGORITHMS[name]
    flags = spec.kernels.FLAGS
    sets = [dict.fromkeys(flags, False), dict.fromkeys(flags, True)]
    sets += [dict(dict.fromkeys(flags, False), **{f: True}) for f in flags]

    def variant(dtype, chosen, aligned, state=None, mode=0, sr=False, q8=False, tail=True, block=4096):
        compute = "float64" if dtype == "float64" else "float32"
        algorithm = dict(spec.constexprs(chosen), UPDATE=name)
        amp = dict(
            HAS_GRAD_SCALE=chosen is sets[1], HAS_FOUND_INF=chosen is sets[1], HAS_CLIP=chosen is sets[1]
        )
        constexprs = dict(algorithm, DTYPE=f"tl.{dtype}", SDTYPE=f"tl.{state or dtype}", COMPUTE=f"tl.{compute}",
                          MODE=mode, SR=sr, Q8=q8, BLOCK=block, TAIL=tail, ALIGNED=aligned,
                          TAIL_BLOCK=min(block, 1024), **amp)  # fmt: skip
        signature = dict(TABLES, prepared=PTR[compute], steps="*fp32", **STATE, **AMP)
        return ["optimizer", signature, constexprs]

    out = [variant(dtype, chosen, True) for dtype in DTYPES for chosen in sets]
    out.append(variant("float32", sets[0], False))
    out.append(variant("float32", sets[1], True, tail=False))
    out += [variant(d, sets[1], True, *rest) for d, *rest in PRECISION]
    # 8-bit state with every flag off, misaligned (the 1024-element blocks of smaller launches).
    out.append(variant("float32", sets[0], False, q8=True, block=1024))
    return out


def _few(variant: list) -> bool:
    """An optimizer variant with every flag on (its AMP too), or with 8-bit state."""
    constexprs = variant[2]
    return (constexprs["HAS_CLIP"] and constexprs["MODE"] == 0 and not constexprs["SR"]) or constexprs["Q8"]


def _clip_variants() -> list:
    """Every norm order and dtype; the grad scale on and off; aligned and not."""
    out = []
    orders = [(0, 2.0), (1, 1.0), (2, 1.0), (3, 3.5)]
    for dtype in DTYPES:
        compute = "tl.float64" if dtype == "float64" else "tl.float32"
        partials = "*fp64" if dtype == "float64" else "*fp32"
        tables = dict(grad_ptrs="*i64", meta="*i64", owner="*i32")
        for (order, p), aligned in zip(orders, [True, False, True, True], strict=True):
            signature = dict(tables, partials=partials, grad_scale="*fp32")
            constexprs = dict(G=2, DTYPE=f"tl.{dtype}", COMPUTE=compute, BLOCK=4096, ORD=order, P=p,
                              HAS_GRAD_SCALE=order == 0, ALIGNED=aligned)  # fmt: skip
            out.append(["norm_partials", signature, constexprs])
            signature = dict(partials=partials, out=PTR[dtype], N="i32")
            constexprs = dict(OUT_DTYPE=f"tl.{dtype}", COMPUTE=compute, BLOCK=1024, ORD=order, P=p)
            out.append(["norm_finish", signature, constexprs])
        constexprs = dict(G=1, DTYPE=f"tl.{dtype}", COMPUTE=compute, BLOCK=4096, ALIGNED=True)
        out.append(["scale", dict(tables, coef="*fp32"), constexprs])
    return out


def _loss_variants() -> list:
    out = []
    for dtype in DTYPES:
        ptr = "*" + {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}[dtype]
        compute = "tl.float64" if dtype == "float64" else "tl.float32"
        cptr = "*fp64" if dtype == "float64" else "*fp32"
        for loss in range(5):
            for reduce, grad, weight in [(True, True, False), (True, False, True), (False, False, True)]:
                signature = dict(
                    x_ptr=ptr, y_ptr=ptr, w_ptr=ptr, out_ptr=ptr, partial_ptr=cptr, grad_ptr=ptr,
                    scalars="*fp64", K="i64", P="i32", ITEMS="i64",
                )  # fmt: skip
                constexprs = dict(
                    LOSS=loss, COMPUTE=compute, BLOCK=1024, TAIL_BLOCK=512, HAS_WEIGHT=weight, REDUCE=reduce, WRITE_GRAD=grad,
                    ONE_ROW=not weight,
                )  # fmt: skip
                out.append(["pointwise_loss", signature, constexprs])
            if loss:
                signature = dict(
                    x_ptr=ptr,
                    y_ptr=ptr,
                    w_ptr=ptr,
                    grad_output_ptr=ptr,
                    grad_ptr=ptr,
                    scalars="*fp64",
                    N="i64",
                    go_stride="i32",
                )
                constexprs = dict(LOSS=loss, COMPUTE=compute, BLOCK=1024, TAIL_BLOCK=512, HAS_WEIGHT=True)
                out.append(["pointwise_loss_backward", signature, constexprs])
        out.append(
            [
                "sum_rows",
                dict(partial_ptr=cptr, out_ptr=ptr, scalars="*fp64", M="i64", P="i32"),
                dict(COMPUTE=compute, BLOCK=1024),
            ]
        )
        out.append(
            [
                "scale_grad",
                dict(grad_ptr=ptr, grad_output_ptr=ptr, N="i64"),
                dict(COMPUTE=compute, BLOCK=1024, TAIL_BLOCK=512),
            ]
        )
    return out


def _matmul_variants() -> list:
    """The fp32 accumulation of a linear cross-entropy's weight gradient: bf16 and fp16
    operands (tensor-core dots), the launcher's block sizes, a transposed first operand."""
    out = []
    for dtype in ("bf16", "fp16"):
        signature = dict(acc="*fp32", a=f"*{dtype}", b=f"*{dtype}", M="i32", N="i32", K="i32", M_READ="i32", K_READ="i32",
                         stride_cm="i32", stride_cn="i32", stride_am="i32", stride_ak="i32",
                         stride_bk="i32", stride_bn="i32")  # fmt: skip
        constexprs = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, UPCAST=False)
        out.append(["matmul_accumulate", signature, constexprs])
    # The vocabulary order's log-sum-exp over a window of classes: first, middle and last windows,
    # with and without class weights and smoothing, every logits dtype.
    for i, (dtype, compute) in enumerate(
        [("bf16", "fp32"), ("fp16", "fp32"), ("fp32", "fp32"), ("fp64", "fp64")]
    ):
        signature = dict(logits=f"*{dtype}", target="*i64", weight=f"*{dtype}", stats=f"*{compute}",
                         state=f"*{compute}", lse=f"*{compute}", loss=f"*{compute}", R="i32", C="i32",
                         col0="i64", K="i32", stride_x="i32", stride_t="i32", ignore_index="i64",
                         label_smoothing="fp64", z_loss="fp64", softcap="fp64")  # fmt: skip
        for first, last in [(True, False), (False, False), (False, True), (True, True)]:
            constexprs = dict(DTYPE=f"tl.{TL_NAMES[dtype]}", COMPUTE=f"tl.{TL_NAMES[compute]}",
                              LOSS_DTYPE=f"tl.{TL_NAMES[compute]}", ROWS=1, BLOCK=4096, HAS_WEIGHT=i % 2 == 0,
                              SMOOTHING=last, FIRST=first, LAST=last, Z_LOSS=last,
                              SOFTCAP=not first)  # fmt: skip
            out.append(["logsumexp_block", signature, constexprs])
    return out


TL_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}


VARIANTS = (
    _optimizer_variants("adam")
    + _optimizer_variants("sgd")
    + _optimizer_variants("rmsprop")
    + _optimizer_variants("adagrad")
    # issue 22's: every flag on in every dtype, with 8-bit state, misaligned (their updates only)
    + [
        v
        for name in ("adamax", "radam", "nadam", "adadelta", "rprop", "lion")
        for v in _optimizer_variants(name)
        if _few(v)
    ]
    + _loss_variants()
    + _clip_variants()
    + _matmul_variants()
)


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    return compile_in_child(CHILD, VARIANTS)


@pytest.mark.parametrize("index", range(len(VARIANTS)), ids=lambda i: f"{VARIANTS[i][0]}-{i}")
def test_kernel_compiles_for_sm90(compiled, index):
    result = compiled[index]
    assert result["ok"], f"{VARIANTS[index]}: {result['error']}"


def test_full_blocks_use_vector_accesses_only_when_aligned(compiled):
    """The norm kernels vectorize when the launch vouches for every address; the optimizer
    kernel always has its vector path (taken per tensor when the launch does not vouch)."""
    for variant, result in zip(VARIANTS, compiled, strict=True):
        if variant[0] in ("norm_partials", "scale"):
            assert (result["vector_loads"] > 0) is variant[2]["ALIGNED"], variant
        elif variant[0] == "optimizer":
            assert result["vector_loads"] > 0, variant
