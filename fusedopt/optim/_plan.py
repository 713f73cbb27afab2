"""Launch plans of the fused optimizers: buckets, pointer tables, staging, step counters.

A group's plan splits its params (those with a grad) into buckets of one device, storage
dtype and occurrence layer (a param listed twice is stepped twice, as torch does). A bucket
owns what one launch needs: the device pointer tables of its params and state (built once,
reused while the addresses stay the same), the grads' table (refreshed only when autograd hands
out new grad buffers), its hyper-parameter vector on the device and its step counters.

Plans are held by the optimizer that built them (eager steps) or by a cache the optimizer owns
(compiled steps): dropping the optimizer frees them.
"""

from __future__ import annotations

import itertools
import operator
from collections import defaultdict
from typing import Any

import torch

from fusedopt._dist import Domain, any_dtensor, check_param, domain, local
from fusedopt._multi_tensor import (
    TL_DTYPE,
    DeviceScalars,
    TensorTable,
    compute_dtype,
    dense_copy,
    runs_triton,
    shares_dense_layout,
    to_device,
)
from fusedopt._norm import NormSource
from fusedopt.optim._precision import PLAIN, SEED, Precision
from fusedopt.optim._quantize import QBLOCK, absmax_key, codebook


def real_view(t: torch.Tensor) -> torch.Tensor:
    """Complex tensors are stepped as their real view (as torch.optim does)."""
    return torch.view_as_real(t) if t.is_complex() else t


def walkable_dtype(p: torch.Tensor) -> bool:
    """Whether the kernels step this param's dtype (float, or complex as its real view)."""
    return real_view(p).dtype in TL_DTYPE


def walkable(p: torch.Tensor) -> bool:
    """Whether a param with a grad can take the kernels: a dense grad and a float dtype."""
    return not p.grad.is_sparse and walkable_dtype(p)


class StepGrads(list):
    """The grads of a group's params, one per param in order (None: no grad; for a DTensor, its
    local shard), and ``token``: an object that is another one whenever their addresses may
    have changed (the grads' device tables are rebuilt then)."""

    token: object = None


# What the step's key reads of each param and grad: C-level calls mapped over the lists, the
# cheapest way Python has to read them (the scan is most of a steady-state step's host time).
_address = torch._C.TensorBase.data_ptr
_strides = torch._C.TensorBase.stride
_numel = torch._C.TensorBase.numel
_dtype = operator.attrgetter("dtype")
GRAD_ADDRESSES = 2  # the part of the key that may change every step (new grad buffers)


def scan(params: list[torch.Tensor], shards: bool = False) -> tuple[tuple | None, StepGrads]:
    """The hot-path loop: a group's grads and the key its cached plan must match.

    The key holds, for the params with a grad, their addresses and element counts and their
    grads' addresses, strides and dtypes (and which params have a grad, when not all do): what
    the plan's tables were built from that can change while the objects stay the same
    (``p.data = ...``, new grad buffers, ``p.grad_dtype``). torch makes a grad the shape of its
    param when it is set, so the param's size stands for the grad's. ``shards``: read the local
    shards of DTensors (what the kernels walk; a DTensor's own address is 0). The key is None
    where it cannot be taken (sparse grads): no plan is cached then.
    """
    if shards:
        grads = StepGrads([None if p.grad is None else local(p.grad) for p in params])
        params = [local(p) for p in params]
    else:
        grads = StepGrads([p.grad for p in params])
    present, mask = grads, None
    try:
        try:
            addresses = list(map(_address, grads))
        except TypeError:  # params without a grad (None)
            mask = tuple(g is not None for g in grads)
            params = [p for p, g in zip(params, grads) if g is not None]  # noqa: B905
            present = [g for g in grads if g is not None]
            addresses = list(map(_address, present))
        key = (
            list(map(_address, params)),
            list(map(_numel, params)),
            addresses,
            list(map(_strides, present)),
            list(map(_dtype, present)),
            mask,
        )
    except RuntimeError:  # sparse grads have no strides
        return None, grads
    grads.token = key
    return key, grads


def same_layout(key: tuple, other: tuple) -> bool:
    """Whether two scan keys differ at most in their grads' addresses."""
    g = GRAD_ADDRESSES
    return key[:g] == other[:g] and key[g + 1 :] == other[g + 1 :]


