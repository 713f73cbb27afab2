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
from fusedopt.optim._quantize import absmax_key, codebook


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
    """The grads of a group's params that have one, in order, and their addresses."""

    ptrs: tuple = ()


def scan(params: list[torch.Tensor], shards: bool = False) -> tuple[tuple | None, StepGrads]:
    """The hot-path loop: grads of a group and the key its cached plan must match, over the
    local shards of DTensors (what the kernels read; ``shards``: the group may hold some)."""
    key: list = []
    grads = StepGrads()
    ptrs = []
    try:
        for p in params:
            g = p.grad
            if g is None:
                key.append(None)
                continue
            if shards:
                g, p = local(g), local(p)
            key.append((p.data_ptr(), g.stride()))
            grads.append(g)
            ptrs.append(g.data_ptr())
    except RuntimeError:  # sparse grads have no strides: the full checks will explain
        return None, StepGrads(local(p.grad) for p in params if p.grad is not None)
    # A DTensor owns no memory (its data_ptr() is 0): seen, scan its local shards instead. (An
    # empty plain tensor's may be 0 too: then this only costs a second look.)
    if not shards and 0 in ptrs and any_dtensor(params):
        return scan(params, shards=True)
    grads.ptrs = tuple(ptrs)
    return tuple(key), grads


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
        self.seed_list: list[torch.Tensor] = []  # stochastic rounding's seeds (0-d int64), if it rounds
        self.seeds: torch.Tensor | None = None  # one tensor whose elements are the seeds
        # 8-bit state: each state column's absmax, per tensor (None: fp32 state), their addresses
        # (int64 [T, S], 0 for None) and the columns' code maps (float32 [S, 2, 256]).
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
        return self.table.dynamic(grads.ptrs, lambda: _dynamic_rows(self.grads(grads)))

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
    """The buckets of one group for one scan key (None: not cacheable) and the algorithm's
    switches it was built for (a switch that adds state, e.g. amsgrad, needs a new plan)."""

    def __init__(self, key: tuple | None, buckets: list[Bucket]):
        self.key = key
        self.buckets = buckets
        self.flags: dict | None = None  # set by plan_groups
        self.cacheable = key is not None and all(not b.irregular for b in buckets)


def build(
    entries: list[tuple[int, int, list[torch.Tensor], Any]],
    grads: StepGrads,
    key: tuple | None,
    precision: Precision = PLAIN,
) -> Plan:
    """A plan from ``(position, layer, operands, counter)`` entries: ``operands`` are the param
    and its state columns, ``position`` indexes ``grads``."""
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
    repeated = {id(operands[0]) for _, layer, operands, _ in entries if layer > 0}
    for bucket in ordered:
        bucket.unique = not any(id(p) in repeated for p in bucket.params)
        bucket.finish(grads)
    return Plan(key, ordered)


class OpPlans:
    """Plans of the compiled step's op, owned by one optimizer and keyed by every operand's
    address and the grads' strides (a compiled training loop passes the same tensors every
    step). Reached from the op through a weak registry: it dies with its optimizer."""

    KEPT = 4

    def __init__(self):
        self.plans: dict[tuple, Plan] = {}

    def get(self, columns: list[list[torch.Tensor]], grads: StepGrads, precision: Precision = PLAIN) -> Plan:
        key = (tuple(t.data_ptr() for c in columns for t in c), tuple(g.stride() for g in grads), precision)
        plan = self.plans.get(key)
        if plan is None:
            entries = [(i, 0, list(operands), None) for i, operands in enumerate(zip(*columns, strict=True))]
            plan = build(entries, grads, key, precision)
            if plan.cacheable:
                if len(self.plans) >= self.KEPT:
                    self.plans.pop(next(iter(self.plans)))
                self.plans[key] = plan
        return plan


# Plans of an optimizer's groups ---------------------------------------------------------------


