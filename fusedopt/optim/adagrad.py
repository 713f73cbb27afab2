"""FusedAdagrad: torch.optim.Adagrad with a multi-tensor Triton step."""

from __future__ import annotations

import importlib

import torch

from fusedopt.kernels import adagrad as kernels
from fusedopt.optim._fused import FusedStep
from fusedopt.optim._plan import Amp, Bucket, StepGrads
from fusedopt.optim._step import Algorithm
from fusedopt.optim._torch_compat import check_fused_device_dtype
from fusedopt.optim.reference import Storage, adagrad_reference, dense_cpu_fused_ok, eager_grads, skipped

_torch_adagrad = importlib.import_module("torch.optim.adagrad")


def _state(group: dict) -> dict:
    """torch.optim.Adagrad's state besides ``step``: ``sum``, filled with
    ``initial_accumulator_value`` (``complex(v, v)`` for complex params)."""
    value = group["initial_accumulator_value"]

    def init(p: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        fill = complex(value, value) if torch.is_complex(p) else value
        return torch.full_like(p, fill, dtype=dtype, memory_format=torch.preserve_format)

    return {"sum": init}


def _hyper(group: dict) -> dict:
    return {k: group[k] for k in kernels.SCALARS}


def _switches(group: dict) -> dict:
    return dict(MAXIMIZE=bool(group["maximize"]), HAS_WD=bool(group["weight_decay"] != 0))


def _torch_functional(params, grads, sums, steps, hyper: dict, flags: dict, **how) -> None:
    _torch_adagrad.adagrad(
        params, grads, sums, steps, lr=hyper["lr"], weight_decay=hyper["weight_decay"],
        lr_decay=hyper["lr_decay"], eps=hyper["eps"], maximize=flags["MAXIMIZE"], **how,
    )  # fmt: skip


def _eager(
    hyper: dict,
    flags: dict,
    bucket: Bucket,
    grads: StepGrads,
    amp: Amp,
    state,
    storage: Storage | None = None,
) -> None:
    """Without Triton: sparse grads run torch's for-loop Adagrad (its only sparse path;
    GradScaler's skip read on the host, as torch's own path does); other CPU tensors torch's
    fused CPU Adagrad where it is right, its for-loop Adagrad for other fp32/fp64 layouts; for
    bf16/fp16 and the low-precision options (``storage``: see
    ``fusedopt.optim._precision.eager_step``) the fp32-math reference on working copies."""
    hyper = {k: float(v) for k, v in hyper.items()}  # CPU tensors or a sparse step: host values
    if not bucket.walkable:
        mine = eager_grads(bucket.grads(grads), amp, fused=False)
        if mine is None:
            return
        params = bucket.params  # torch's functional views complex params itself
        sums = [state[p]["sum"] for p in params]
        _torch_functional(
            params, mine, sums, bucket.counters, hyper, flags, foreach=False,
            has_sparse_grad=any(g.is_sparse for g in mine), has_complex=any(p.is_complex() for p in params),
        )  # fmt: skip
        return
    params, sums, _ = bucket.columns  # the last: the precision column
    mine = bucket.grads(grads)
    if storage is None and bucket.dtype in (torch.float32, torch.float64):
        fused = dense_cpu_fused_ok(bucket, mine)
        mine = eager_grads(mine, amp, fused)
        if mine is None:
            return
        _torch_functional(
            params, mine, sums, bucket.counters, hyper, flags, foreach=False, fused=fused,
            grad_scale=amp.grad_scale if fused else None, found_inf=amp.found_inf if fused else None,
        )  # fmt: skip
        return
    if skipped(amp.found_inf):
        return
    storage = storage or Storage(bucket)
    torch._foreach_add_(bucket.counters, 1)
    lr, lr_decay = hyper["lr"], hyper["lr_decay"]
    adagrad_reference(
        storage, mine, amp, [lr / (1 + (t - 1) * lr_decay) for t in torch.stack(bucket.counters).tolist()],
        weight_decay=hyper["weight_decay"], eps=hyper["eps"], maximize=flags["MAXIMIZE"],
        fused=storage.fused(mine), lr=lr, lr_decay=lr_decay, steps=bucket.counters,
    )  # fmt: skip


ADAGRAD = Algorithm("adagrad", kernels, _state, _hyper, _switches, _eager)


class FusedAdagrad(FusedStep, torch.optim.Adagrad):
    r"""torch.optim.Adagrad with a fused multi-tensor Triton step.

    Same constructor, defaults, validation, ``param_groups``, state (``step`` and ``sum``,
    created by the constructor for every param, as torch does) and ``state_dict`` as
    :class:`torch.optim.Adagrad`; a state dict of either loads into the other. One extension:
    ``max_grad_norm`` (keyword-only, see :class:`fusedopt.optim._fused.FusedStep`) clips the
    global gradient norm inside the step. For each param, with :math:`t` its own step count:

    .. math::
        g &\leftarrow \pm\nabla f(\theta) + \lambda\theta \;(-\text{ if maximize}),\qquad
        \tilde\gamma \leftarrow \frac{\gamma}{1 + (t-1)\,\eta}\\
        s &\leftarrow s + g^2,\qquad
        \theta \leftarrow \theta - \tilde\gamma\,\frac{g}{\sqrt{s} + \epsilon}

    (:math:`\eta` is ``lr_decay``, :math:`s` starts at ``initial_accumulator_value``.) The step
    runs one Triton kernel per device and dtype (fp32 math, fp64 for fp64 params, params and
    ``sum`` stored in the param's dtype), reading p, g, s and writing p, s: 20 bytes per fp32
    element. CUDA tensors use the compiled kernel; CPU tensors the same kernel under
    ``TRITON_INTERPRET=1``, else torch's fused CPU Adagrad where it is right, its for-loop
    Adagrad (other fp32/fp64 layouts) or the fp32-math reference
    (:func:`fusedopt.optim.reference.adagrad_reference`, bf16/fp16). Sparse gradients run
    torch's own for-loop Adagrad (its behaviour for them; ``weight_decay`` with a sparse
    gradient raises, as in torch).

    The decayed learning rate is computed in the kernel from the step counts, which live on the
    param's device, and hyper-parameters are read on the device, so a step makes no host read
    and compiles with ``torch.compile``. GradScaler's ``grad_scale``/``found_inf`` are applied
    in the kernel (unscale; skip the step and keep ``step`` when an inf was found) without a
    host sync, whatever ``fused`` says. ``fused=None`` (default) or ``True`` runs our kernel
    (``True`` also checks devices and dtypes as torch's fused Adagrad does); ``fused=False``,
    ``foreach=True`` or ``differentiable=True`` run torch's own implementation.
    """

    algorithm = ADAGRAD

    def _new_state(self, p: torch.Tensor, group: dict) -> dict[str, torch.Tensor]:
        # torch's _init_group creates the state of a param added after the constructor (with
        # add_param_group) for every grad, sparse ones too, filled with the constructor's
        # initial_accumulator_value (self.defaults), not its group's.
        defaults = dict(group, initial_accumulator_value=self.defaults["initial_accumulator_value"])
        # Filled in the dtype the options store it in: the exact value, not its rounding to a
        # bf16 param's dtype (8-bit state: fp32, then quantized).
        dtype = self.precision.state_dtype_for(p.dtype)
        return {key: init(p, dtype) for key, init in self.algorithm.state(defaults).items()}

    def _check(self, p: torch.Tensor, g: torch.Tensor, group: dict) -> None:
        if group["fused"]:
            check_fused_device_dtype(p)  # torch's message (it also refuses complex params)
            if g.is_sparse:
                raise RuntimeError("`fused` does not support sparse grad or complex param")
        if g.is_sparse and group["weight_decay"] != 0:
            raise RuntimeError("weight_decay option is not compatible with sparse gradients")
        self._refuse_integer(p)