class Amp:
    """What a step takes from GradScaler and ``max_grad_norm``: the scale the grads carry, the
    inf verdict (skip the step when non-zero) and the clip coefficient; each may be None."""

    __slots__ = ("clip_coef", "found_inf", "grad_scale")

    def __init__(self, grad_scale=None, found_inf=None, clip_coef=None):
        self.grad_scale: torch.Tensor | None = grad_scale
        self.found_inf: torch.Tensor | None = found_inf
        self.clip_coef: torch.Tensor | None = clip_coef


class Bucket:
    """Tensors of one device, storage dtype and occurrence layer, stepped by one launch.

    ``columns`` are the algorithm's table columns (real views of the local shards; column 0 the
    params, an absent state column repeats the params), ``params`` the params themselves (the
    optimizer's state keys), ``positions`` index the step's list of grads and ``counters`` are
    the tensors' step counts (0-d tensors; empty when the algorithm keeps none).
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, sparse: bool, precision: Precision = PLAIN):
        self.device = device
        self.dtype = dtype
        self.precision = precision
        # "triton": our kernel; "eager": the algorithm's non-Triton step (torch's own fastest
        # correct path on CPU without the interpreter, sparse grads, integer params).
        self.walkable = not sparse and dtype in TL_DTYPE  # dense float grads: norms and inf checks
        self.kind = "triton" if self.walkable and runs_triton(device) else "eager"
        self.layer = 0  # occurrence layer: 1 for the second listing of a param, ...
        self.positions: list[int] = []
        self.columns: list[list[torch.Tensor]] = []
        self.params: list[torch.Tensor] = []
        self.domains: list[Domain] = []  # where each grad's norm is reduced (fusedopt._dist)
        self.counters: list[torch.Tensor] = []
        self.resident: torch.Tensor | None = None  # one tensor whose elements are the counters
        self.carried: list[torch.Tensor] = []  # per-tensor scalar state (Algorithm.carried), tensor-major
        self.carried_resident: torch.Tensor | None = None  # one tensor whose elements are those
        self.seed_list: list[torch.Tensor] = []  # stochastic rounding's seeds (0-d int64), if it rounds
        self.seeds: torch.Tensor | None = None  # one tensor whose elements are the seeds
        # 8-bit state: each state column's absmax, per tensor (None: fp32 state), their addresses
        # (int64 [T, S], 0 for None) and the columns' code maps (float32 [S, BOOK]: _quantize.codebook).
        self.absmax: list[list[torch.Tensor | None]] | None = None
        self.absmax_ptrs: torch.Tensor | None = None
        self.codebook: torch.Tensor | None = None
        self.unique = True  # no param of this bucket is listed twice in its group
        self.complex = False
        self.irregular: list[int] = []  # tensors whose operands do not share one dense layout
        self.table: TensorTable | None = None
        self.scalars = DeviceScalars(device)  # the group's hyper-parameters on this device
        self.memo: dict = {}  # what a non-Triton step decides once per bucket (layouts, ...)
        if self.kind == "triton":
            self.dtypes = {"DTYPE": TL_DTYPE[dtype], "COMPUTE": TL_DTYPE[compute_dtype(dtype)]}
            self.dtypes.update(precision.constexprs(dtype))

    def add(self, position: int, operands: list[torch.Tensor], counter: torch.Tensor | None) -> None:
        if not self.columns:
            self.columns = [[] for _ in operands]
        self.positions.append(position)
        self.params.append(operands[0])
        self.domains.append(domain(operands[0]))
        for column, t in zip(self.columns, operands, strict=True):
            column.append(real_view(local(t)))
        if counter is not None:
            self.counters.append(counter)
        self.complex |= operands[0].is_complex()

    def grads(self, grads: StepGrads) -> list[torch.Tensor]:
        if self.complex:
            return [real_view(grads[i]) for i in self.positions]
        return [grads[i] for i in self.positions]

    def finish(self, grads: StepGrads) -> None:
        """Find tensors that need staging and build the device tables of the others."""
        if self.kind != "triton":
            return
        mine = self.grads(grads)
        self.irregular = [
            i
            for i, g in enumerate(mine)
            if not shares_dense_layout([self.columns[0][i], g, *(c[i] for c in self.columns[1:])])
        ]
        if not self.irregular:
            self.table = TensorTable(self.columns, self.device)

    # Per-tensor 0-d values a step advances with one op: the step counters, stochastic rounding's
    # seeds. Where the bucket owns them (each param once, our kernel), they are views of one
    # resident tensor on its device; else they are gathered into one and copied back.

    def _resident(self, values: list[torch.Tensor]) -> torch.Tensor | None:
        if not values or not self.unique or self.kind != "triton":
            return None
        return torch.stack([v.to(self.device, values[0].dtype) for v in values])

    def _vector(self, values: list[torch.Tensor], resident: torch.Tensor | None) -> torch.Tensor | None:
        if resident is not None:
            return resident
        return torch.stack([v.to(self.device) for v in values]) if values else None

    @staticmethod
    def _write_back(values: list[torch.Tensor], vector: torch.Tensor | None, resident) -> None:
        if vector is not None and vector is not resident:
            torch._foreach_copy_(values, list(vector.unbind()))

    def make_resident(self) -> list[torch.Tensor] | None:
        """Make the counters 0-d views of one tensor on the bucket's device (same values and
        dtype): a step then advances them all with one op. Returns the views, which must replace
        the counters where they are kept; None where the bucket cannot (a param listed twice
        shares one counter between buckets)."""
        self.resident = self._resident(self.counters)
        if self.resident is None:
            return None
        self.counters = list(self.resident.unbind())
        return self.counters

    def make_seeds_resident(self) -> list[torch.Tensor] | None:
        """:meth:`make_resident` for the rounding seeds (``seed_list``)."""
        self.seeds = self._resident(self.seed_list)
        if self.seeds is None:
            return None
        self.seed_list = list(self.seeds.unbind())
        return self.seed_list

    def make_carried_resident(self) -> list[torch.Tensor] | None:
        """:meth:`make_resident` for the per-tensor scalar state (``carried``)."""
        self.carried_resident = self._resident(self.carried)
        if self.carried_resident is None:
            return None
        self.carried = list(self.carried_resident.unbind())
        return self.carried

    def carried_vector(self) -> torch.Tensor | None:
        """The per-tensor scalar state as one tensor (as :meth:`counter_vector`; None without)."""
        return self._vector(self.carried, self.carried_resident)

    def write_back_carried(self, vector: torch.Tensor | None) -> None:
        self._write_back(self.carried, vector, self.carried_resident)

    def counter_vector(self) -> torch.Tensor | None:
        """The counters as one tensor on the device: the resident one, or a gathered copy that
        :meth:`write_back` returns to the counters."""
        return self._vector(self.counters, self.resident)

    def write_back(self, vector: torch.Tensor | None) -> None:
        self._write_back(self.counters, vector, self.resident)

    def seed_vector(self) -> torch.Tensor | None:
        """The rounding seeds as one tensor (as :meth:`counter_vector`; None without)."""
        return self._vector(self.seed_list, self.seeds)

    def write_back_seeds(self, vector: torch.Tensor | None) -> None:
        self._write_back(self.seed_list, vector, self.seeds)

    def dynamic(self, grads: StepGrads) -> torch.Tensor:
        # The grads' table changes only when the group's grad addresses do.
        return self.table.dynamic(grads.token, lambda: _dynamic_rows(self.grads(grads)))

    def norm_source(self, grads: StepGrads) -> NormSource | None:
        """This bucket's grads as a source for the fused global norm (None: take it with torch)."""
        if self.table is None:
            return None
        return NormSource(self.table, self.dynamic(grads), 1, self.table.dynamic_aligned, self.dtype)

    def launch(self, grads: StepGrads, kernel, amp: Amp, *args, **constexprs) -> None:
        """One launch of an optimizer kernel over this bucket's tensors:

        ``kernel(ptrs, grad_ptrs, meta, owner, *args, grad_scale, found_inf, clip_coef,
        DTYPE, COMPUTE, HAS_GRAD_SCALE, HAS_FOUND_INF, HAS_CLIP, **constexprs)``; an absent
        operand is replaced by ``args[0]`` and never read. Tensors with mismatched layouts go
        through dense copies.
        """
        scale, found, clip = amp.grad_scale, amp.found_inf, amp.clip_coef
        filler, device = args[0], self.device
        operands = (
            *args,
            filler if scale is None else scale.to(device),
            filler if found is None else found.to(device),
            filler if clip is None else clip.to(device),
        )
        constexprs.update(
            self.dtypes,
            HAS_GRAD_SCALE=scale is not None,
            HAS_FOUND_INF=found is not None,
            HAS_CLIP=clip is not None,
        )
        if self.table is not None:
            self.table.launch(kernel, self.dynamic(grads), *operands, **constexprs)
            return
        mine = self.grads(grads)
        # Stage each distinct tensor once (a column may repeat another: an absent state column).
        columns = [list(c) for c in self.columns]
        copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i in self.irregular:
            like = columns[0][i]
            mine[i] = _staged(mine[i], like)
            for c in columns:
                original = c[i]
                if id(original) not in copies:
                    copies[id(original)] = (original, _staged(original, like))
                c[i] = copies[id(original)][1]
        table = TensorTable(columns, self.device)
        table.launch(kernel, table.dynamic(None, lambda: _dynamic_rows(mine)), *operands, **constexprs)
        for original, staged in copies.values():
            if staged is not original:
                original.copy_(staged)


