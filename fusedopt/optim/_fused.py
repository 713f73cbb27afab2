"""The step every fused optimizer shares: scan -> (re)plan -> run each bucket, or torch's step.

A fused optimizer is ``class FusedX(FusedStep, torch.optim.X)`` with an ``algorithm`` spec
(:class:`fusedopt.optim._step.Algorithm`): torch's class keeps the constructor, validation,
``param_groups``, ``state_dict`` and hooks; this mixin replaces ``step``. Per step and group:

1. *scan* the params (the only per-tensor Python loop on the hot path): grad present, param
   address, grad strides. If that key matches the cached plan, go to 4.
2. *check* every param with a grad (sparse, dtype, ...) before anything changes.
3. *plan* (:mod:`fusedopt.optim._plan`): create missing state as torch would, bucket the tensors
   by device, dtype and occurrence, build their pointer tables.
4. *run* each bucket (:func:`fusedopt.optim._step.run_bucket`): the one implementation of the
   step, which ``torch.compile`` reaches through the ``fusedopt::step_`` op instead.

Groups with ``differentiable=True`` run torch's step unchanged (autograd through the step is
torch's); torch's speed hints ``foreach`` and ``fused=False`` choose among torch's own
implementations and change nothing here: the kernel runs (docs/options.md). ``max_grad_norm`` and
GradScaler are handled in :mod:`fusedopt.optim._amp`. Step counters live on the param's
device, so no step reads anything on the host.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import weakref

import torch

from fusedopt._dist import any_dtensor
from fusedopt._multi_tensor import runs_triton
from fusedopt.optim import _amp
from fusedopt.optim._plan import (
    Amp,
    Plan,
    check_group,
    counter_device,
    foreign,
    operands_of,
    plan_groups,
    walkable,
    walkable_dtype,
)
from fusedopt.optim._precision import (
    PLAIN,
    SEED,
    Precision,
    exact_entries,
    portable,
    restore,
    torch_state_dict,
)
from fusedopt.optim._quantize import absmax_key
from fusedopt.optim._state import OptimizerState
from fusedopt.optim._step import Algorithm, new_op_plans, run_bucket, traced_step
from fusedopt.optim._torch_compat import check_capturable_device, profiled_step

_EXTENSIONS = (  # (name, default, annotation) of the keyword-only arguments torch's classes lack
    ("max_grad_norm", None, "float | None"),
    ("master_weights", False, "bool"),
    ("kahan_summation", False, "bool"),
    ("stochastic_rounding", False, "bool"),
    ("state_dtype", None, "torch.dtype | str | None"),
)


EXTENSIONS = frozenset(name for name, _, _ in _EXTENSIONS)


def check_max_grad_norm(value) -> float | None:
    """``max_grad_norm`` as a float (None: no clipping); a positive finite number, else torch's
    style of ValueError."""
    if value is not None and not (
        isinstance(value, int | float) and not isinstance(value, bool) and 0.0 < value < math.inf
    ):
        raise ValueError(f"Invalid max_grad_norm value: {value}")
    return None if value is None else float(value)


def _clone(v):
    return v.clone() if isinstance(v, torch.Tensor) else v


class _Notify:
    """``optimizer.state``'s change notice: tells its optimizer (a weak reference, so the state
    keeps no optimizer alive)."""

    __slots__ = ("_ref",)

    def __init__(self, owner):
        self._ref = weakref.ref(owner)

    @property
    def owner(self):
        return self._ref()

    def __call__(self) -> None:
        owner = self._ref()
        if owner is not None:
            owner._state_changed()


def _torch_base(cls: type) -> type:
    return next(
        c for c in cls.__mro__ if issubclass(c, torch.optim.Optimizer) and not issubclass(c, FusedStep)
    )


class FusedStep:
    """Mixin that gives a ``torch.optim`` class a multi-tensor Triton step.

    The constructor is the torch class's, plus keyword-only extensions:

    Args:
        max_grad_norm (float, optional): clip the global L2 norm of the gradients of all param
            groups to this value before each step, as ``torch.nn.utils.clip_grad_norm_(params,
            max_grad_norm)`` followed by ``step()`` would (with a GradScaler, the norm of the
            unscaled gradients, as in torch's AMP recipe), but without rewriting the gradients:
            one reduction pass, then the step kernel applies the coefficient. Default: None.
        master_weights (bool): keep an fp32 copy of each bf16/fp16 param (state
            ``"master_weight"``), update it and write the param as its rounding. Default: False.
        kahan_summation (bool): keep a compensation buffer in each bf16/fp16 param's dtype
            (``"kahan_compensation"``) that carries the rounding error to the next step.
        stochastic_rounding (bool): round bf16/fp16 stores (params, and state stored in
            bf16/fp16) up or down at random, unbiased (Philox keyed by ``"rounding_seed"``).
        state_dtype (torch.dtype or str, optional): storage dtype of the algorithm's state:
            None (the param's dtype, fp32 with ``master_weights``), ``torch.float32``,
            ``torch.bfloat16``, ``torch.float16``, or ``"int8"``: blockwise 8-bit state for
            params of at least 4,096 elements (``uint8`` codes under torch's key, e.g.
            ``"exp_avg"``, and one fp32 absmax per 256 elements under ``"exp_avg_absmax"``;
            smaller params keep fp32 state; about 2 bytes per param for Adam). The math stays
            fp32.

    At most one of ``master_weights``, ``kahan_summation`` and ``stochastic_rounding``; they do
    nothing for fp32/fp64 params. See :mod:`fusedopt.optim._precision`.
    """

    algorithm: Algorithm

    def __init__(
        self,
        *args,
        max_grad_norm: float | None = None,
        master_weights: bool = False,
        kahan_summation: bool = False,
        stochastic_rounding: bool = False,
        state_dtype: torch.dtype | str | None = None,
        **kwargs,
    ):
        if isinstance(max_grad_norm, torch.Tensor) and max_grad_norm.numel() == 1:
            max_grad_norm = max_grad_norm.item()  # read once, as a number
        self.max_grad_norm = check_max_grad_norm(max_grad_norm)
        self.precision = Precision(
            bool(master_weights), bool(kahan_summation), bool(stochastic_rounding), state_dtype
        )
        super().__init__(*args, **kwargs)
        self._own_state()
        if self.precision.active:  # state torch's constructor made (Adagrad's), in our options
            for group in self.param_groups:
                for p in group["params"]:
                    state = self.state.get(p)
                    if state and walkable_dtype(p):
                        state.update(self._new_state(p, group))
                        self.precision.complete(p, state, self.algorithm)
        self._reset_plans(counters=True)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # inspect.signature(FusedX) is torch's signature plus our keyword-only extensions.
        base = inspect.signature(_torch_base(cls))
        extra = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
            for name, default, annotation in _EXTENSIONS
        ]
        cls.__signature__ = base.replace(parameters=[*base.parameters.values(), *extra])

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "max_grad_norm": self.max_grad_norm, "precision": self.precision}

    def _patch_step_function(self) -> None:
        """torch's (its constructor and ``__setstate__`` call it): the class's ``step`` wrapped
        once with the step hooks, as torch wraps it, but entering the profiler range only while
        a profiler records (:func:`fusedopt.optim._torch_compat.profiled_step`)."""
        self._zero_grad_profile_name = f"Optimizer.zero_grad#{type(self).__name__}.zero_grad"
        if not getattr(type(self).step, "hooked", None):
            type(self).step = profiled_step(type(self).step)
            type(self).step.hooked = True

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("max_grad_norm", None)
        self.__dict__.setdefault("precision", PLAIN)
        self._own_state()
        self._reset_plans(counters=True)

    def _reset_plans(self, counters: bool = False) -> None:
        """Forget every plan (rebuilt from params and state on the next step) and, with
        ``counters``, the private counters (derived from the state again); put the step
        counters of our groups on their param's device."""
        self._plans: dict[int, Plan] = {}
        if counters:
            self._taken: dict[tuple[int, int], torch.Tensor] = {}  # private counters (counter=None)
            self._op_plans, self._op_handle = new_op_plans()
        key = self.algorithm.counter
        with self._own_writes():
            for group in self.param_groups:
                if key is None or self._uses_torch_impl(group):
                    continue
                for p in group["params"]:
                    step = self.state.get(p, {}).get(key)
                    if isinstance(step, torch.Tensor) and step.device != counter_device(p):
                        self.state[p][key] = step = step.to(counter_device(p))
                    for name in self.algorithm.carried:  # kept as the counter (torch's load casts them)
                        v = self.state.get(p, {}).get(name)
                        if isinstance(step, torch.Tensor) and isinstance(v, torch.Tensor) and v.numel() == 1:
                            self.state[p][name] = v.to(step.device, step.dtype).reshape(())

    # optimizer.state ------------------------------------------------------------------------

    def _own_state(self) -> None:
        """Make ``self.state`` (torch's ``defaultdict(dict)``, same keys and values) one that
        drops the launch plans holding its tensors whenever an entry is replaced
        (:mod:`._state`): after torch's constructor, ``__setstate__`` (``load_state_dict``,
        unpickling, a copy) and before each eager step (``optimizer.state = ...`` by hand). A
        plain attribute, not a property: ``torch.compile`` traces optimizers' ``state`` as
        torch's."""
        state = self.__dict__.get("state")
        if type(state) is not OptimizerState or getattr(state.on_change, "owner", None) is not self:
            self.__dict__["state"] = OptimizerState(_Notify(self), state or {})
            self._state_changed()

    def _state_changed(self) -> None:
        """An entry of ``state`` was replaced (not by the step itself): no plan may keep the
        tensors it held, in use or alive."""
        if self.__dict__.get("_writing", 0) or "_plans" not in self.__dict__:
            return
        self._plans = {}
        self._op_plans.plans.clear()

    @contextlib.contextmanager
    def _own_writes(self):
        """The step's own writes to ``state`` (lazy state, counters made resident): plans
        being built hold the new tensors, none is dropped."""
        self.__dict__["_writing"] = self.__dict__.get("_writing", 0) + 1
        try:
            yield
        finally:
            self.__dict__["_writing"] -= 1

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

    def _before_step(self) -> None:
        """Checks the torch class makes at the top of its step."""

    def _refuse_integer(self, p: torch.Tensor) -> None:
        """For algorithms torch has no integer path for: refuse (before anything changes)."""
        if not walkable_dtype(p):
            raise NotImplementedError(
                f"{type(self).__name__} steps floating-point or complex params (fp32, fp64, fp16, bf16); "
                f"got {p.dtype}"
            )

    def _check_dense(self, p: torch.Tensor, g: torch.Tensor, group: dict) -> None:
        """The ``_check`` of torch's classes that take dense float grads and a ``capturable``
        flag (RMSprop, Adamax, RAdam, NAdam): a sparse grad (torch's message), an integer
        param, ``capturable=True`` on a device that cannot capture."""
        if g.is_sparse:
            raise RuntimeError(f"{_torch_base(type(self)).__name__} does not support sparse gradients")
        self._refuse_integer(p)
        if group["capturable"]:
            check_capturable_device(p)

    def _new_state(self, p: torch.Tensor, group: dict) -> dict[str, torch.Tensor]:
        """The state torch's ``_init_group`` creates for a param with a grad and no state yet
        (the step counter excluded), in torch's key order: the algorithm's, for params our
        kernel steps (torch's own functional creates the others' state, as SGD's)."""
        if not walkable(p):
            return {}
        return {key: init(p) for key, init in self.algorithm.state(group).items()}

    # The step -------------------------------------------------------------------------------

    def _uses_torch_impl(self, group: dict) -> bool:
        """Whether a group runs torch's own step: ``differentiable=True`` (autograd through the
        step). ``foreach`` and ``fused`` pick among torch's implementations: ours runs for any
        value of them (``fused=True`` also makes torch's device and dtype checks)."""
        return bool(group["differentiable"])

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
        amp = Amp(getattr(self, "grad_scale", None), getattr(self, "found_inf", None))
        if torch.compiler.is_compiling():
            self._traced_step([g for _, g in ours], theirs, amp)
            return loss
        self._own_state()
        spec = self.algorithm
        with torch.no_grad():
            planned = plan_groups(self, ours)
            created = [entry for _, plan, _ in planned for entry in plan.created]
            for _, plan, _ in planned:
                plan.created = []  # made by this step's new plans only: a cached plan's are kept
            amp.clip_coef = self._clip_coefficient(planned, theirs, amp)
            others = [(group, plan.foreign) for group, plan, _ in planned if plan.foreign]
            if others:
                try:
                    self._foreign_step(others, amp)
                except BaseException:
                    self._undo_created(created)
                    raise
            for group, plan, grads in planned:
                scalars = spec.scalar_values(group)
                for bucket in plan.buckets:
                    run_bucket(spec, bucket, grads, scalars, plan.flags, amp, self.state)
        if theirs:
            self._torch_step(theirs)
        return loss

    def _clip_coefficient(self, planned: list, theirs: list[dict], amp: Amp) -> torch.Tensor | None:
        """``max_grad_norm``'s coefficient for this step (None: no clipping)."""
        return _amp.clip_coefficient(self, planned, theirs, amp)

    def _traced_clip_coefficient(
        self, grads: list[torch.Tensor], theirs: list[dict], amp: Amp
    ) -> torch.Tensor | None:
        """:meth:`_clip_coefficient` as ``torch.compile`` traces it."""
        return _amp.traced_clip_coefficient(self, grads, theirs, amp)

    def _traced_step(self, ours: list[dict], theirs: list[dict], amp: Amp) -> None:
        """The step as ``torch.compile`` traces it: lazy state as eager, then one op per group
        (hyper-parameters as op arguments: a tensor lr is a graph input, so changing it never
        recompiles). What the op does not take (sparse or complex grads, non-float dtypes, a
        param listed twice, DTensor params, 8-bit state: see ``_op_takes``) runs the eager step
        outside the graph."""
        groups = []
        for group in ours:
            params = [p for p in group["params"] if p.grad is not None]
            if (
                not all(walkable(p) and not p.is_complex() and not foreign(p) for p in params)
                or len(set(map(id, params))) != len(params)
                or any_dtensor(params)
                or not self._op_takes(params)
            ):
                self._eager_step()
                return
            groups.append((group, params))
        for group, _ in groups:  # validate everything before anything changes
            check_group(self, group)
        with torch.no_grad():
            grads = [p.grad for _, params in groups for p in params]
            amp.clip_coef = self._traced_clip_coefficient(grads, theirs, amp)
            for group, params in groups:
                memo: dict = {}
                operands = [operands_of(self, p, group, memo, 0) for p in params]
                seeds = [self.state[p][SEED] for p in params if SEED in self.state.get(p, {})]
                absmax = [
                    [self.state.get(p, {}).get(absmax_key(k)) for p in params] for k in self.algorithm.columns
                ]
                carried = [self.state[p][k] for p in params for k in self.algorithm.carried]
                if params:
                    traced_step(
                        self.algorithm,
                        self._op_handle,
                        group,
                        params,
                        operands,
                        amp,
                        self.precision,
                        seeds,
                        absmax,
                        carried,
                    )
        if theirs:
            self._torch_step(theirs)

    def _op_takes(self, params: list[torch.Tensor]) -> bool:
        """Whether the compiled op can step these params with this optimizer's low-precision
        options: on Triton devices, and every param with a precision column and a seed or none
        (one dtype's worth)."""
        precision = self.precision
        if not precision.active:
            return True
        if not all(runs_triton(p.device) for p in params):
            return False
        dtypes = {p.dtype for p in params}
        return len({(precision.aux_key(d), precision.rounds_stochastically(d)) for d in dtypes}) <= 1

    @torch.compiler.disable
    def _eager_step(self) -> None:
        FusedStep.step(self)  # the mixin's own step: torch's step hooks already ran

    def _foreign_step(self, items: list[tuple[dict, list[torch.Tensor]]], amp: Amp) -> None:
        """torch's own step for the params whose grad has another dtype than theirs
        (``p.grad_dtype``; ``items``: ``(group, params)``), so they get torch's numerics, state
        and errors, all or nothing: a refused step puts them and their state back. It runs
        before any kernel. GradScaler's verdict is read on the host on this path (torch's step
        needs it) and the grads are unscaled for torch's step (``max_grad_norm`` has already
        clipped them in place, as it does for torch's groups); they are given back after."""
        if amp.found_inf is not None and bool(amp.found_inf.item()):
            return
        params = [p for _, ps in items for p in ps]
        grads = [p.grad for p in params]
        saved = [
            (
                p.detach().clone(),
                {k: _clone(v) for k, v in self.state[p].items()} if p in self.state else None,
            )
            for p in params
        ]
        hidden = {k: self.__dict__.pop(k) for k in ("grad_scale", "found_inf") if k in self.__dict__}
        replaced = []  # (param, grad, its data before, or None where p.grad was reassigned)
        try:
            if amp.grad_scale is not None:
                for p, g in zip(params, grads, strict=True):
                    unscaled = g / amp.grad_scale.to(g.device)
                    if getattr(p, "grad_dtype", p.dtype) in (None, g.dtype):
                        p.grad = unscaled
                        replaced.append((p, g, None))
                    else:  # a grad left from before p.data changed dtype: torch's setter refuses it
                        replaced.append((p, g, g.data))
                        g.data = unscaled
            self._torch_step([{**group, "params": ps} for group, ps in items])
        except BaseException:
            for p, (data, state) in zip(params, saved, strict=True):
                p.detach().copy_(data)
                if state is None:
                    self.state.pop(p, None)
                else:
                    self.state[p] = state
            raise
        finally:
            self.__dict__.update(hidden)
            for p, g, data in replaced:
                if data is None:
                    p.grad = g
                else:
                    g.data = data

    def _undo_created(self, created: list[tuple[torch.Tensor, dict | None]]) -> None:
        """A refused step changes nothing: remove the state its new plans created (``created``:
        each param and its entries before: None where it had no entry, {} an empty one)."""
        for p, before in created:
            if before is None:
                self.state.pop(p, None)
            elif not before:
                self.state[p].clear()
            else:
                self.state[p].update(before)
        self._plans = {}

    def _torch_step(self, groups: list[dict]) -> None:
        """Torch's own step, over the groups whose flags ask for it."""
        everything = self.param_groups
        self.param_groups = groups
        try:
            super().step()
        finally:
            self.param_groups = everything

    def state_dict(self) -> dict:
        """torch's ``state_dict()``; the 8-bit state of DTensor params dequantized (see
        :func:`fusedopt.optim._precision.portable`); without the state torch would not have
        yet (:meth:`_untaken`)."""
        out = super().state_dict()
        # torch's dict holds the state's own entry dicts: plain dicts, as torch's (torch.load with
        # weights_only=True knows no other class).
        out["state"] = {k: dict(v) if isinstance(v, dict) else v for k, v in out["state"].items()}
        out = self._untaken(out)
        return portable(self, out) if self.precision.quantized else out

    def _untaken(self, state_dict: dict) -> dict:
        """``state_dict`` without the state our step created for a step that GradScaler then
        skipped, where torch creates none (SGD's momentum buffer: torch makes it from the first
        grad, our kernel creates it zeroed and counts its steps on the device). Saved, a zero
        buffer would resume as one that took a step. Reads those counters on the host."""
        if self.algorithm.counter is not None or not self._taken:
            return state_dict
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        taken = [
            (i, t) for i, p in zip(ids, params, strict=True) if (t := self._taken.get((id(p), 0))) is not None
        ]
        if not taken:
            return state_dict
        counts = torch.stack([t.to("cpu", torch.float32).reshape(()) for _, t in taken]).tolist()
        untaken = {i for (i, _), n in zip(taken, counts, strict=True) if n == 0}
        state = {}
        for i, entries in state_dict["state"].items():
            if i in untaken:
                entries = {k: v for k, v in entries.items() if k not in self.algorithm.columns}
            if entries:
                state[i] = entries
        return {**state_dict, "state": state}

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts every state tensor but ``step`` to its param's dtype: keep ours exact.
        exact = exact_entries(self, state_dict)
        with self._own_writes():
            super().load_state_dict(state_dict)
            restore(self, exact)
            # Converted to our options now: a torch-format state dict, or one saved with others
            # (8-bit state into other options is dequantized). Keys that are not params (torch
            # keeps them) are left alone.
            for p, state in self.state.items():
                if isinstance(p, torch.Tensor) and state and walkable_dtype(p):
                    self.precision.complete(p, state, self.algorithm)
        self._reset_plans(counters=True)

    def torch_state_dict(self) -> dict:
        """``state_dict()`` in the format of the ``torch.optim`` class this one replaces: the
        entries of ``master_weights``, ``kahan_summation`` and ``stochastic_rounding`` dropped,
        8-bit state dequantized (its absmax entries dropped), the state in each param's dtype.
        Load it into the torch class to go back to it."""
        return torch_state_dict(self)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if "_plans" in self.__dict__:
            self._reset_plans()
