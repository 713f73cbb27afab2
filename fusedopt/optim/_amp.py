"""AMP and clipping around a fused step: GradScaler's inf check and ``max_grad_norm``.

* :func:`find_inf` is ``fusedopt.GradScaler``'s inf check for a fused optimizer: one read-only
  pass over the grads (the global-norm pass of ``max_grad_norm``, kept as the *pending norm*
  for the step GradScaler calls next, or an infinity norm).
* :func:`clip_coefficient` is ``max_grad_norm``'s coefficient for a step: the pending norm if
  the inf check just took it, else one norm pass over every group's grads. The step kernels
  multiply each grad by it as they read it; groups that run torch's step get their grads
  clipped in place (torch's step reads them).

Everything stays on the device: no host read.
"""

from __future__ import annotations

import math

import torch

from fusedopt._dist import domain, local
from fusedopt._norm import Parts, global_norm, split, traced_norm
from fusedopt._norm import clip_coefficient as coefficient_of
from fusedopt.optim._plan import Plan, StepGrads, plan_groups

_PENDING = "_fusedopt_pending_norm"


def _norm_parts(planned: list[tuple[dict, Plan, StepGrads]], torch_grads: list[torch.Tensor]) -> Parts:
    """The grads of a step as norm sources by domain: a bucket's own table where its grads share
    one domain (always, without DTensors), else tables of their own."""
    parts: Parts = {}
    strays, domains = list(torch_grads), [domain(g) for g in torch_grads]  # split below
    for _, plan, grads in planned:
        for bucket in plan.buckets:
            d = bucket.domains[0] if bucket.domains else None
            if any(x != d for x in bucket.domains):
                strays.extend(bucket.grads(grads))
                domains.extend(bucket.domains)
                continue
            sources, leftovers = parts.setdefault(d, ([], []))
            source = bucket.norm_source(grads)
            if source is not None:
                sources.append(source)
            else:
                leftovers.extend(bucket.grads(grads))
    for d, (sources, leftovers) in split(strays, domains).items() if strays else ():
        mine = parts.setdefault(d, ([], []))
        mine[0].extend(sources)
        mine[1].extend(leftovers)
    return parts


def _empty(parts: Parts) -> bool:
    return not any(sources or leftovers for sources, leftovers in parts.values())


def _grads_of(groups: list[dict]) -> list[torch.Tensor]:
    return [p.grad for g in groups for p in g["params"] if p.grad is not None]


def find_inf(optimizer, grad_scale: torch.Tensor) -> torch.Tensor | None:
    """1.0 if any grad of ``optimizer`` is inf or NaN, else 0.0 (float32, on the first grad's
    device), from one read-only pass; with ``max_grad_norm`` that pass is the global norm, kept
    for the coming step. None where torch's own check must run instead (sparse grads, integer
    params or grads of another dtype than their param's, which torch's functional steps)."""
    optimizer.__dict__.pop(_PENDING, None)
    optimizer._own_state()
    with torch.no_grad():
        planned = plan_groups(optimizer, list(enumerate(optimizer.param_groups)))
        if not all(b.walkable for _, plan, _ in planned for b in plan.buckets) or any(
            plan.foreign for _, plan, _ in planned
        ):
            return None
        parts = _norm_parts(planned, [])
        if _empty(parts):  # no grads: nothing found
            return torch.zeros((), dtype=torch.float32, device=grad_scale.device)
        if optimizer.max_grad_norm is None:
            total = global_norm(parts, math.inf, grad_scale)
        else:
            # Finite grads whose squares overflow fp32 (|g| ~ 1e19 after unscaling) count as
            # non-finite here; torch's clip would scale them by 0 instead.
            total = global_norm(parts, 2.0, grad_scale, exact=True)
            optimizer.__dict__[_PENDING] = total
        return torch.isfinite(total).logical_not().float()


def clip_coefficient(optimizer, planned: list, theirs: list[dict], amp) -> torch.Tensor | None:
    """``max_grad_norm``'s clip coefficient over every group's grads (None without it), on the
    device. Uses the norm :func:`find_inf` took just before this step (``found_inf`` is then
    set), never one left over from a step that did not happen."""
    pending = optimizer.__dict__.pop(_PENDING, None)
    if optimizer.max_grad_norm is None:
        return None
    if amp.found_inf is None:
        pending = None
    # torch's step reads these grads: they are clipped in place (fusedopt.optim._fused).
    torch_grads = _grads_of(theirs) + [p.grad for _, plan, _ in planned for p in plan.foreign]
    total = pending
    if total is None:
        parts = _norm_parts(planned, torch_grads)
        if _empty(parts):
            return None
        total = global_norm(parts, 2.0, amp.grad_scale, exact=True)
    return _coefficient(optimizer.max_grad_norm, total, torch_grads)


def traced_clip_coefficient(
    optimizer, grads: list[torch.Tensor], theirs: list[dict], amp
) -> torch.Tensor | None:
    """:func:`clip_coefficient` as ``torch.compile`` traces it (one op for the norm)."""
    if optimizer.max_grad_norm is None:
        return None
    torch_grads = _grads_of(theirs)
    grads = grads + torch_grads
    if not grads:
        return None
    total = traced_norm(grads, 2.0, amp.grad_scale, exact=True)
    return _coefficient(optimizer.max_grad_norm, total, torch_grads)


def _coefficient(max_norm: float, total: torch.Tensor, torch_grads: list[torch.Tensor]) -> torch.Tensor:
    coef = coefficient_of(total, max_norm)
    if torch_grads:
        torch._foreach_mul_([local(g) for g in torch_grads], coef)
    return coef