def _staged(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t if shares_dense_layout([like, t]) and t.stride() == like.stride() else dense_copy(t, like)


def _dynamic_rows(grads: list[torch.Tensor]) -> list[tuple[int, ...]]:
    return [(g.data_ptr(),) for g in grads]


class Plan:
    """The buckets of one group for one scan key (None: not cacheable), the algorithm's switches
    it was built for (a switch that adds state, e.g. amsgrad, needs a new plan), whether it
    read DTensors' local shards (``shards``) and the params whose grad has another dtype than
    theirs (``foreign``: torch's own step takes them, see ``FusedStep._foreign_step``)."""

    def __init__(self, key: tuple | None, buckets: list[Bucket], foreign: list[torch.Tensor] | None = None):
        self.key = key
        self.buckets = buckets
        self.foreign = foreign or []
        # State this plan's build created: (param, None) for a new state, (param, {key: old
        # value}) for keys added to one (undone if the step is refused before any launch).
        self.created: list[tuple[torch.Tensor, dict | None]] = []
        self.flags: dict | None = None  # set by plan_groups
        self.shards = False
        self.cacheable = key is not None and all(not b.irregular for b in buckets)


def build(
    entries: list[tuple[int, int, list[torch.Tensor], Any]],
    grads: StepGrads,
    key: tuple | None,
    precision: Precision = PLAIN,
) -> Plan:
    """A plan from ``(position, layer, operands, counter)`` entries: ``operands`` are the param
    and its state columns, ``position`` indexes ``grads``; a layer is launched after the layers
    before it (a param listed twice, or one whose memory overlaps an earlier one's)."""
    buckets: dict[tuple, Bucket] = {}
    for position, layer, operands, counter in entries:
        p = operands[0]
        where = (layer, p.device, real_view(p).dtype, grads[position].is_sparse)
        bucket = buckets.get(where)
        if bucket is None:
            bucket = buckets[where] = Bucket(*where[1:], precision)
            bucket.layer = layer
        bucket.add(position, operands, counter)
    ordered = [buckets[k] for k in sorted(buckets, key=lambda k: k[0])]
    counts: dict[int, int] = defaultdict(int)
    for _, _, operands, _ in entries:
        counts[id(operands[0])] += 1
    for bucket in ordered:
        bucket.unique = all(counts[id(p)] == 1 for p in bucket.params)
        bucket.finish(grads)
    return Plan(key, ordered)


def _span(t: torch.Tensor) -> tuple | None:
    """``(device, first byte, end byte)`` of the memory ``t`` may touch; None if empty."""
    t = local(t)
    if t.numel() == 0 or t.layout != torch.strided or t.is_meta:
        return None
    start = t.data_ptr()
    extent = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride(), strict=True))
    return str(t.device), start, start + extent * t.element_size()


