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

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fusedopt._dist import is_dtensor, local
from fusedopt._multi_tensor import shares_dense_layout
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
from fusedopt.optim.reference import CHUNK, Batch, Storage

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
            if not isinstance(v, torch.Tensor):
                continue
            scale = absmax_key(key)
            if v.shape != p.shape:  # left for the step to refuse; torch-cast codes made codes again
                codes = _codes(v) if scale in state and v.dtype != torch.uint8 else None
                if codes is not None:
                    state[key] = codes
                continue
            if scale in state:
                codes, absmax = _codes(v), state[scale]
                if codes is None or not _absmax_of(absmax, p):
                    continue  # not 8-bit state of this param: the step refuses it
                if absmax.dtype != torch.float32 or absmax.device != local(codes).device:
                    absmax = absmax.to(local(codes).device, torch.float32)
                if eight and local(codes).stride() == codes_stride(local(p)) and codes.device == p.device:
                    state[key], state[scale] = codes, absmax  # the same objects, unless converted
                    continue
                del state[scale]
                v = dequantize(codes, absmax, signed)
            if eight:
                state[key], state[scale] = quantize(v, p, signed)
            elif v.is_floating_point() and (v.dtype != wanted or v is not state[key]):  # dequantized
                state[key] = v.to(wanted)
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
    if not _like_param(master, p, torch.float32):
        return False
    # A compiled step traces this on fake tensors: the values were checked by the eager plan
    # or load that made the state.
    if torch.compiler.is_compiling():
        return True
    rounded, param = local(master).to(p.dtype), local(p)
    return bool(((rounded == param) | (rounded.isnan() & param.isnan())).all())  # NaN rounds to NaN


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
    would convert (to the param's dtype) and the options keep as it is: ours, 8-bit codes, and
    state in the dtype the options store it in. Other state is cast as torch casts it (a state
    dict of fp64 state into fp32 params, without options: fp32, as torch's)."""
    out = []
    for i, p in _params_by_id(optimizer, state_dict).items():
        entries = state_dict["state"].get(i, {})
        stored = optimizer.precision.state_dtype_for(p.dtype)
        for key, v in entries.items():
            if key == "step" or not isinstance(v, torch.Tensor) or v.dtype == p.dtype:
                continue
            codes = v.dtype == torch.uint8 and absmax_key(key) in entries
            if ours(key) or codes or v.dtype == stored:
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
        p = by_id.get(i)
        if p is None:  # not a param's (torch keeps such keys as they are)
            state[i] = entries
            continue
        state[i] = {}
        for k, v in entries.items():
            if ours(k):
                continue
            if absmax_key(k) in entries and isinstance(v, torch.Tensor):
                v = dequantize(v, entries[absmax_key(k)], signed[k])
            if isinstance(v, torch.Tensor) and k != "step" and v.is_floating_point():
                v = v.to(p.dtype)
            state[i][k] = v
    return {**out, "state": state}


# The step without Triton (CPU without the interpreter) -----------------------------------------


def eager_step(algorithm, hyper: dict, flags: dict, bucket, grads, amp, state, precision: Precision) -> None:
    """The algorithm's non-Triton step (its ``eager``) on fp32 working copies read and stored
    as the kernel reads and stores them with these options (:class:`Stored`). The rounding
    seeds advance also on a step GradScaler skips, as the kernels' do."""
    stored = Stored(bucket, state, precision, algorithm.signed)
    stored.begin()
    algorithm.eager(hyper, flags, bucket, grads, amp, state, storage=stored)


class Stored(Storage):
    """How a step with the low-precision options reads a bucket's tensors and stores them back
    (the kernels' loads and stores, in torch): the param from its fp32 master (master weights)
    or as param plus compensation (Kahan), the state from its storage dtype or its 8-bit codes;
    stored as the master and its rounding, as the rounding and its error, to nearest even or
    stochastically (:func:`stochastic_round`), as 8-bit codes and absmax (to nearest, never
    stochastically). The fp32 math is torch's fused CPU step where the fp32 copies of a
    tensor's operands share one dense layout (as whole copies do: :meth:`fused`), else its
    for-loop one.

    Args:
        bucket: the bucket (:class:`fusedopt.optim.reference.Storage`).
        state: the optimizer's state (the rounding seeds).
        precision: the optimizer's options.
        signed: per state column, whether its 8-bit codes use the signed map.
    """

    options = True

    def __init__(self, bucket, state, precision: Precision, signed: Sequence[bool]):
        super().__init__(bucket)
        self.dtype = torch.float32
        self.mode = precision.mode(bucket.dtype)
        self.signed = signed
        self.absmax = bucket.absmax  # per state column, per tensor: None where the state is not 8-bit
        self.state = state
        self.rounds = precision.rounds_stochastically(bucket.dtype)
        self.words: _RandomWords | None = None

    def begin(self) -> None:
        if self.rounds:
            numels = [p.numel() for p in self.columns[0]]
            self.words = _RandomWords(_generators(self.bucket, self.state), numels)

    def prepare(self, used: Sequence[bool]) -> None:
        """Draw each tensor's random words, store by store (its used bf16/fp16 state columns in
        order, then the param), before threads step the batches in any order."""
        if not self.rounds:
            return
        params = self.columns[0]
        for i, p in enumerate(params):
            for j, u in enumerate(used):
                t = self.columns[1 + j][i]
                if u and t.dtype in LOW:
                    self.words.prepare(i, j, t.dtype)
            if self.mode == kernels.MODE_PLAIN.value and p.dtype in LOW:
                self.words.prepare(i, len(self.columns), p.dtype)

    def fused(self, grads: list[torch.Tensor]) -> bool:
        """Whether each tensor's fp32 copies of param, state and grad, made whole as ``.float()``
        (a master ``.clone()``, Kahan's sum, 8-bit state dequantized) makes them, would share one
        dense layout: then torch's fused CPU step is right for them (kept for the bucket)."""
        ok = self.memo.get("options_fused")
        if ok is None:
            ok = self.memo["options_fused"] = self.bucket.device.type == "cpu" and all(
                shares_dense_layout([x, *states, x, g]) for x, states, g in self._copies(grads)
            )
        return ok

    def _copies(self, grads):
        """Per tensor, stand-ins of the fp32 copies' layouts (meta tensors where a copy is new)."""

        def f32(t: torch.Tensor) -> torch.Tensor:  # t.float(): t itself if fp32, else a new copy
            return t if t.dtype == torch.float32 else torch.empty_like(t, dtype=torch.float32, device="meta")

        def new(t: torch.Tensor) -> torch.Tensor:
            return torch.empty_like(t, dtype=torch.float32, device="meta")

        params, aux = self.columns[0], self.columns[-1]
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            if self.mode == kernels.MODE_MASTER.value:
                x = new(aux[i])
            elif self.mode == kernels.MODE_KAHAN.value:
                x = new(p) + new(aux[i])
            else:
                x = f32(p)
            states = [
                new(column[i])
                if self.absmax is not None and self.absmax[j][i] is not None
                else f32(column[i])
                for j, column in enumerate(self.columns[1:-1])
            ]
            yield x, states, f32(g)

    def operands(self, i: int, used: Sequence[bool]) -> list[torch.Tensor]:
        return [*super().operands(i, used), self.columns[-1][i]]

    # Reads -------------------------------------------------------------------------------------

    def load_param(self, batch: Batch) -> torch.Tensor:
        if self.mode == kernels.MODE_MASTER.value:
            return self.copy_in(batch, "x", -1)
        x = self.copy_in(batch, "x", 0)
        if self.mode == kernels.MODE_KAHAN.value:
            x.add_(self.copy_in(batch, "k", -1))
        return x

    def load_state(self, batch: Batch, j: int) -> torch.Tensor:
        eight = self._eight(batch, j)
        if not eight:
            return self.copy_in(batch, f"s{j}", 1 + j)
        w = self.work(batch, f"s{j}")
        views, parts = self.views(batch, f"s{j}", w), self.parts(batch, 1 + j)
        rest = []
        for k, (view, part) in enumerate(zip(views, parts, strict=True)):
            if eight[k] is None:
                rest.append(k)
            else:
                view.copy_(dequantize(part, eight[k], self.signed[j]))
        if rest:
            torch._foreach_copy_([views[k] for k in rest], [parts[k] for k in rest])
        return w

    # Stores ------------------------------------------------------------------------------------

    def store_state(self, batch: Batch, j: int, w: torch.Tensor) -> None:
        eight = self._eight(batch, j)
        if not eight:
            self._store(batch, f"s{j}", w, 1 + j, j)
            return
        views, parts = self.views(batch, f"s{j}", w), self.parts(batch, 1 + j)
        rest = []
        for k, (view, part) in enumerate(zip(views, parts, strict=True)):
            if eight[k] is None:
                rest.append(k)
            else:
                quantize_(part, eight[k], view, self.signed[j])  # 8-bit codes: to nearest
        if rest:  # fp32 state (small params)
            torch._foreach_copy_([parts[k] for k in rest], [views[k] for k in rest])

    def store_param(self, batch: Batch, x: torch.Tensor) -> None:
        if self.mode == kernels.MODE_MASTER.value:
            self.copy_out(batch, "x", x, -1)
            self.copy_out(batch, "x", x, 0)
        elif self.mode == kernels.MODE_KAHAN.value:
            self.copy_out(batch, "x", x, 0)
            stored = self.copy_in(batch, "k", 0)  # the param as stored, in fp32
            exact = x == stored  # an inf param keeps no (NaN) compensation, as the kernel
            self.copy_out(batch, "k", torch.sub(x, stored, out=stored).masked_fill_(exact, 0.0), -1)
        else:
            self._store(batch, "x", x, 0, len(self.columns))

    def _eight(self, batch: Batch, j: int) -> list | None:
        """Per piece, the absmax of its 8-bit state in column ``j`` (None: not 8-bit); None if
        no piece has any."""
        if self.absmax is None:
            return None
        eight = batch.cache.get(("absmax", j))
        if eight is None:
            scales = self.absmax[j]
            eight = batch.cache[("absmax", j)] = [
                None if scales[i] is None else scales[i][start // QBLOCK : -(-stop // QBLOCK)]
                for i, start, stop in batch.pieces
            ]
        return eight if any(a is not None for a in eight) else None

    def _store(self, batch: Batch, name: str, w: torch.Tensor, column: int, key: int) -> None:
        """``w`` into the column's pieces: stochastically rounded (random words ``key`` of each
        tensor) where the options round so and the column is bf16/fp16, else by ``copy_``."""
        dtype = self.columns[column][batch.pieces[0][0]].dtype
        if not (self.rounds and dtype in LOW):
            self.copy_out(batch, name, w, column)
            return
        r = self.work(batch, "r", torch.int32)
        for (i, start, _), (a, b) in zip(batch.pieces, batch.spans, strict=True):
            self.words.fill(i, key, start, r[a:b])
        bits = batch.cache.get(("int16", column))
        if bits is None:
            bits = batch.cache[("int16", column)] = [t.view(torch.int16) for t in self.parts(batch, column)]
        torch._foreach_copy_(bits, self.views(batch, "r", stochastic_round(w, dtype, r)))


class _RandomWords:
    """The random words of a bucket's stochastically rounded stores in one step, drawn from
    each param's generator (seeded by its ``"rounding_seed"``) store by store, in the order of
    :meth:`Stored.prepare`, before any batch is stepped. Word ``e`` of a store of a param
    depends on the seeds, the param's size and the order of the stores only (not on how the
    step batches the tensors): a param of at most ``SMALL`` elements draws one word per element
    and store; a larger one reads element ``e`` as ``pool0[(e + o0) % CHUNK] ^ pool1[(e + o1)
    % (CHUNK - 1)]``, from two pools of the bucket (drawn by the first param that needs them)
    and two offsets drawn per store: every word is uniform (the rounding unbiased), and two
    elements share both pool words only if their stores' offsets make them so (for any two
    stores, each element of one shares them with at most one element of the other in
    68,719,214,592). A word per element from torch's CPU generator (a Mersenne twister) would
    cost more than the rest of the step. Words have 16 random bits for bf16, 24 for fp16."""

    SMALL = 4096
    SIZES = (CHUNK, CHUNK - 1)  # coprime

    def __init__(self, generators: list[torch.Generator], numels: list[int]):
        self.generators = generators
        self.numels = numels
        self.words: dict = {}  # (param, store) -> its words (a small param) or (mask, offsets)
        self.pools: dict = {}  # mask -> the two pools, each repeated once (a window wraps once)

    def prepare(self, i: int, key: int, dtype: torch.dtype) -> None:
        mask = 0xFFFF if dtype == torch.bfloat16 else 0xFFFFFF
        generator, numel = self.generators[i], self.numels[i]
        if numel <= self.SMALL:
            self.words[(i, key)] = _draw(numel, generator).bitwise_and_(mask)
            return
        if mask not in self.pools:
            self.pools[mask] = [_draw(size, generator).bitwise_and_(mask).repeat(2) for size in self.SIZES]
        offsets = [int(torch.randint(0, size, (), generator=generator)) for size in self.SIZES]
        self.words[(i, key)] = (mask, offsets)

    def fill(self, i: int, key: int, start: int, out: torch.Tensor) -> None:
        """``out`` (int32, ``n`` elements): the words of elements ``start .. start + n``."""
        n = out.numel()
        words = self.words[(i, key)]
        if isinstance(words, torch.Tensor):
            out.copy_(words[start : start + n])
            return
        mask, offsets = words
        windows = []
        for pool, size, offset in zip(self.pools[mask], self.SIZES, offsets, strict=True):
            a = (start + offset) % size
            if pool.numel() < a + n:  # a batch larger than CHUNK: a longer repeat of the pool
                pool = pool[:size].repeat(-(-(a + n) // size))
            windows.append(pool[a : a + n])
        torch.bitwise_xor(*windows, out=out)


def _draw(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.empty(n, dtype=torch.int32).random_(generator=generator)  # 31 uniform bits


def _generators(bucket, state) -> list[torch.Generator]:
    """Each param's generator for this step, seeded by its ``"rounding_seed"``; the seeds
    advance by one."""
    seeds = [state[p][SEED] for p in bucket.params]
    out = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    if seeds:
        torch._foreach_add_(seeds, 1)
    return out


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, r: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` rounded to bf16/fp16 up or down with the probabilities that make the result's
    expectation ``x`` (the kernels' ``stochastic_round``, in torch). ``r``: int32 of ``x``'s
    shape, uniform random bits (16 for bf16, 24 for fp16); it is overwritten with the result,
    the bit patterns of ``dtype`` as int32 (stored through an int16 view of the destination).

    bf16 is fp32's upper half: 16 random bits added to the lower half carry into the upper one
    with probability (lower half) / 2**16, exactly the distance to the value below over the
    spacing. fp16 takes the neighbour on ``x``'s other side with probability (distance) /
    (spacing), from a uniform ``u`` of 24 bits. NaN stays NaN, infinities stay."""
    if dtype == torch.bfloat16:
        r.add_(x.view(torch.int32)).bitwise_right_shift_(16)
        if not math.isfinite(x.sum().item()):  # a NaN's bits plus the random ones may leave NaN
            r.masked_fill_(x.isnan(), 0x7FC0)  # bf16's NaN, as torch rounds a NaN to nearest
        return r
    near = x.to(dtype)
    nf = near.float()
    bits = near.view(torch.int16).to(torch.int32)
    # The neighbour on x's other side: one step (of the raw bits: sign and magnitude) smaller in
    # magnitude if near overshot, else larger.
    other = torch.where(nf.abs() > x.abs(), bits - 1, bits + 1)
    p_other = (x - nf) / (other.to(torch.int16).view(dtype).float() - nf)  # NaN only where x is
    take = (r.float().mul_(2.0**-24) < p_other) & (nf != x) & (nf.abs() != float("inf"))
    return torch.where(take, other, bits, out=r)
