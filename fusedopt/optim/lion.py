"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), which torch.optim
lacks: :class:`Lion`, a torch-shaped class whose own step is the plain-torch for-loop of the
``lion-pytorch`` package (the reference implementation), and :class:`FusedLion`, the same class
with the multi-tensor Triton step."""

from __future__ import annotations

import torch

from fusedopt.kernels import lion as kernels
from fusedopt.optim._fused import FusedStep
from fusedopt.optim._plan import Amp, Bucket, StepGrads
from fusedopt.optim._step import Algorithm
from fusedopt.optim.reference import Storage, lion_math_, lion_reference, skipped


class Lion(torch.optim.Optimizer):
    r"""Lion, shaped as a ``torch.optim`` class: constructor, validation (torch's messages),
    ``param_groups`` and state (``exp_avg`` only, as ``lion-pytorch`` keeps). Its ``step`` is
    the reference's for-loop in plain torch (:func:`fusedopt.optim.reference.lion_math_`).
    Per param, with decoupled weight decay:

    .. math::
        g &\leftarrow \pm\nabla f(\theta) \;(-\text{ if maximize}),\qquad
        \theta \leftarrow \theta(1 - \gamma\lambda)\\
        c &\leftarrow \beta_1 m + (1-\beta_1) g,\qquad
        \theta \leftarrow \theta - \gamma\,\operatorname{sign}(c),\qquad
        m \leftarrow \beta_2 m + (1-\beta_2) g

    Args:
        params: params or param groups.
        lr (float or Tensor): learning rate (default 1e-4; Lion's is 3-10x smaller than AdamW's).
        betas (tuple[float, float]): the interpolation of the update's direction and the decay
            of ``exp_avg`` (default (0.9, 0.99)).
        weight_decay (float): decoupled weight decay (default 0).
        maximize (bool): maximize the objective (default False).
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
    ) -> None:
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta <= 1.0:  # the reference's range
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step (the reference's for-loop).

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr = float(group["lr"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lion does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                x, d, m = (
                    torch.view_as_real(t) if t.is_complex() else t for t in (p, p.grad, state["exp_avg"])
                )
                lion_math_(
                    x, -d if group["maximize"] else d, m, torch.empty_like(m), lr=lr, beta1=beta1,
                    beta2=beta2, weight_decay=group["weight_decay"],
                )  # fmt: skip
        return loss


def _state(group: dict) -> dict:
    """Lion's lazy state: ``exp_avg``, zeros."""
    return {"exp_avg": lambda p: torch.zeros_like(p, memory_format=torch.preserve_format)}


def _hyper(group: dict) -> dict:
    beta1, beta2 = group["betas"]
    return dict(lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"])


def _switches(group: dict) -> dict:
    return dict(MAXIMIZE=bool(group["maximize"]), HAS_WD=bool(group["weight_decay"] != 0))


def _eager(hyper: dict, flags: dict, bucket: Bucket, grads: StepGrads, amp: Amp, state, storage=None) -> None:
    """Without Triton: the reference on working copies a batch at a time, every dtype (for
    fp32 and fp64 in their own dtype, bf16/fp16 and the low-precision options in fp32)."""
    if skipped(amp.found_inf):
        return
    hyper = {k: float(v) for k, v in hyper.items()}  # CPU tensors: no sync to speak of
    lion_reference(storage or Storage(bucket), bucket.grads(grads), amp, maximize=flags["MAXIMIZE"], **hyper)


LION = Algorithm("lion", kernels, _state, _hyper, _switches, _eager, counter=None, counts=False)


class FusedLion(FusedStep, Lion):
    r""":class:`Lion` with a fused multi-tensor Triton step.

    Same constructor, defaults, validation, ``param_groups``, state (``exp_avg``) and
    ``state_dict`` as :class:`Lion` and the ``lion-pytorch`` package's ``Lion``; the update is
    the package's, op for op (fp32 results bit for bit). Extensions, keyword-only (see
    :class:`fusedopt.optim._fused.FusedStep`): ``max_grad_norm`` and the low-precision options
    (``master_weights``, ``kahan_summation``, ``stochastic_rounding``, ``state_dtype``, 8-bit
    ``exp_avg`` with the signed code map). Per param:

    .. math::
        \theta \leftarrow \theta(1 - \gamma\lambda) - \gamma\,
        \operatorname{sign}(\beta_1 m + (1-\beta_1) g),\qquad
        m \leftarrow \beta_2 m + (1-\beta_2) g

    The step runs one Triton kernel per device and dtype (fp32 math, fp64 for fp64 params,
    params and state stored in the param's dtype), reading p, g, m and writing p, m: 20 bytes
    per fp32 element. CUDA tensors use the compiled kernel; CPU tensors the same kernel under
    ``TRITON_INTERPRET=1``, else the reference on working copies
    (:func:`fusedopt.optim.reference.lion_reference`). The update reads no step count (Lion
    keeps none) and hyper-parameters are read on the device, so a step makes no host read: it
    can be captured in a CUDA graph (there is no ``capturable`` flag to set) and compiled with
    ``torch.compile``. GradScaler's ``grad_scale``/``found_inf`` are applied in the kernel.

    The update's size is ``lr`` in every element whatever the gradient's scale: ``exp_avg``
    only has to keep its sign right, so bf16 (``state_dtype=torch.bfloat16``) or 8-bit state
    costs Lion far less than it costs Adam, whose denominator divides by a rounded value.
    """

    algorithm = LION

    def _uses_torch_impl(self, group: dict) -> bool:
        return False  # no differentiable / foreach flags: every group takes the kernel

    def _check(self, p: torch.Tensor, g: torch.Tensor, group: dict) -> None:
        if g.is_sparse:
            raise RuntimeError("Lion does not support sparse gradients")
        self._refuse_integer(p)