def overlapping(tensors: list[torch.Tensor]) -> tuple[int, int] | None:
    """The indices of two of ``tensors`` whose memory may overlap (the same tensor twice
    included), or None."""
    spans = sorted((s, i) for i, t in enumerate(tensors) if (s := _span(t)) is not None)
    for (a, i), (b, j) in itertools.pairwise(spans):
        if a[0] == b[0] and b[1] < a[2]:
            return min(i, j), max(i, j)
    return None


def layers(written: list[list[torch.Tensor]]) -> list[int]:
    """The launch layer of each entry (a param and the state its step writes): one after every
    earlier entry whose memory may overlap its own (a param listed twice, views of one tensor),
    so that one launch never writes a place another of its programs reads, and overlapping
    params are stepped in list order, as torch steps them."""
    spans = sorted(
        (s, i) for i, tensors in enumerate(written) for t in tensors if (s := _span(t)) is not None
    )
    earlier: dict[int, set[int]] = defaultdict(set)  # entry -> earlier entries it overlaps
    active: list[tuple] = []  # spans that may still overlap the next ones
    for span, i in spans:
        active = [(a, j) for a, j in active if a[0] == span[0] and a[2] > span[1]]
        for _, j in active:
            if j != i:
                earlier[max(i, j)].add(min(i, j))
        active.append((span, i))
    out = [0] * len(written)
    for i in range(len(written)):
        out[i] = max((out[j] + 1 for j in earlier.get(i, ())), default=0)
    return out


