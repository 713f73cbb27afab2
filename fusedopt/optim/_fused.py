"""The step every fused optimizer shares: scan -> (re)plan -> launch, or torch's own step.

A fused optimizer is ``class FusedX(FusedStep, torch.optim.X)``: torch's class keeps the
constructor, validation, ``param_groups``, lazy state layout, ``state_dict`` and hooks; this
mixin replaces ``step``. Per step and param group:

1. *scan* the params (the only per-tensor Python loop on the hot path): grad present, param
   address, grad strides. If that key matches the cached plan, go to 4.
2. *collect*: validate every param with a grad (sparse, dtype, ...) before anything changes.
3. *plan*: create missing state as torch would, split the tensors into buckets of one device,
   dtype and occurrence (a param listed twice is stepped twice, as torch does), and build each
   bucket's device pointer tables.
4. *launch*: one kernel per bucket; the grads' pointer table is refreshed only when autograd
   hands out new grad buffers.

Groups whose flags ask for torch's own implementation (``differentiable=True``,
``fused=False`` or ``foreach=True``) run torch's step unchanged.

Beyond torch: ``max_grad_norm`` clips the global L2 norm of all the optimizer's grads inside
the step (one reduction pass, then the step kernel multiplies each grad by the clip
coefficient as it reads it: the grads are never rewritten), and GradScaler's ``grad_scale`` /
``found_inf`` are honoured in the kernel whatever ``fused`` says.
"""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict, defaultdict
from typing import Any

import torch

from fusedopt._multi_tensor import (
    TL_DTYPE,
    DeviceScalars,
    TensorTable,
    compute_dtype,
    dense_copy,
    runs_triton,
    shares_dense_layout,
)
from fusedopt.clip import NormSource, clip_coefficient, total_norm, traced_norm


def real_view(t: torch.Tensor) -> torch.Tensor:
    """Complex tensors are stepped as their real view (as torch.optim does)."""
    return torch.view_as_real(t) if t.is_complex() else t


class Bucket:
    """Tensors of one device, storage dtype and occurrence layer, stepped by one launch.

    ``columns[0]`` are the params, ``columns[1:]`` the state operands of the kernel (real views);
    ``positions`` index the step's list of grads.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, sparse: bool):
        self.device = device
        self.dtype = dtype
        # "triton": our kernel; "reference": the same algorithm in plain torch (CPU without the
        # interpreter, other devices); "torch": torch.optim's own functional (sparse grads or
        # integer params, where an optimizer supports them).
        if sparse or dtype not in TL_DTYPE:
            self.kind = "torch"
        else:
            self.kind = "triton" if runs_triton(device) else "reference"
        self.positions: list[int] = []
        self.columns: list[list[torch.Tensor]] = []
        self.params: list[torch.Tensor] = []
        self.extra: list[Any] = []  # per-tensor optimizer data (Adam: step tensor, SGD: fresh flag)
        self.unique = True  # no param of this bucket is listed twice in its group
        self.complex = False
        self.irregular: list[int] = []  # tensors whose operands do not share one dense layout
        self.table: TensorTable | None = None
        self.scalars = DeviceScalars(device)  # the group's hyper-parameters on this device

    def add(self, position: int, operands: list[torch.Tensor], extra: Any) -> None:
        if not self.columns:
            self.columns = [[] for _ in operands]
        self.positions.append(position)
        self.params.append(operands[0])
        for column, t in zip(self.columns, operands, strict=True):
            column.append(real_view(t))
        self.extra.append(extra)
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

    def _dynamic(self, grads: StepGrads) -> torch.Tensor:
        # The grads' table changes only when the group's grad addresses do.
        return self.table.dynamic(grads.ptrs, lambda: _dynamic_rows(self.grads(grads)))

    def norm_source(self, grads: StepGrads) -> NormSource | None:
        """This bucket's grads as a source for the fused global norm (None: take it with torch)."""
        if self.table is None:
            return None
        return NormSource(self.table, self._dynamic(grads), 1, self.table.dynamic_aligned, self.dtype)

    def launch(self, grads: StepGrads, kernel, amp: dict, *args, **constexprs) -> None:
        """One launch of an optimizer kernel over this bucket's tensors:

        ``kernel(ptrs, grad_ptrs, meta, owner, *args, grad_scale, found_inf, clip_coef,
        DTYPE, COMPUTE, HAS_GRAD_SCALE, HAS_FOUND_INF, HAS_CLIP, **constexprs)``, the three
        operands every step kernel shares taken from ``amp`` (an absent one is replaced by
        ``args[0]`` and never read). Tensors with mismatched layouts go through dense copies.
        """
        optional = [amp["grad_scale"], amp["found_inf"], amp["clip_coef"]]
        operands = [*args, *(args[0] if t is None else t for t in optional)]
        constexprs.update(
            DTYPE=TL_DTYPE[self.dtype],
            COMPUTE=TL_DTYPE[compute_dtype(self.dtype)],
            HAS_GRAD_SCALE=optional[0] is not None,
            HAS_FOUND_INF=optional[1] is not None,
            HAS_CLIP=optional[2] is not None,
        )
        if self.table is not None:
            self.table.launch(kernel, self._dynamic(grads), *operands, **constexprs)
            return
        mine = self.grads(grads)
        # Stage each distinct tensor once (a column may repeat another: SGD without momentum).
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