def plan_groups(opt, groups: list[tuple[int, dict]]) -> list[tuple[dict, Plan, StepGrads]]:
    """The plan and grads of each ``(index, group)`` of ``opt`` (a FusedStep): cached plans
    whose scan key matches, new ones for the others, after checking their params."""
    scans = []
    for i, group in groups:
        key, grads = scan(group["params"])
        flags = opt.algorithm.flag_values(group)
        plan = opt._plans.get(i)
        valid = plan is not None and plan.key == key and plan.flags == flags
        scans.append((i, group, key, grads, flags, plan if valid else None))
    # Check every group that needs a new plan before any state is created or changed.
    for _, group, _, _, _, plan in scans:
        if plan is None:
            for p in group["params"]:
                if p.grad is not None:
                    check_param(p, p.grad)
                    opt._check(p, p.grad, group)
                    check_state(opt, p, group)
    out = []
    for i, group, key, grads, flags, plan in scans:
        if plan is None:
            plan = _build(opt, group, key, grads)
            plan.flags = flags
            if plan.cacheable:
                opt._plans[i] = plan
            else:
                opt._plans.pop(i, None)
        out.append((group, plan, grads))
    return out


def check_state(opt, p: torch.Tensor, group: dict) -> None:
    """Refuse, as torch does (``KeyError``), a param whose state lacks a key the group's options
    need (e.g. amsgrad switched on after the first steps): never step a missing buffer."""
    state = opt.state.get(p)
    if state and walkable(p):
        for key in opt.algorithm.state(group):
            if key not in state:
                raise KeyError(key)


def operands_of(opt, p: torch.Tensor, group: dict, memo: dict, layer: int):
    """Create missing state as torch would; return the param's state columns (in the
    algorithm's column order, None where absent) and its step counter (or None).

    ``memo`` lives for one plan build: whether a param's state was created by it (a state
    created now is new for every occurrence of a param listed twice, as in torch)."""
    spec = opt.algorithm
    state = opt.state.get(p, {})  # no entry for a param torch keeps no state for
    if id(p) not in memo:
        new = opt._new_state(p, group) if len(state) == 0 else {}
        memo[id(p)] = fresh = bool(new)
        if fresh:  # lazy state initialization, as torch's _init_group
            state = opt.state[p]
            if spec.counter is not None:
                state[spec.counter] = torch.zeros((), dtype=spec.step_dtype(group), device=p.device)
            state.update(new)
    precision = opt.precision
    if precision.active and walkable(p) and (state or precision.needs_state(real_view(p).dtype)):
        state = opt.state[p]
        precision.complete(p, state, spec)
    aux = precision.aux_key(real_view(p).dtype)
    columns = [state.get(name) for name in (*spec.columns, aux)]  # aux None: no precision column
    if spec.counter is not None:
        return columns, state.get(spec.counter)
    if not walkable(p) or not spec.state(group):
        return columns, None
    key = (id(p), layer)
    if memo[id(p)] or key not in opt._taken:  # SGD: a buffer created now has taken no step
        opt._taken[key] = torch.full((), 0.0 if memo[id(p)] else 1.0, dtype=torch.float32, device=p.device)
    return columns, opt._taken[key]


def _build(opt, group: dict, key: tuple | None, grads: StepGrads) -> Plan:
    seen: dict[int, int] = defaultdict(int)
    memo: dict = {}
    entries = []
    params = [p for p in group["params"] if p.grad is not None]
    for position, p in enumerate(params):
        layer = seen[id(p)]
        seen[id(p)] += 1
        columns, counter = operands_of(opt, p, group, memo, layer)
        entries.append((position, layer, [p, *(p if c is None else c for c in columns)], counter))
    plan = build(entries, grads, key, opt.precision)
    counter = opt.algorithm.counter
    for bucket in plan.buckets:
        views = bucket.make_resident()
        for p, view in zip(bucket.params, views or [], strict=False):
            if counter is None:
                opt._taken[(id(p), bucket.layer)] = view
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