class OpPlans:
    """Plans of the compiled step's op, owned by one optimizer and keyed by every operand's
    address and the grads' strides (a compiled training loop passes the same tensors every
    step). Reached from the op through a weak registry: it dies with its optimizer."""

    KEPT = 4

    def __init__(self):
        self.plans: dict[tuple, Plan] = {}

    def get(self, columns: list[list[torch.Tensor]], grads: StepGrads, precision: Precision = PLAIN) -> Plan:
        key = (
            tuple((t.data_ptr(), t.shape, t.dtype) for c in columns for t in c),
            tuple((g.stride(), g.dtype) for g in grads),
            precision,
        )
        plan = self.plans.get(key)
        if plan is None:
            rows = [list(operands) for operands in zip(*columns, strict=True)]
            for i, row in enumerate(rows):  # an absent column repeats the param: not an operand
                given = [t for k, t in enumerate(row) if k == 0 or t is not row[0]]
                if overlapping(given) is not None or any(
                    torch._debug_has_internal_overlap(t) == 1 for t in given[1:]
                ):
                    raise RuntimeError(
                        f"the state of param {i} shares memory with itself or its param: unsupported "
                        "operation: more than one element of the written-to tensor refers to a single "
                        "memory location. Please clone() the tensor before performing the operation."
                    )
            depth = layers(rows)
            entries = [(i, depth[i], row, None) for i, row in enumerate(rows)]
            plan = build(entries, grads, key, precision)
            if plan.cacheable:
                if len(self.plans) >= self.KEPT:
                    self.plans.pop(next(iter(self.plans)))
                self.plans[key] = plan
        return plan


# Plans of an optimizer's groups ---------------------------------------------------------------


def plan_groups(opt, groups: list[tuple[int, dict]]) -> list[tuple[dict, Plan, StepGrads]]:
    """The plan and grads of each ``(index, group)`` of ``opt`` (a FusedStep): the cached plan
    while the scan key matches it (with new grad tables where only the grads' addresses
    changed), else a new one, after checking every param of the group."""
    scans = []
    for i, group in groups:
        params = group["params"]
        plan = opt._plans.get(i)
        key, grads = scan(params, plan is not None and plan.shards)
        flags = opt.algorithm.flag_values(group)
        if plan is not None and plan.flags == flags and key is not None:
            if key == plan.key:
                grads.token = plan.key  # the same object: the grads' tables are current
            elif same_layout(key, plan.key) and _new_grads_fit(params):
                plan.key = key  # new grad buffers: their tables are rebuilt at the launch
            else:
                plan = None
        else:
            plan = None
        if plan is None and key is not None and any_dtensor(params):
            key, grads = scan(params, shards=True)
        scans.append((i, group, key, grads, flags, plan))
    # Check every group that needs a new plan before any state is created or changed.
    for _, group, _, _, _, plan in scans:
        if plan is None:
            check_group(opt, group)
    out = []
    for i, group, key, grads, flags, plan in scans:
        if plan is None:
            with opt._own_writes():
                plan = _build(opt, group, key, grads)
            plan.flags = flags
            plan.shards = any_dtensor(group["params"])
            if plan.cacheable:
                opt._plans[i] = plan
            else:
                opt._plans.pop(i, None)
        out.append((group, plan, grads))
    return out


def _new_grads_fit(params: list[torch.Tensor]) -> bool:
    """Whether new grad buffers have their param's shape (torch makes them so when they are set;
    a param whose ``data`` changed since is caught by its own part of the key)."""
    return all(p.grad is None or p.grad.shape == p.shape for p in params)


def _name(opt) -> str:
    return type(opt).__name__


def check_group(opt, group: dict) -> None:
    """Refuse, before anything changes, every param with a grad of ``group`` that the step
    cannot take: torch's errors (its type and, where it has one, its message) where torch
    refuses the same at its step, naming the param and the state key. In torch's order: what
    its ``_init_group`` raises for any param of the group (a missing state key: ``KeyError``)
    before what its math raises (shapes, dtypes)."""
    gathered = []
    for index, p in enumerate(group["params"]):
        g = p.grad
        if g is None:
            continue
        check_param(p, g)
        opt._check(p, g, group)
        check_keys(opt, p, group)
        gathered.append((index, p, g))
    for index, p, g in gathered:
        if not g.is_sparse:
            check_grad(opt, p, g, index)
        check_state(opt, p, group, index)
        if opt.precision.active:
            check_not_foreign(opt, p, group, index)


