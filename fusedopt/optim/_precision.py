"""Low-precision training options of every fused optimizer (our extensions, keyword-only):
``master_weights``, ``kahan_summation``, ``stochastic_rounding`` and ``state_dtype``.

Each changes what the step kernel loads and stores, never the number of passes
(``fusedopt.kernels.common``: ``load_param`` / ``store_param`` / ``store_rounded``):

* ``master_weights``: a bf16/fp16 param keeps an fp32 copy (state ``"master_weight"``) in the
  table's last column; the kernel updates the copy and writes the param as its rounding.
* ``kahan_summation``: a bf16/fp16 param keeps a compensation in its own dtype
  (``"kahan_compensation"``): the kernel steps ``param + compensation`` and stores the rounding
  error as the next compensation.
* ``stochastic_rounding``: low-precision stores (bf16/fp16 params, and state stored in bf16/fp16)
  round up or down at random, unbiased; the bits come from Philox keyed by the param's
  ``"rounding_seed"`` (drawn from torch's generator when the state is created, advanced on the
  device every step: reproducible after ``torch.manual_seed``, resumable from a checkpoint).
* ``state_dtype``: the storage dtype of the algorithm's state (None: the param's dtype, or fp32
  with ``master_weights``); the math stays fp32.
* ``state_dtype="int8"``: blockwise 8-bit state (:mod:`fusedopt.optim._quantize`): each state
  tensor of a param with at least 4,096 elements (``_quantize.MIN_NUMEL``) is kept as ``uint8``
  codes under torch's key (``"exp_avg"``: the param's shape) and one fp32 absmax per 256
  elements under ``key + "_absmax"`` (``"exp_avg_absmax"``: ``ceil(numel / 256)``); smaller and
  complex params keep fp32 state. The kernel dequantizes on load and requantizes on store, in
  the same pass and launch (a per-tensor branch); the plain-torch step does the same on fp32
  copies. 8-bit codes are rounded to nearest even with ``stochastic_rounding`` (which then rounds
  the bf16/fp16 params only). A DTensor param's blocks are its local shard's: its codes are a
  DTensor placed as the param, its absmax a plain tensor, and ``state_dict()`` holds its state
  dequantized (:func:`portable`), which checkpoints save and reshard.

fp32 and fp64 params have no low bits to lose: ``master_weights``, ``kahan_summation`` and their
stochastic rounding do nothing for them (``state_dtype`` applies to fp32 params too; fp64 params
keep fp64 state, also with ``"int8"``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from fusedopt._dist import is_dtensor, local
from fusedopt.kernels import common as kernels
from fusedopt.optim._quantize import (
    MIN_NUMEL,
    QBLOCK,
    SUFFIX,
    absmax_key,
    codes_stride,
    dequantize,
    quantize,
    quantize_,
)

LOW = (torch.bfloat16, torch.float16)
MASTER = "master_weight"
KAHAN = "kahan_compensation"
SEED = "rounding_seed"
EXTRA_KEYS = (MASTER, KAHAN, SEED)  # and the absmax of 8-bit state: see ours()
STATE_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16, "int8")
QUANTIZED = (torch.float32, torch.bfloat16, torch.float16)  # param dtypes whose state may be 8-bit


def ours(key: str) -> bool:
    """Whether a state key is one of our extensions (torch's classes have no such key)."""
    return key in EXTRA_KEYS or key.endswith(SUFFIX)


@dataclass(frozen=True)
class Precision:
    """The options of one optimizer, validated; what they mean for params of a given dtype."""

    master_weights: bool = False
    kahan_summation: bool = False
    stochastic_rounding: bool = False
    state_dtype: torch.dtype | str | None = None

    def __post_init__(self):
        chosen = [
            name
            for name in ("master_weights", "kahan_summation", "stochastic_rounding")
            if getattr(self, name)
        ]
        if len(chosen) > 1:
            raise ValueError(
                f"{' and '.join(chosen)} are alternative ways to keep the low bits of a bf16/fp16 "
                "param's updates (an fp32 copy, a compensation buffer, unbiased rounding): choose one"
            )
        if self.state_dtype not in STATE_DTYPES:
            raise ValueError(
                f"Invalid state_dtype: {self.state_dtype!r} (None, torch.float32, torch.bfloat16, "
                "torch.float16 or 'int8')"
            )

    @property
    def active(self) -> bool:
        return self != Precision()

    def mode(self, dtype: torch.dtype) -> int:
        if dtype in LOW and self.master_weights:
            return kernels.MODE_MASTER.value
        if dtype in LOW and self.kahan_summation:
            return kernels.MODE_KAHAN.value
        return kernels.MODE_PLAIN.value

    @property
    def quantized(self) -> bool:
        """Blockwise 8-bit state (``state_dtype="int8"``)."""
        return self.state_dtype == "int8"

    def quantizes(self, dtype: torch.dtype) -> bool:
        """Whether a launch over params of ``dtype`` may hold 8-bit state (the kernels' Q8)."""
        return self.quantized and dtype in QUANTIZED

    def quantizes_param(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s state is 8-bit: a float param of at least MIN_NUMEL elements."""
        return self.quantizes(p.dtype) and p.numel() >= MIN_NUMEL

    def state_dtype_for(self, dtype: torch.dtype) -> torch.dtype:
        """The storage dtype of the state of params of ``dtype`` (8-bit: of the fp32 state of
        small params, and the dtype the kernels compute 8-bit state in)."""
        if dtype == torch.float64 or not dtype.is_floating_point:
            return dtype
        if self.quantized:
            return torch.float32
        if self.state_dtype is not None:
            return self.state_dtype
        return torch.float32 if self.mode(dtype) == kernels.MODE_MASTER.value else dtype

    def rounds_stochastically(self, dtype: torch.dtype) -> bool:
        return self.stochastic_rounding and (dtype in LOW or self.state_dtype_for(dtype) in LOW)

    def affects(self, dtype: torch.dtype) -> bool:
        """Whether a step over params of ``dtype`` loads or stores anything differently (fp64
        params, and fp32 ones with master weights or Kahan summation, step as without)."""
        return (
            self.mode(dtype) != kernels.MODE_PLAIN.value
            or self.rounds_stochastically(dtype)
            or self.state_dtype_for(dtype) != dtype
            or self.quantizes(dtype)
        )

    def needs_state(self, dtype: torch.dtype) -> bool:
        """Whether params of ``dtype`` keep state of ours (even where the algorithm keeps none)."""
        return self.mode(dtype) != kernels.MODE_PLAIN.value or self.rounds_stochastically(dtype)

    def aux_key(self, dtype: torch.dtype) -> str | None:
        """The state key of the table's precision column for params of ``dtype``, if any."""
        return {kernels.MODE_MASTER.value: MASTER, kernels.MODE_KAHAN.value: KAHAN}.get(self.mode(dtype))

    def complete(self, p: torch.Tensor, state: dict, algorithm) -> None:
        """Bring a param's state to these options: the algorithm's state (``algorithm``: an
        ``fusedopt.optim._step.Algorithm``) in its storage dtype or 8-bit (a torch-format state
        dict loads converted, 8-bit state into other options dequantized), and the extension
        entries (a master from the param, a zero compensation, a seed from torch's generator)
        where they are absent or unusable: a master that is not fp32 of the param's shape, or no
        longer rounds to the param (e.g. cast to bf16 by torch's ``load_state_dict``, or left
        behind while torch stepped the param), is re-seeded from the param. State tensors that
        are not the param's shape are left as they are: the step refuses them, as torch's does."""
        wanted = self.state_dtype_for(p.dtype)
        eight = self.quantizes_param(p)
        for key, signed in zip(algorithm.columns, algorithm.signed, strict=True):
            v = state.get(key)
            if not isinstance(v, torch.Tensor) or v.shape != p.shape:
                continue
            scale = absmax_key(key)
            if scale in state:
                codes, absmax = _codes(v), state[scale]
                if codes is None or not _absmax_of(absmax, p):
                    continue  # not 8-bit state of this param: the step refuses it
                absmax = absmax.to(local(codes).device, torch.float32)
                if eight and local(codes).stride() == codes_stride(local(p)) and codes.device == p.device:
                    state[key], state[scale] = codes, absmax
                    continue
                del state[scale]
                v = dequantize(codes, absmax, signed)
            if eight:
                state[key], state[scale] = quantize(v, p, signed)
            else:
                state[key] = v.to(wanted) if v.is_floating_point() else v
        aux = self.aux_key(p.dtype)
        if aux == MASTER and not _master_of(state.get(MASTER), p):
            state[MASTER] = p.detach().to(torch.float32, copy=True)
        if aux == KAHAN and not _like_param(state.get(KAHAN), p, p.dtype):
            state[KAHAN] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if self.rounds_stochastically(p.dtype):
            seed = state.get(SEED)
            device = local(p).device
            if not (
                isinstance(seed, torch.Tensor) and seed.dtype == torch.int64 and seed.shape == ()
                and seed.device == device
            ):  # fmt: skip
                if isinstance(seed, torch.Tensor) and seed.numel() == 1 and seed.isfinite().all():
                    seed = torch.tensor(int(seed.item()), dtype=torch.int64)  # cast by torch's load
                else:
                    seed = torch.randint(0, 2**62, (), dtype=torch.int64)  # torch's default generator
                state[SEED] = seed.to(device)

    def constexprs(self, dtype: torch.dtype) -> dict:
        from fusedopt._multi_tensor import TL_DTYPE

        return {
            "SDTYPE": TL_DTYPE[self.state_dtype_for(dtype)],
            "MODE": self.mode(dtype),
            "SR": self.rounds_stochastically(dtype),
            "Q8": self.quantizes(dtype),
        }


PLAIN = Precision()


def _like_param(t, p: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``t`` is a tensor of ``dtype`` with ``p``'s shape, on its device."""
    return (
        isinstance(t, torch.Tensor)
        and t.dtype == dtype
        and t.shape == p.shape
        and local(t).shape == local(p).shape
        and local(t).device == local(p).device
    )


def _master_of(master, p: torch.Tensor) -> bool:
    """Whether ``master`` is an fp32 master weight of ``p``: ``p`` is its rounding (a pass over
    the param, made when a plan is built or a state dict loaded, never per step)."""
    return _like_param(master, p, torch.float32) and torch.equal(local(master).to(p.dtype), local(p))


def _codes(v: torch.Tensor) -> torch.Tensor | None:
    """``v`` as 8-bit codes: itself if ``uint8``; the codes back if torch's ``load_state_dict``
    cast them to the param's dtype (whole numbers 0..255); else None."""
    if v.dtype == torch.uint8:
        return v
    if v.is_floating_point() and v.numel():
        lv = local(v)
        if torch.equal(lv, lv.round()) and lv.min() >= 0 and lv.max() <= 255:
            return v.to(torch.uint8)
    return None


def _absmax_of(absmax, p: torch.Tensor) -> bool:
    """Whether ``absmax`` can be the block scales of ``p``'s 8-bit state: one per block."""
    return (
        isinstance(absmax, torch.Tensor)
        and absmax.is_floating_point()
        and absmax.numel() == -(-local(p).numel() // QBLOCK)
    )


# Checkpoints ---------------------------------------------------------------------------------


def _params_by_id(optimizer, state_dict: dict) -> dict[int, torch.Tensor]:
    """The optimizer's params by their ids in ``state_dict`` (group by group, as torch maps them)."""
    ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    return dict(zip(ids, (p for g in optimizer.param_groups for p in g["params"]), strict=False))


def signed_keys(optimizer) -> dict[str, bool]:
    """Each state key of the optimizer's algorithm: whether its 8-bit codes use the signed map."""
    return dict(zip(optimizer.algorithm.columns, optimizer.algorithm.signed, strict=True))


def exact_entries(optimizer, state_dict: dict) -> list[tuple[torch.Tensor, str, torch.Tensor]]:
    """``(param, key, value)`` for every saved state tensor that torch's ``load_state_dict``
    would convert (to the param's dtype): ours, and state stored in another dtype."""
    out = []
    for i, p in _params_by_id(optimizer, state_dict).items():
        for key, v in state_dict["state"].get(i, {}).items():
            if key == "step" or not isinstance(v, torch.Tensor):
                continue
            if ours(key) or v.dtype != p.dtype:
                out.append((p, key, v))
    return out


def restore(optimizer, entries) -> None:
    """Put back, bit for bit, what :func:`exact_entries` saw (on the param's device)."""
    for p, key, v in entries:
        optimizer.state[p][key] = v.to(device=p.device, copy=True)


def portable(optimizer, state_dict: dict) -> dict:
    """``state_dict`` with the 8-bit state of DTensor params dequantized (fp32 DTensors, no
    absmax): its blocks follow a rank's shard, so only the values can be saved and resharded
    (``torch.distributed.checkpoint``); loading quantizes them again, to the same codes."""
    signed = signed_keys(optimizer)
    state = dict(state_dict["state"])
    for i, p in _params_by_id(optimizer, state_dict).items():
        entries = state.get(i, {})
        if not is_dtensor(p) or not any(k.endswith(SUFFIX) for k in entries):
            continue
        state[i] = {
            k: dequantize(v, entries[absmax_key(k)], signed[k]) if absmax_key(k) in entries else v
            for k, v in entries.items()
            if not k.endswith(SUFFIX)
        }
    return {**state_dict, "state": state}


def torch_state_dict(optimizer) -> dict:
    """The optimizer's state dict in torch's format: our entries dropped, 8-bit state
    dequantized, the state in the param's dtype (``torch.optim``'s class loads it as its own)."""
    out = optimizer.state_dict()
    by_id = _params_by_id(optimizer, out)
    signed = signed_keys(optimizer)
    state = {}
    for i, entries in out["state"].items():
        p = by_id[i]
        state[i] = {}
        for k, v in entries.items():
            if ours(k):
                continue
            if absmax_key(k) in entries:
                v = dequantize(v, entries[absmax_key(k)], signed[k])
            if isinstance(v, torch.Tensor) and k != "step" and v.is_floating_point():
                v = v.to(p.dtype)
            state[i][k] = v
    return {**out, "state": state}


# The step without Triton (CPU without the interpreter) -----------------------------------------


def eager_step(algorithm, hyper: dict, flags: dict, bucket, grads, amp, state, precision: Precision) -> None:
    """The algorithm's non-Triton step on fp32 working copies (8-bit state dequantized), stored
    back as the kernel stores (master, compensation, stochastic or nearest rounding, 8-bit
    codes and absmax)."""
    dtype = bucket.dtype
    mode = precision.mode(dtype)
    aux = bucket.columns[-1]
    params = bucket.columns[0]
    if mode == kernels.MODE_MASTER.value:
        values = [a.clone() for a in aux]
    elif mode == kernels.MODE_KAHAN.value:
        values = [p.float() + c.float() for p, c in zip(params, aux, strict=True)]
    else:
        values = [p.float() for p in params]
    absmax = bucket.absmax or [[None] * len(params) for _ in algorithm.columns]
    states = [
        [t.float() if a is None else dequantize(t, a, signed) for t, a in zip(column, scales, strict=True)]
        for column, scales, signed in zip(bucket.columns[1:-1], absmax, algorithm.signed, strict=True)
    ]
    mine = [g.float() for g in bucket.grads(grads)]
    shadow = copy.copy(bucket)
    shadow.columns = [values, *states, values]
    shadow.dtype = torch.float32
    shadow.grads = lambda _: mine
    algorithm.eager(hyper, flags, shadow, grads, amp, state)
    generators = _generators(bucket, state) if precision.rounds_stochastically(dtype) else None
    for column, work, scales, signed in zip(
        bucket.columns[1:-1], states, absmax, algorithm.signed, strict=True
    ):
        for i, (t, w, a) in enumerate(zip(column, work, scales, strict=True)):
            if a is not None:
                quantize_(t, a, w, signed)  # 8-bit codes: to nearest, never stochastically
            elif t is not params[i]:  # an absent state column repeats the params
                _store(t, w, generators and generators[i])
    for i, (p, x) in enumerate(zip(params, values, strict=True)):
        if mode == kernels.MODE_MASTER.value:
            aux[i].copy_(x)
            p.copy_(x)
        elif mode == kernels.MODE_KAHAN.value:
            p.copy_(x)
            aux[i].copy_(x - p.float())
        else:
            _store(p, x, generators and generators[i])


def _generators(bucket, state) -> list[torch.Generator]:
    out = []
    for p in bucket.params:
        seed = state[p][SEED]
        out.append(torch.Generator().manual_seed(int(seed)))
        seed.add_(1)
    return out


def _store(dst: torch.Tensor, x: torch.Tensor, generator: torch.Generator | None) -> None:
    if generator is None or dst.dtype not in LOW:
        dst.copy_(x)
    else:
        dst.copy_(stochastic_round(x, dst.dtype, generator))


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """fp32 ``x`` rounded to bf16/fp16 up or down with the probabilities that make its
    expectation ``x`` (the kernels' ``stochastic_round`` in torch, with torch's generator)."""
    u = torch.rand(x.shape, generator=generator, dtype=torch.float64).to(x.device)
    near = x.to(dtype)
    nf = near.float()
    # The neighbour on x's other side: one step (of the raw bits: sign and magnitude) smaller
    # in magnitude if near overshot, else larger.
    step = torch.where(nf.abs() > x.abs(), -1, 1).to(torch.int16)
    other = (near.view(torch.int16) + step).view(dtype).float()
    p_other = ((x - nf) / (other - nf)).nan_to_num(0.0)
    take = (u < p_other) & (nf != x) & nf.isfinite()
    return torch.where(take, other, nf).to(dtype)
