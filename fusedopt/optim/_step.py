"""The one implementation of a fused step: an algorithm's spec and the function that steps a
bucket with it, reached the same way from the eager step, the compiled step (through the
``fusedopt::step_`` custom op) and a captured step.

An algorithm is declared once, in an :class:`Algorithm`: its kernel module names the table
columns (``COLUMNS``: "param" then the state keys), the float64 scalar slots (``SCALARS``), the
per-tensor values its ``prepare`` computes (``PREPARED``), the constexpr switches (``FLAGS``,
``MAXIMIZE`` among them) the kernel reads by named bit, the state columns a switch adds
(``REQUIRES``) and the state that is never negative (``NONNEGATIVE``: its 8-bit codes use the
unsigned map), and supplies the ``update`` the one optimizer kernel
(:mod:`fusedopt.kernels.optimizer`) runs; the spec says how a param group fills them and how
torch initializes the state.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import triton

from fusedopt._multi_tensor import compute_dtype, launch_grid
from fusedopt.kernels.optimizer import optimizer_kernel, prepare_kernel
from fusedopt.optim._plan import Amp, Bucket, OpPlans, StepGrads, set_absmax
from fusedopt.optim._precision import Precision, eager_step


@dataclass(frozen=True)
class Algorithm:
    """One optimizer algorithm, as the launcher and the kernel both read it.

    Args:
        name: the key of the compiled step's op (``torch.ops.fusedopt.step_``).
        kernels: the kernel module: ``update`` (and ``prepare`` if ``PREPARED`` is not empty),
            ``COLUMNS``, ``SCALARS``, ``PREPARED``, ``FLAGS``, ``REQUIRES``, ``NONNEGATIVE``.
        state: ``group -> {state key: init}``, ``init(param)`` the key's initial tensor: the
            state torch creates lazily for a param (the step counter excluded), in torch's key
            order.
        hyper: ``group -> {slot: value}`` for every name in ``SCALARS`` (numbers or 0-d tensors).
        switches: ``group -> {flag: bool}`` for every name in ``FLAGS``.
        eager: ``(hyper, switches, bucket, grads, amp, state, storage=None)``: the step
            without Triton (torch's fastest correct path on CPU, sparse grads, integer params);
            it advances the bucket's counters itself. ``state`` is the optimizer's (None inside
            the op); ``storage`` (a ``fusedopt.optim._precision.Storage``) reads and stores the
            bucket's tensors: None, as stored (fp32/fp64, or bf16/fp16 where the math allows,
            else through fp32 working copies); the low-precision options pass their own
            (``Stored``: masters, compensations, rounding, 8-bit codes).
        counter: the state key of the per-param step count (torch's ``"step"``), or None: the
            optimizer keeps a private count of steps taken (SGD's "this buffer is new").
        saturates: the kernel only tells counts below this apart (SGD: 2, "is this the first
            step"): once every counter of a bucket has surely reached it (that many steps
            without GradScaler), steps stop advancing them. None: the count itself is read.
        optional: state keys torch treats as new when absent or None (SGD's
            ``momentum_buffer``: older torch saved None); other keys must be present.
        counts: False: the update reads no step count and none is kept, in the state or
            privately (Lion; ``counter`` is then None).
    """

    name: str
    kernels: ModuleType
    state: Callable[[dict, torch.Tensor], dict[str, torch.Tensor]]
    hyper: Callable[[dict], dict[str, Any]]
    switches: Callable[[dict], dict[str, bool]]
    eager: Callable[..., None]
    counter: str | None = "step"
    saturates: int | None = None
    optional: frozenset[str] = frozenset()
    counts: bool = True

    def step_dtype(self, group: dict) -> torch.dtype:
        """The dtype of a new step counter, as torch's ``_get_scalar_dtype(is_fused=...)``."""
        if group.get("fused") or torch.get_default_dtype() != torch.float64:
            return torch.float32
        return torch.float64

    def __post_init__(self):
        k = self.kernels
        object.__setattr__(self, "_flag_names", frozenset(k.FLAGS))
        object.__setattr__(self, "_launches", {})
        if k.COLUMNS[0] != "param":
            raise ValueError(f"{self.name}: column 0 of the kernel's table must be the param")
        if len(k.COLUMNS) > 4 or "MAXIMIZE" not in k.FLAGS or not set(k.REQUIRES) <= set(k.COLUMNS[1:]):
            raise ValueError(
                f"{self.name}: at most 3 state columns, a MAXIMIZE flag, REQUIRES of state columns"
            )
        if not self.counts and self.counter is not None:
            raise ValueError(f"{self.name}: a state step counter (counter) is a count (counts)")
        if self.carried and not k.PREPARED:
            raise ValueError(f"{self.name}: per-tensor scalar state (CARRIED) is kept by prepare (PREPARED)")
        if k.PREPARED and self.counter is None:
            raise ValueError(f"{self.name}: per-tensor values (PREPARED) are computed from a step counter")
        ALGORITHMS[self.name] = self

    @property
    def kernel(self):
        """The step kernel (one for every algorithm: this one's ``update`` is a constexpr)."""
        return optimizer_kernel

    @property
    def update(self):
        """The algorithm's update, the ``UPDATE`` constexpr of :attr:`kernel`."""
        return self.kernels.update

    def constexprs(self, flags: dict[str, bool]) -> dict:
        """The kernel's algorithm constexprs for a group's switches: the update, the table width,
        the state columns used (a column of ``REQUIRES`` only with its switch), the switches as
        bits (``SWITCHES``), the per-tensor values and ``MAXIMIZE``."""
        key = tuple(flags[name] for name in self.kernels.FLAGS)
        known = self._launches.get(key)
        if known is None:
            k = self.kernels
            used = [i for i, c in enumerate(self.columns) if c not in k.REQUIRES or flags[k.REQUIRES[c]]]
            known = self._launches[key] = dict(
                UPDATE=k.update,
                K=len(k.COLUMNS) + 1,
                STATE=sum(1 << i for i in used),
                SWITCHES=sum(1 << i for i, name in enumerate(k.FLAGS) if flags[name]),
                P=len(k.PREPARED),
                MAXIMIZE=bool(flags["MAXIMIZE"]),
            )
        return known

    @property
    def carried(self) -> dict[str, float]:
        """Per-tensor scalar state the kernel module's ``prepare`` reads and updates (its
        ``CARRIED``: key -> initial value; NAdam's ``mu_product``), kept as 0-d tensors of the
        step counter's dtype on the param's device, as the counter is."""
        return getattr(self.kernels, "CARRIED", {})

    @property
    def columns(self) -> tuple[str, ...]:
        """The state columns of the table, after the param."""
        return self.kernels.COLUMNS[1:]

    @property
    def signed(self) -> tuple[bool, ...]:
        """For each state column, whether it may be negative (8-bit: the signed code map)."""
        return tuple(name not in self.kernels.NONNEGATIVE for name in self.columns)

    def scalar_values(self, group: dict) -> list:
        """The group's values of the kernel's scalar slots, in slot order."""
        values = self.hyper(group)
        if len(values) != len(self.kernels.SCALARS):
            raise ValueError(f"{self.name}: scalars {sorted(values)} != {sorted(self.kernels.SCALARS)}")
        return [values[name] for name in self.kernels.SCALARS]  # a KeyError names a missing slot

    def flag_values(self, group: dict) -> dict[str, bool]:
        """The group's values of the kernel's switches."""
        values = self.switches(group)
        if values.keys() != self._flag_names:
            raise ValueError(f"{self.name}: flags {sorted(values)} != {sorted(self.kernels.FLAGS)}")
        return values


ALGORITHMS: dict[str, Algorithm] = {}


def zeros(p: torch.Tensor) -> torch.Tensor:
    """A state tensor torch creates zeroed: the param's shape, dtype and memory format."""
    return torch.zeros_like(p, memory_format=torch.preserve_format)


def decay_switches(group: dict) -> dict:
    """The switches of RAdam and NAdam: ``MAXIMIZE``, ``DECOUPLED`` and ``HAS_WD``."""
    return dict(
        MAXIMIZE=bool(group["maximize"]),
        DECOUPLED=bool(group["decoupled_weight_decay"]),
        HAS_WD=bool(group["weight_decay"] != 0),
    )


def adam_hyper(group: dict) -> dict:
    """The scalar slots of the Adam family (Adam, Adamax, RAdam, NAdam): ``betas`` unpacked."""
    beta1, beta2 = group["betas"]
    return dict(
        lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"]
    )


def run_bucket(
    algorithm: Algorithm,
    bucket: Bucket,
    grads: StepGrads,
    scalars: list,
    flags: dict,
    amp: Amp,
    state: dict | None = None,
) -> None:
    """Step one bucket: advance its counters by one step taken (by ``1 - found_inf``, on the
    device: a step GradScaler skips does not count), then launch the kernel, which reads the
    counters and does nothing when ``found_inf`` is set."""
    if bucket.kind != "triton":
        hyper = dict(zip(algorithm.kernels.SCALARS, scalars, strict=True))
        if bucket.walkable and bucket.precision.affects(bucket.dtype):
            eager_step(algorithm, hyper, flags, bucket, grads, amp, state, bucket.precision)
        else:
            algorithm.eager(hyper, flags, bucket, grads, amp, state)
        return
    counters = bucket.counter_vector()
    vector = bucket.scalars(scalars)
    prepared = vector  # never read without PREPARED
    if counters is not None and algorithm.kernels.PREPARED:
        prepared = _prepare(algorithm, bucket, counters, vector, amp)
    elif counters is not None:
        sure = bucket.memo.get("taken", 0)  # steps this bucket surely took (no found_inf)
        if algorithm.saturates is None or sure < algorithm.saturates:
            if amp.found_inf is not None:
                counters.sub_(amp.found_inf.to(counters.device))
            else:
                bucket.memo["taken"] = sure + 1
            counters.add_(1)
    seeds = bucket.seed_vector()
    absmax = vector if bucket.absmax_ptrs is None else bucket.absmax_ptrs
    codebook = vector if bucket.codebook is None else bucket.codebook
    bucket.launch(
        grads, optimizer_kernel, amp, vector, prepared, vector if counters is None else counters,
        vector if seeds is None else seeds, absmax, codebook, **algorithm.constexprs(flags),
    )  # fmt: skip
    bucket.write_back(counters)
    if seeds is not None:  # stochastic rounding: the next step draws new bits
        seeds.add_(1)
        bucket.write_back_seeds(seeds)


_PREPARE_BLOCK = 128  # tensors per program of prepare_kernel


def _prepare(algorithm: Algorithm, bucket: Bucket, counters: torch.Tensor, scalars: torch.Tensor, amp: Amp):
    """Advance the bucket's step counters (by one step taken) and compute each tensor's
    ``PREPARED`` values in one launch; returns them (COMPUTE [T, P], kept by the bucket)."""
    k, n = algorithm.kernels, counters.numel()
    prepared = bucket.memo.get("prepared")
    if prepared is None or prepared.shape[0] != n:
        dtype = compute_dtype(bucket.dtype)
        prepared = bucket.memo["prepared"] = torch.empty(
            n, len(k.PREPARED), dtype=dtype, device=bucket.device
        )
    found = amp.found_inf
    carried = bucket.carried_vector()
    launch_grid(
        prepare_kernel, triton.cdiv(n, _PREPARE_BLOCK), bucket.device, scalars, counters, prepared,
        scalars if found is None else found.to(bucket.device), scalars if carried is None else carried, n,
        PREPARE=k.prepare, P=len(k.PREPARED), C=len(algorithm.carried), COMPUTE=bucket.dtypes["COMPUTE"],
        HAS_FOUND_INF=found is not None, BLOCK_T=_PREPARE_BLOCK,
    )  # fmt: skip
    bucket.write_back_carried(carried)
    return prepared


# The compiled step ------------------------------------------------------------------------------

# The op's plan caches, one per optimizer, by the handle the traced step passes: weak values,
# so a cache lives exactly as long as the optimizer that holds it.
_OP_PLANS: weakref.WeakValueDictionary[int, OpPlans] = weakref.WeakValueDictionary()


def new_op_plans() -> tuple[OpPlans, int]:
    """A plan cache for an optimizer to hold, and the handle its traced steps pass to the op."""
    plans = OpPlans()
    _OP_PLANS[id(plans)] = plans
    return plans, id(plans)


@torch.library.custom_op(
    "fusedopt::step_", mutates_args=("params", "state", "counters", "aux", "seeds", "absmax", "carried")
)
def step_(
    algorithm: str,
    handle: int,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    columns: list[int],
    state: list[torch.Tensor],
    counters: list[torch.Tensor],
    scalars: list[float],
    tensor_slots: list[int],
    tensor_scalars: list[torch.Tensor],
    flags: list[bool],
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
    clip_coef: torch.Tensor | None,
    precision: list[int],
    state_dtype: str,
    aux: list[torch.Tensor],
    seeds: list[torch.Tensor],
    absmax: list[torch.Tensor],
    absmax_index: list[int],
    carried: list[torch.Tensor],
) -> None:
    """One group's step as an op ``torch.compile`` sees: ``state`` holds the state columns
    ``columns`` (indices into ``Algorithm.columns``, each a list as long as ``params``,
    concatenated; an absent column is the params, never read), ``counters`` each param's step
    count (empty if the algorithm keeps none here); ``scalars`` the algorithm's slots, where the
    slots ``tensor_slots`` take ``tensor_scalars`` (a tensor lr: no recompile when it changes).
    ``precision``: master_weights, kahan_summation, stochastic_rounding (0/1) and ``state_dtype``
    (a dtype's name, "" for None) of the optimizer; ``aux``: each param's precision column
    (master or compensation; empty: none), ``seeds``: each param's rounding seed (empty: none);
    8-bit state: ``absmax[absmax_index[k * len(params) + i]]`` is the absmax of state column
    ``k`` of param ``i`` (-1: fp32 state; empty: no 8-bit state); ``carried``: each param's
    per-tensor scalar state (``Algorithm.carried``, param after param; empty: none)."""
    spec = ALGORITHMS[algorithm]
    n = len(params)
    given = {k: state[i * n : (i + 1) * n] for i, k in enumerate(columns)}
    table = [params, *(given.get(k, params) for k in range(len(spec.columns))), aux or params]
    step_grads = StepGrads(grads)
    step_grads.token = tuple(g.data_ptr() for g in grads)
    cache = _OP_PLANS.get(handle)
    stored = state_dtype if state_dtype in ("", "int8") else getattr(torch, state_dtype)
    options = Precision(*map(bool, precision), stored or None)
    plan = (cache or OpPlans()).get(table, step_grads, options)
    values: list = list(scalars)
    for slot, t in zip(tensor_slots, tensor_scalars, strict=True):
        values[slot] = t
    switches = dict(zip(spec.kernels.FLAGS, flags, strict=True))
    amp = Amp(grad_scale, found_inf, clip_coef)
    for bucket in plan.buckets:
        bucket.counters = [counters[i] for i in bucket.positions] if counters else []
        c = len(spec.carried)
        bucket.carried = [carried[i * c + k] for i in bucket.positions for k in range(c)]
        if bucket.walkable and options.quantizes(bucket.dtype):
            # Every launch that may hold 8-bit state gets its absmax table, all zeros (fp32 state
            # only) where no param of the group has 8-bit state: the kernel reads it either way.
            where = [
                [absmax_index[k * n + i] if absmax_index else -1 for i in bucket.positions]
                for k in range(len(spec.columns))
            ]
            set_absmax(bucket, [[absmax[j] if j >= 0 else None for j in row] for row in where], spec)
        rounds = seeds and options.rounds_stochastically(bucket.dtype)
        bucket.seed_list = [seeds[i] for i in bucket.positions] if rounds else []
        run_bucket(spec, bucket, step_grads, values, switches, amp)


@step_.register_fake
def _(*args) -> None:
    return None


def traced_step(
    spec: Algorithm,
    handle: int,
    group: dict,
    params: list[torch.Tensor],
    operands: list[tuple[list[torch.Tensor], torch.Tensor | None]],
    amp: Amp,
    precision: Precision,
    seeds: list[torch.Tensor],
    absmax: list[list[torch.Tensor | None]],
    carried: list[torch.Tensor],
) -> None:
    """Call the op for one group: ``operands[i]`` are ``params[i]``'s state columns (in
    ``spec.columns`` order, then the precision column; None where absent) and step counter;
    ``seeds`` the params' rounding seeds (or none); ``absmax[k][i]`` the absmax of state column
    ``k`` of param ``i`` (None: not 8-bit); ``carried`` the params' per-tensor scalar state."""
    present = [k for k, name in enumerate(spec.columns) if operands and operands[0][0][k] is not None]
    state = [ops[k] for k in present for ops, _ in operands]
    counters = [c for _, c in operands if c is not None]
    scalars = spec.scalar_values(group)
    flags = spec.flag_values(group)
    slots = [i for i, v in enumerate(scalars) if isinstance(v, torch.Tensor)]
    torch.ops.fusedopt.step_(
        spec.name, handle, params, [p.grad for p in params], present,
        state, counters, [0.0 if i in slots else float(v) for i, v in enumerate(scalars)], slots,
        [scalars[i] for i in slots], [flags[name] for name in spec.kernels.FLAGS],
        amp.grad_scale, amp.found_inf, amp.clip_coef,
        [int(precision.master_weights), int(precision.kahan_summation), int(precision.stochastic_rounding)],
        str(precision.state_dtype).removeprefix("torch.") if precision.state_dtype is not None else "",
        [ops[-1] for ops, _ in operands if ops[-1] is not None], seeds,
        [a for row in absmax for a in row if a is not None], _indices(absmax), carried,
    )  # fmt: skip


def _indices(absmax: list[list[torch.Tensor | None]]) -> list[int]:
    """Each (column, param)'s position in the flat list of absmax tensors, -1 for none; empty
    when there are none at all."""
    out, j = [], 0
    for row in absmax:
        for a in row:
            out.append(-1 if a is None else j)
            j += a is not None
    return out if j else []