def check_keys(opt, p: torch.Tensor, group: dict) -> None:
    """``KeyError`` for a state key the step needs that ``p``'s non-empty state lacks (torch
    gathers the state of every param before any math)."""
    state = opt.state.get(p)
    if not state or not walkable(p):
        return
    spec = opt.algorithm
    for key in (*spec.carried, *spec.state(group)):
        if key not in state and key not in spec.optional:
            raise KeyError(key)


def check_not_foreign(opt, p: torch.Tensor, group: dict, index: int) -> None:
    """torch's own step takes a param whose grad or state has a dtype the kernel does not store
    (:func:`foreign`, :func:`foreign_state`), and it keeps none of the low-precision options:
    with them such a param is refused (RuntimeError), not stepped without them."""
    precision, dtype = opt.precision, real_view(p).dtype
    options = ", ".join(
        f"{name}={value!r}" for name, value in vars(precision).items() if value != getattr(PLAIN, name)
    )
    what = None
    if foreign(p):
        what = f"has a grad of dtype {p.grad.dtype} (p.grad_dtype), but is {dtype}"
    elif key := foreign_state(opt, p, group):
        what = (
            f"has state[{key!r}] of dtype {real_view(opt.state[p][key]).dtype}, neither its own "
            f"({dtype}) nor the options' ({precision.state_dtype_for(dtype)})"
        )
    if what is not None:
        raise RuntimeError(
            f"{_name(opt)}: param {index} {what}: torch's own step would take it, which keeps none "
            f"of the low-precision options ({options}). Give it the param's dtype."
        )


def check_grad(opt, p: torch.Tensor, g: torch.Tensor, index: int) -> None:
    """A dense grad the kernels can pair with its param: its shape and device (a grad set
    before ``p.data`` was replaced may have neither)."""
    lp, lg = local(p), local(g)
    if g.shape != p.shape or lg.shape != lp.shape:
        raise RuntimeError(
            f"{_name(opt)}: the grad of param {index} has shape {tuple(g.shape)}, but the param has "
            f"shape {tuple(p.shape)}"
        )
    if lg.device != lp.device:
        raise RuntimeError(
            f"{_name(opt)}: the grad of param {index} is on {lg.device}, but the param is on {lp.device}"
        )


def foreign(p: torch.Tensor) -> bool:
    """Whether ``p``'s dense grad has another dtype than ``p`` (``p.grad_dtype``): torch's own
    step takes such a param (see ``FusedStep._foreign_step``)."""
    g = p.grad
    return g is not None and not g.is_sparse and g.dtype != p.dtype


def foreign_state(opt, p: torch.Tensor, group: dict) -> str | None:
    """The first state key of ``p`` whose tensor has a dtype that is neither the one the step
    stores it in nor the param's (torch's, which the options convert: e.g. Adagrad's ``sum``,
    made by torch's constructor): assigned by hand; None if there is none. torch's own step
    takes such a param, with torch's result or error (SGD computes with it, Adam refuses it)."""
    state = opt.state.get(p)
    if not state:
        return None
    dtype = real_view(p).dtype
    ours = (opt.precision.state_dtype_for(dtype), dtype)
    for key in opt.algorithm.state(group):
        v = state.get(key)
        if isinstance(v, torch.Tensor) and absmax_key(key) not in state and real_view(v).dtype not in ours:
            return key
    return None


