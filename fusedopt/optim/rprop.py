"""FusedRprop: torch.optim.Rprop with a multi-tensor Triton step."""

from __future__ import annotations

import torch

from fusedopt.kernels import rprop as kernels
from fusedopt.optim._fused import FusedStep
from fusedopt.optim._plan import walkable
from fusedopt.optim._step import Algorithm
from fusedopt.optim._torch_compat import capture_health_check
from fusedopt.optim.reference import rprop_reference, scalar_reference


def _state(group: dict) -> dict:
    """torch.optim.Rprop's lazy state besides ``step``: ``prev`` zeros, ``step_size`` filled
    with the group's ``lr`` (``complex(lr, lr)`` for complex params)."""
    lr = float(group["lr"])  # torch's _to_scalar: a tensor lr read once, when the state is made

    def prev(p: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    def step_size(p: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        fill = complex(lr, lr) if torch.is_complex(p) else lr
        return torch.full_like(p, fill, dtype=dtype, memory_format=torch.preserve_format)

    return {"prev": prev, "step_size": step_size}


def _hyper(group: dict) -> dict:
    (etaminus, etaplus), (step_size_min, step_size_max) = group["etas"], group["step_sizes"]
    return dict(etaminus=etaminus, etaplus=etaplus, step_size_min=step_size_min, step_size_max=step_size_max)


def _switches(group: dict) -> dict:
    return dict(MAXIMIZE=bool(group["maximize"]))


RPROP = Algorithm("rprop", kernels, _state, _hyper, _switches, scalar_reference(rprop_reference))


class FusedRprop(FusedStep, torch.optim.Rprop):
    r"""torch.optim.Rprop with a fused multi-tensor Triton step.

    Same constructor, defaults, validation, ``param_groups``, state (``step``, ``prev``,
    ``step_size``) and ``state_dict`` as :class:`torch.optim.Rprop`; a state dict of either
    loads into the other. One extension: ``max_grad_norm`` (keyword-only, see
    :class:`fusedopt.optim._fused.FusedStep`) clips the global gradient norm inside the step.
    For each param (:math:`s` starts at ``lr``):

    .. math::
        g &\leftarrow \pm\nabla f(\theta) \;(-\text{ if maximize}),\qquad
        \eta \leftarrow \eta_+ \text{ if } g\,g_{prev} > 0,\;
        \eta_- \text{ if } g\,g_{prev} < 0,\; 1 \text{ otherwise}\\
        s &\leftarrow \operatorname{clamp}(\eta s, s_{min}, s_{max}),\qquad
        g \leftarrow 0 \text{ where } g\,g_{prev} < 0,\qquad
        \theta \leftarrow \theta - \operatorname{sign}(g)\,s,\qquad g_{prev} \leftarrow g

    The step runs one Triton kernel per device and dtype (fp32 math, fp64 for fp64 params,
    params and state stored in the param's dtype), reading p, g, prev, s and writing p, prev,
    s: 28 bytes per fp32 element. CUDA tensors use the compiled kernel; CPU tensors the same
    kernel under ``TRITON_INTERPRET=1``, else the reference in torch's for-loop order
    (:func:`fusedopt.optim.reference.rprop_reference`; fp32 math for bf16/fp16) on cache-sized
    batches.

    No host read (``capturable=True`` captures, ``torch.compile`` compiles the step), GradScaler
    in the kernel, ``foreach`` and ``differentiable`` as :class:`fusedopt.FusedAdadelta`'s.
    ``lr`` is read once, to fill ``step_size`` when a param's state is made, as torch does.
    """

    algorithm = RPROP

    _before_step = capture_health_check  # as torch's: capture only when capturable
    _check = FusedStep._check_dense

    def _new_state(self, p: torch.Tensor, group: dict) -> dict[str, torch.Tensor]:
        # step_size filled in the dtype the options store it in: lr itself, not its rounding to
        # a bf16 param's dtype (8-bit state: fp32, then quantized).
        if not walkable(p):
            return {}
        dtype = self.precision.state_dtype_for(p.dtype)
        return {key: init(p, dtype) for key, init in self.algorithm.state(group).items()}