# Buckets of the compiled path's ops, keyed by every operand's address and the grads' strides
# (what a plan depends on); a compiled training loop passes the same tensors every step.
_OP_BUCKETS: OrderedDict[tuple, list[Bucket]] = OrderedDict()
_OP_BUCKETS_KEPT = 8


def op_buckets(
    columns: list[list[torch.Tensor]], grads: list[torch.Tensor], extra: list
) -> tuple[StepGrads, list[Bucket]]:
    """Buckets (one per device and dtype) for a custom op's lists: ``columns[0]`` the params,
    the others their state operands; ``extra[i]`` is tensor i's per-tensor data."""
    step_grads = StepGrads(grads)
    step_grads.ptrs = tuple(g.data_ptr() for g in grads)
    key = (tuple(t.data_ptr() for c in columns for t in c), tuple(g.stride() for g in grads))
    buckets = _OP_BUCKETS.get(key)
    if buckets is None:
        by_kind: dict[tuple, Bucket] = {}
        for i, operands in enumerate(zip(*columns, strict=True)):
            where = (operands[0].device, operands[0].dtype, False)
            bucket = by_kind.get(where) or by_kind.setdefault(where, Bucket(*where))
            bucket.add(i, list(operands), None)
        buckets = list(by_kind.values())
        for bucket in buckets:
            bucket.finish(step_grads)
        if all(not b.irregular for b in buckets):
            _OP_BUCKETS[key] = buckets
            if len(_OP_BUCKETS) > _OP_BUCKETS_KEPT:
                _OP_BUCKETS.popitem(last=False)
    else:
        _OP_BUCKETS.move_to_end(key)
    for bucket in buckets:
        bucket.extra = [extra[i] for i in bucket.positions]
    return step_grads, buckets


class GroupPlan:
    def __init__(self, key: tuple | None, buckets: list[Bucket]):
        self.key = key
        self.buckets = buckets
        self.cacheable = key is not None and all(not b.irregular for b in buckets)


class StepGrads(list):
    """The grads of a group's params that have one, in order, and their addresses."""

    ptrs: tuple = ()


def _scan(params: list[torch.Tensor]) -> tuple[tuple | None, StepGrads]:
    """The hot-path loop: grads of a group and the key its cached plan must match."""
    key: list = []
    grads = StepGrads()
    ptrs = []
    try:
        for p in params:
            g = p.grad
            if g is None:
                key.append(None)
                continue
            key.append((p.data_ptr(), g.stride()))
            grads.append(g)
            ptrs.append(g.data_ptr())
    except RuntimeError:  # sparse grads have no strides: the full checks will explain
        return None, StepGrads(p.grad for p in params if p.grad is not None)
    grads.ptrs = tuple(ptrs)
    return tuple(key), grads