def check_state(opt, p: torch.Tensor, group: dict, index: int = 0) -> None:
    """Refuse, as torch's step would (``RuntimeError`` for a tensor of the wrong shape, dtype or
    device), state the kernel cannot walk with its param: e.g. a state dict of another model,
    state assigned by hand, amsgrad switched on after the first steps. Missing keys were
    refused before (:func:`check_keys`, for every param of the group first); keys torch treats
    as new when absent or None (SGD's ``momentum_buffer``) may be either. Nothing is changed
    here."""
    state = opt.state.get(p)
    if not state or not walkable(p):
        return
    spec = opt.algorithm
    written = [p]
    for key in spec.state(group):
        v = state.get(key)
        if v is None and key in spec.optional:
            continue
        if v is None:
            raise AttributeError(f"{_name(opt)}: state[{key!r}] of param {index} is None, not a tensor")
        _check_state_tensor(opt, p, index, key, v, state)
        written.append(v)
    if spec.counter is not None:
        step = state.get(spec.counter)
        if spec.counter not in state:
            raise KeyError(spec.counter)
        if not isinstance(step, torch.Tensor) or step.numel() != 1 or step.is_complex():
            raise RuntimeError(
                "API has changed, `state_steps` argument must contain a list of singleton tensors "
                f"({_name(opt)}: state[{spec.counter!r}] of param {index} is {step!r})"
            )
    for key in spec.carried:
        v = state[key]
        if not isinstance(v, torch.Tensor) or v.numel() != 1 or not v.is_floating_point():
            raise RuntimeError(
                f"{_name(opt)}: state[{key!r}] of param {index} must be a one-element tensor, got {v!r}"
            )
    aux = state.get(opt.precision.aux_key(real_view(p).dtype))
    if isinstance(aux, torch.Tensor) and aux.shape == p.shape:
        written.append(aux)
    # Memory is read by address: in a compiled step, the op checks it (OpPlans.get).
    pair = None if torch.compiler.is_compiling() else overlapping(written)
    if pair is not None:
        names = ["the param", *(f"state[{k!r}]" for k in spec.state(group) if state.get(k) is not None)]
        names.append("its precision state")
        raise RuntimeError(
            f"{_name(opt)}: {names[pair[0]]} and {names[pair[1]]} of param {index} share memory: "
            "unsupported operation: more than one element of the written-to tensor refers to a single "
            "memory location. Please clone() the tensor before performing the operation."
        )


