"""``fusedopt.GradScaler``: torch.amp.GradScaler whose inf check is the optimizer's own norm pass.

With torch's GradScaler, ``scaler.step(optimizer)`` first reads and rewrites every gradient to
look for infs and NaNs (``_amp_foreach_non_finite_check_and_unscale_`` with a scale of 1), then
the optimizer reads them again. For a fusedopt optimizer this scaler instead asks the optimizer
(:func:`fusedopt.optim._amp.find_inf`): one read-only pass that, with
``max_grad_norm``, is also the global-norm pass the step needs. The step kernel then unscales,
clips, skips on inf and updates. The AMP + clipping phase reads the gradients twice and never
writes them; torch's recipe (``unscale_``, ``clip_grad_norm_``, ``step``) reads them four times
and writes them twice.
"""

from __future__ import annotations

import torch

from fusedopt.optim._amp import find_inf
from fusedopt.optim._fused import FusedStep


class GradScaler(torch.amp.GradScaler):
    """:class:`torch.amp.GradScaler`, with the same constructor, methods and ``state_dict``.

    Only the inf check inside ``step(optimizer)`` changes, and only for fusedopt optimizers
    whose every param group runs the fused step (no ``fused=False``, ``foreach=True`` or
    ``differentiable=True`` group). ``unscale_(optimizer)`` keeps torch's meaning (the grads are
    unscaled in place: call it when you need to read them), and other optimizers get torch's
    behaviour.
    """

    def _check_inf_per_device(self, optimizer: torch.optim.Optimizer) -> dict:
        if not (isinstance(optimizer, FusedStep) and optimizer._step_supports_amp_scaling):
            return super()._check_inf_per_device(optimizer)
        scale, _ = self._check_scale_growth_tracker("_check_inf_per_device")
        found_inf = find_inf(optimizer, scale)
        if found_inf is None:
            return super()._check_inf_per_device(optimizer)
        per_device = {found_inf.device: found_inf}
        self._per_optimizer_states[id(optimizer)]["found_inf_per_device"] = per_device
        return per_device