def _torch_base(cls: type) -> type:
    return next(
        c for c in cls.__mro__ if issubclass(c, torch.optim.Optimizer) and not issubclass(c, FusedStep)
    )


def _grads_of(groups: list[dict]) -> list[torch.Tensor]:
    return [p.grad for g in groups for p in g["params"] if p.grad is not None]


def _not_traceable(p: torch.Tensor) -> bool:
    return p.grad.is_sparse or p.is_complex() or p.dtype not in TL_DTYPE


class FusedStep:
    """Mixin that gives a ``torch.optim`` class a multi-tensor Triton step.

    The constructor is the torch class's, plus one keyword-only extension:

    Args:
        max_grad_norm (float, optional): clip the global L2 norm of the gradients of all param
            groups to this value before each step, as ``torch.nn.utils.clip_grad_norm_(params,
            max_grad_norm)`` followed by ``step()`` would (with a GradScaler, the norm of the
            unscaled gradients, as in torch's AMP recipe), but without rewriting the gradients:
            one reduction pass, then the step kernel applies the coefficient. Default: None.
    """

    def __init__(self, *args, max_grad_norm: float | None = None, **kwargs):
        if max_grad_norm is not None and not (
            isinstance(max_grad_norm, int | float) and 0.0 < max_grad_norm < math.inf
        ):
            raise ValueError(f"Invalid max_grad_norm value: {max_grad_norm}")
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        super().__init__(*args, **kwargs)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # inspect.signature(FusedX) is torch's signature plus the keyword-only max_grad_norm.
        base = inspect.signature(_torch_base(cls))
        extra = inspect.Parameter(
            "max_grad_norm", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="float | None"
        )
        cls.__signature__ = base.replace(parameters=[*base.parameters.values(), extra])

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "max_grad_norm": self.max_grad_norm}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("max_grad_norm", None)

    # GradScaler hands grad_scale / found_inf to the step (unscale and skip in the kernel, no
    # host sync) whenever every group runs our step; torch's own step (a group with fused=False,
    # foreach=True or differentiable=True) needs GradScaler to unscale the grads itself.
    @property
    def _step_supports_amp_scaling(self) -> bool:
        return not any(self._uses_torch_impl(g) for g in self.param_groups)

    @_step_supports_amp_scaling.setter
    def _step_supports_amp_scaling(self, value: bool) -> None:
        pass  # torch's __init__ sets it for fused=True; the property above decides

    # Subclass hooks -------------------------------------------------------------------------

    def _check(self, p: torch.Tensor, g: torch.Tensor, group: dict) -> None:
        """Raise if this param cannot be stepped; must not change anything."""
        raise NotImplementedError

    def _operands(self, p: torch.Tensor, group: dict, memo: dict) -> tuple[list[torch.Tensor], Any]:
        """Create missing state like torch; return the kernel's state operands and per-tensor data.

        ``memo`` lives for one plan build: what a param looked like before its first occurrence.
        """
        raise NotImplementedError

    def _run(self, group: dict, bucket: Bucket, grads: StepGrads, amp: dict) -> None:
        raise NotImplementedError

    def _step_op(self, group: dict, params: list, grads: list, operands: list, amp: dict) -> None:
        """Call the algorithm's custom op (the step ``torch.compile`` traces); ``operands[i]`` is
        ``_operands()``'s answer for ``params[i]``."""
        raise NotImplementedError

    def _before_step(self) -> None:
        """Checks the torch class makes at the top of its step."""

    # Shared machinery -----------------------------------------------------------------------

    def _uses_torch_impl(self, group: dict) -> bool:
        return bool(group["differentiable"] or group["foreach"] or group["fused"] is False)

    def _plans(self) -> dict[int, GroupPlan]:
        return self.__dict__.setdefault("_fused_plans", {})

    def step(self, closure=None):
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the loss.
        """
        self._before_step()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ours = [(i, g) for i, g in enumerate(self.param_groups) if not self._uses_torch_impl(g)]
        theirs = [g for g in self.param_groups if self._uses_torch_impl(g)]
        amp = {"grad_scale": getattr(self, "grad_scale", None), "found_inf": getattr(self, "found_inf", None)}
        if torch.compiler.is_compiling():
            self._traced_step([g for _, g in ours], theirs, amp)
            return loss
        # The norm fusedopt.GradScaler's inf check took just before this step (it then sets
        # found_inf), never one left over from a step that did not happen.
        pending = self.__dict__.pop("_pending_norm", None)
        if amp["found_inf"] is None:
            pending = None
        with torch.no_grad():
            planned = self._plan_groups(ours)
            amp["clip_coef"] = (
                None
                if self.max_grad_norm is None
                else self._clip(planned, theirs, amp["grad_scale"], pending)
            )
            for group, plan, grads in planned:
                for bucket in plan.buckets:
                    self._run(group, bucket, grads, amp)
        if theirs:
            self._torch_step(theirs)
        return loss

    def _find_inf(self, grad_scale: torch.Tensor) -> torch.Tensor | None:
        """1.0 if any grad is inf or NaN, else 0.0 (float32, on the first grad's device): one
        read-only pass, the global-norm pass of ``max_grad_norm`` (kept for the coming step,
        which then reads the grads once more) or an infinity norm. None where torch's own check
        must run instead (sparse grads or integer params, which torch's functional steps)."""
        self.__dict__.pop("_pending_norm", None)
        with torch.no_grad():
            planned = self._plan_groups(list(enumerate(self.param_groups)))
            if any(b.kind == "torch" for _, plan, _ in planned for b in plan.buckets):
                return None
            sources, leftovers = self._norm_sources(planned)
            if not sources and not leftovers:  # no grads: nothing found
                return torch.zeros((), dtype=torch.float32, device=grad_scale.device)
            if self.max_grad_norm is None:
                total = total_norm(sources, leftovers, math.inf, grad_scale)
            else:
                # Finite grads whose squares overflow fp32 (|g| ~ 1e19 after unscaling) count as
                # non-finite here; torch's clip would scale them by 0 instead.
                total = self._pending_norm = total_norm(sources, leftovers, 2.0, grad_scale, exact=True)
            return torch.isfinite(total).logical_not().float()

    def _traced_step(self, ours: list[dict], theirs: list[dict], amp: dict) -> None:
        """The step as ``torch.compile`` traces it: lazy state as eager, then one custom op per
        group (hyper-parameters as op arguments: a tensor lr is a graph input, so changing it
        never recompiles). What the ops do not take (sparse or complex grads, non-float dtypes,
        a param listed twice) runs the eager step outside the graph."""
        groups = []
        for group in ours:
            params = [p for p in group["params"] if p.grad is not None]
            if any(_not_traceable(p) for p in params) or len({id(p) for p in params}) != len(params):
                self._eager_step()
                return
            groups.append((group, params))
        for group, params in groups:  # validate everything before anything changes
            for p in params:
                self._check(p, p.grad, group)
        with torch.no_grad():
            amp["clip_coef"] = None
            torch_grads = _grads_of(theirs)
            grads = [p.grad for _, params in groups for p in params] + torch_grads
            if self.max_grad_norm is not None and grads:
                total = traced_norm(grads, 2.0, amp["grad_scale"], exact=True)
                amp["clip_coef"] = self._coefficient(total, torch_grads)
            for group, params in groups:
                memo: dict = {}
                operands = [self._operands(p, group, memo) for p in params]
                if params:
                    self._step_op(group, params, [p.grad for p in params], operands, amp)
        if theirs:
            self._torch_step(theirs)

    @torch.compiler.disable
    def _eager_step(self) -> None:
        FusedStep.step(self)  # the mixin's own step: torch's step hooks already ran

    def _norm_sources(self, planned: list) -> tuple[list[NormSource], list[torch.Tensor]]:
        sources, leftovers = [], []
        for _, plan, grads in planned:
            for bucket in plan.buckets:
                source = bucket.norm_source(grads)
                if source is not None:
                    sources.append(source)
                else:
                    leftovers.extend(bucket.grads(grads))
        return sources, leftovers

    def _clip(
        self,
        planned: list,
        theirs: list[dict],
        grad_scale: torch.Tensor | None,
        total: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """The clip coefficient of ``max_grad_norm`` over every group's grads, on the device.

        ``total``: the norm :meth:`_find_inf` already took for this step (``fusedopt.GradScaler``).
        """
        torch_grads = _grads_of(theirs)
        if total is None:
            sources, leftovers = self._norm_sources(planned)
            if not sources and not leftovers and not torch_grads:
                return None
            total = total_norm(sources, leftovers + torch_grads, 2.0, grad_scale, exact=True)
        return self._coefficient(total, torch_grads)

    def _coefficient(self, total: torch.Tensor, torch_grads: list[torch.Tensor]) -> torch.Tensor:
        """``max_grad_norm``'s clip coefficient for the global norm ``total``. ``torch_grads`` (of
        groups that run torch's step, which reads them) are clipped in place."""
        coef = clip_coefficient(total, self.max_grad_norm)
        if torch_grads:
            torch._foreach_mul_(torch_grads, coef)
        return coef

    def _plan_groups(self, groups: list[tuple[int, dict]]) -> list[tuple[dict, GroupPlan, list]]:
        plans = self._plans()
        scans = []
        for i, group in groups:
            key, grads = _scan(group["params"])
            plan = plans.get(i)
            scans.append((i, group, key, grads, plan if plan is not None and plan.key == key else None))
        # Validate every group that needs a new plan before any state is created or changed.
        entries = {i: self._collect(group) for i, group, _, _, plan in scans if plan is None}
        out = []
        for i, group, key, grads, plan in scans:
            if plan is None:
                plan = self._build(group, entries[i], key, grads)
                if plan.cacheable:
                    plans[i] = plan
                else:
                    plans.pop(i, None)
            out.append((group, plan, grads))
        return out

    def _collect(self, group: dict) -> list[torch.Tensor]:
        params = []
        for p in group["params"]:
            if p.grad is not None:
                self._check(p, p.grad, group)
                params.append(p)
        return params

    def _build(self, group: dict, params: list[torch.Tensor], key: tuple | None, grads: list) -> GroupPlan:
        seen: dict[int, int] = defaultdict(int)
        memo: dict = {}
        buckets: dict[tuple, Bucket] = {}
        for position, p in enumerate(params):
            layer = seen[id(p)]
            seen[id(p)] += 1
            operands, extra = self._operands(p, group, memo)
            where = (layer, p.device, real_view(p).dtype, grads[position].is_sparse)
            bucket = buckets.get(where)
            if bucket is None:
                bucket = buckets[where] = Bucket(*where[1:])
            bucket.add(position, [p, *operands], extra)
        ordered = [buckets[k] for k in sorted(buckets, key=lambda k: k[0])]
        for bucket in ordered:
            bucket.unique = all(seen[id(p)] == 1 for p in bucket.params)
            bucket.finish(grads)
        return GroupPlan(key, ordered)

    def _torch_step(self, groups: list[dict]) -> None:
        """Torch's own step, over the groups whose flags ask for it."""
        everything = self.param_groups
        self.param_groups = groups
        try:
            super().step()
        finally:
            self.param_groups = everything

    def load_state_dict(self, state_dict: dict) -> None:
        self._plans().clear()
        super().load_state_dict(state_dict)
        self._plans().clear()

    def add_param_group(self, param_group: dict) -> None:
        self._plans().clear()
        super().add_param_group(param_group)