def _check_state_tensor(opt, p: torch.Tensor, index: int, key: str, v: Any, state: dict) -> None:
    name = f"{_name(opt)}: state[{key!r}] of param {index}"
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} is a {type(v).__name__}, not a tensor")
    lp, lv = local(p), local(v)
    if lv.device != lp.device:
        raise RuntimeError(f"{name} is on {lv.device}, but the param is on {lp.device}")
    if v.shape != p.shape or lv.shape != lp.shape:
        raise RuntimeError(
            f"{name} has shape {tuple(v.shape)}, but the param has shape {tuple(p.shape)}: the size of "
            "a state tensor must match the size of its param (a state dict of another model?)"
        )
    scale = state.get(absmax_key(key))
    precision = opt.precision
    if scale is not None:  # 8-bit state: uint8 codes and one fp32 absmax per block
        blocks = -(-lp.numel() // QBLOCK)
        if not (precision.quantizes_param(p) and v.dtype == torch.uint8):
            raise RuntimeError(f"{name} holds 8-bit codes ({v.dtype}), which these options do not step")
        if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or scale.numel() != blocks:
            raise RuntimeError(
                f"{_name(opt)}: state[{absmax_key(key)!r}] of param {index} must be {blocks} float32 "
                f"values (one per {QBLOCK} elements), got {scale!r:.80}"
            )
        if scale.device != lp.device or not scale.is_contiguous():
            raise RuntimeError(
                f"{_name(opt)}: state[{absmax_key(key)!r}] of param {index} must be contiguous on {lp.device}"
            )
        return
    if not (v.is_floating_point() or v.is_complex()):
        raise RuntimeError(f"{name} is {v.dtype}, not a floating-point tensor")
    if not torch.compiler.is_compiling() and torch._debug_has_internal_overlap(lv) == 1:
        raise RuntimeError(
            f"{name}: unsupported operation: more than one element of the written-to tensor refers to a "
            "single memory location. Please clone() the tensor before performing the operation."
        )


def counter_device(p: torch.Tensor) -> torch.device:
    """Where a param's step counter lives: its device (a meta param's on the CPU, as torch's)."""
    return torch.device("cpu") if p.is_meta else p.device


def operands_of(opt, p: torch.Tensor, group: dict, memo: dict, occurrence: int):
    """Create missing state as torch would; return the param's state columns (in the
    algorithm's column order, None where absent) and its step counter (or None).

    ``memo`` lives for one plan build: whether a param's state was created by it (a state
    created now is new for every occurrence of a param listed twice, as in torch).
    ``occurrence``: 0 for the first listing of ``p`` in its group, 1 for the second, ..."""
    spec = opt.algorithm
    state = opt.state.get(p, {})  # no entry for a param torch keeps no state for
    if id(p) not in memo:
        if len(state) == 0:
            new = opt._new_state(p, group)
        else:  # keys torch treats as new when absent or None (SGD's momentum_buffer)
            missing = [k for k in spec.optional if k in spec.state(group) and state.get(k) is None]
            new = {k: v for k, v in opt._new_state(p, group).items() if k in missing} if missing else {}
        memo[id(p)] = fresh = bool(new)
        if fresh:  # lazy state initialization, as torch's _init_group
            fresh_state = len(state) == 0
            # what to put back if the step is refused: no entry, an empty one, or the keys' values
            before = ({} if p in opt.state else None) if fresh_state else {k: state.get(k) for k in new}
            memo.setdefault("created", []).append((p, before))
            state = opt.state[p]
            if spec.counter is not None and fresh_state:
                step_dtype, device = spec.step_dtype(group), counter_device(p)
                state[spec.counter] = torch.zeros((), dtype=step_dtype, device=device)
                for key, value in spec.carried.items():  # torch's order: after step, before the tensors
                    state[key] = torch.full((), value, dtype=step_dtype, device=device)
            state.update(new)
    precision = opt.precision
    if precision.active and walkable(p) and (state or precision.needs_state(real_view(p).dtype)):
        state = opt.state[p]
        precision.complete(p, state, spec)
    aux = precision.aux_key(real_view(p).dtype)
    columns = [state.get(name) for name in (*spec.columns, aux)]  # aux None: no precision column
    if spec.counter is not None:
        return columns, state.get(spec.counter)
    if not spec.counts or not walkable(p) or not spec.state(group):
        return columns, None
    key = (id(p), occurrence)
    if memo[id(p)] or key not in opt._taken:  # SGD: a buffer created now has taken no step
        opt._taken[key] = torch.full(
            (), 0.0 if memo[id(p)] else 1.0, dtype=torch.float32, device=counter_device(p)
        )
    return columns, opt._taken[key]


def _build(opt, group: dict, key: tuple | None, grads: StepGrads) -> Plan:
    seen: dict[int, int] = defaultdict(int)
    memo: dict = {}
    rows, others = [], []
    for position, p in enumerate(group["params"]):
        if grads[position] is None:
            continue
        if foreign(p) or foreign_state(opt, p, group):
            others.append(p)
            continue
        occurrence = seen[id(p)]
        seen[id(p)] += 1
        columns, counter = operands_of(opt, p, group, memo, occurrence)
        rows.append((position, [p, *(p if c is None else c for c in columns)], counter, columns))
    written = [[operands[0], *(c for c in columns if c is not None)] for _, operands, _, columns in rows]
    depth = layers(written)
    entries = [
        (position, depth[i], operands, counter) for i, (position, operands, counter, _) in enumerate(rows)
    ]
    plan = build(entries, grads, key, opt.precision)
    plan.foreign = others
    plan.created = memo.get("created", [])
    counter = opt.algorithm.counter
    carried = opt.algorithm.carried
    for bucket in plan.buckets:
        if carried:  # per-tensor scalar state: resident as the counters
            bucket.carried = [opt.state[p][k] for p in bucket.params for k in carried]
            views = iter(bucket.make_carried_resident() or [])
            for p, k in ((p, k) for p in bucket.params for k in carried):
                opt.state[p][k] = next(views, opt.state[p][k])
        views = bucket.make_resident()
        for p, view in zip(bucket.params, views or [], strict=False):
            if counter is None:
                opt._taken[(id(p), 0)] = view
            else:
                opt.state[p][counter] = view
        if bucket.walkable and bucket.precision.quantizes(bucket.dtype):
            _absmax_tables(opt, bucket)
        if bucket.kind == "triton" and bucket.precision.rounds_stochastically(bucket.dtype):
            bucket.seed_list = [opt.state[p][SEED] for p in bucket.params]
            for p, view in zip(bucket.params, bucket.make_seeds_resident() or [], strict=False):
                opt.state[p][SEED] = view
    return plan


def _absmax_tables(opt, bucket: Bucket) -> None:
    """8-bit state: the absmax of each state column of each tensor (None where the state is
    fp32: small or complex params, absent columns) and, for the kernel, their addresses and the
    columns' code maps."""
    spec = opt.algorithm
    state = [opt.state.get(p, {}) for p in bucket.params]
    set_absmax(bucket, [[s.get(absmax_key(key)) for s in state] for key in spec.columns], spec)


def set_absmax(bucket: Bucket, absmax: list[list[torch.Tensor | None]], spec) -> None:
    """Give a bucket its 8-bit state's absmax (per state column, per tensor; None: fp32 state)
    and, for the kernel, their addresses and the columns' code maps."""
    bucket.absmax = absmax
    if bucket.kind == "triton":
        rows = [[0 if a is None else a.data_ptr() for a in row] for row in zip(*bucket.absmax, strict=True)]
        bucket.absmax_ptrs = to_device(torch.tensor(rows, dtype=torch.int64), bucket.device)
        bucket.codebook = to_device(codebook(spec.signed), bucket.device)
