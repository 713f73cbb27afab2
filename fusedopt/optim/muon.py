"""FusedMuon: torch.optim.Muon with AdamW param groups, N-D params and max_grad_norm.

A param group with ``use_muon=False`` is stepped as :class:`torch.optim.AdamW` (the convention of
the reference code's ``MuonWithAuxAdam``), by one :class:`~fusedopt.FusedAdamW` step over all
such groups; every other group is a Muon group, exactly as :class:`torch.optim.Muon` steps it,
so torch's Muon state dicts load as they are.

A Muon group's matrices of one device and dtype step through the Triton kernels on CUDA (and on
CPU under the interpreter): the momentum and the norms in one launch, Newton–Schulz batched per
shape with torch's matmuls, the decay and update in one launch
(:mod:`fusedopt.optim._muon_launch`); no host read. Elsewhere (a CPU without the interpreter,
params not laid out for the kernels) the same math runs on torch's ops: on CPU the fastest
correct path measured (docs/muon.md). DTensor params (FSDP2) step their local shards; each
whole matrix is orthogonalized by one owner rank (:mod:`fusedopt.optim._muon_dist`).
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Iterable

import torch
from torch import nn

from fusedopt._dist import any_dtensor, check_param, is_dtensor, local
from fusedopt._multi_tensor import TL_DTYPE, runs_triton
from fusedopt._norm import clip_coefficient, global_norm, split
from fusedopt.optim._fused import check_max_grad_norm
from fusedopt.optim._muon_dist import orthogonalize_sharded, shard_dim
from fusedopt.optim._muon_launch import MuonLaunch, check_newton_schulz, quintic
from fusedopt.optim.adam import FusedAdamW

try:
    _torch_muon = importlib.import_module("torch.optim._muon")
except ImportError:  # torch < 2.9 has no Muon
    _torch_muon = None

# torch's defaults (Keller Jordan's constants), where torch has Muon.
NS_COEFFICIENTS = (
    (_torch_muon.DEFAULT_A, _torch_muon.DEFAULT_B, _torch_muon.DEFAULT_C)
    if _torch_muon
    else (3.4445, -4.7750, 2.0315)
)
NS_STEPS = _torch_muon.DEFAULT_NS_STEPS if _torch_muon else 5
EPS = _torch_muon.EPS if _torch_muon else 1e-7

# Keys an AdamW group (use_muon=False) takes besides those every group gets from the defaults.
ADAMW_DEFAULTS = {"betas": (0.9, 0.95)}


def _require_torch_muon() -> None:
    if _torch_muon is None:
        raise ImportError(
            f"fusedopt.FusedMuon needs torch.optim.Muon (torch >= 2.9); this is torch {torch.__version__}"
        )


def newton_schulz(
    updates: list[torch.Tensor], coefficients: tuple[float, float, float], steps: int, eps: float
) -> list[torch.Tensor]:
    """torch's ``_zeropower_via_newtonschulz`` of each 2-D update, its errors included: in bf16,
    the matrix transposed when tall, scaled to Frobenius norm at most ``eps``-clamped 1, then
    :func:`quintic`. Batched: the matrices of one (transposed) shape and device run as one
    chain (1.9x faster than one matrix at a time for a GPT layout of width 128 on a CPU, 3x at
    64, 1.1x at 256: docs/muon.md)."""
    check_newton_schulz(coefficients, steps)
    if any(u.ndim != 2 for u in updates):
        raise ValueError("Input tensor gradient must be a 2D matrix")
    groups: dict[tuple, list[int]] = {}
    for i, u in enumerate(updates):
        rows, cols = u.shape
        groups.setdefault((min(rows, cols), max(rows, cols), u.device), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(updates)
    for members in groups.values():
        low = [updates[i].bfloat16() for i in members]  # each converted once, as torch does
        x = torch.stack([u.T if u.size(0) > u.size(1) else u for u in low])
        # each matrix's norm as torch takes it (bf16, summed in the matrix's own memory order: a
        # batched norm sums in another order, and its bf16 rounding can then differ)
        norms = torch.stack([u.norm() for u in low])
        x = quintic(x.div_(norms.clamp(min=eps)[:, None, None]), coefficients, steps)
        for i, o in zip(members, x.unbind(0), strict=True):
            out[i] = o.T if updates[i].size(0) > updates[i].size(1) else o
    return out


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch's Muon learning-rate adjustment for a matrix of ``shape``."""
    return _torch_muon._adjust_lr(lr, adjust_lr_fn, shape)


def _matrix_shape(p: torch.Tensor) -> torch.Size:
    """The matrix a param is orthogonalized as: itself (2-D) or its ``[shape[0], -1]`` view."""
    return p.shape if p.ndim == 2 else torch.Size((p.shape[0], math.prod(p.shape[1:])))


class FusedMuon(torch.optim.Muon if _torch_muon is not None else torch.optim.Optimizer):
    r"""torch.optim.Muon, plus AdamW param groups, N-D params and ``max_grad_norm``.

    Same constructor, defaults, validation errors, ``param_groups`` keys (for Muon groups),
    state (``momentum_buffer``) and ``state_dict`` as :class:`torch.optim.Muon`, and the same
    math. Keyword-only extensions:

    Args:
        max_grad_norm (float, optional): clip the global L2 norm of the gradients of all groups
            to this value before the step, as ``torch.nn.utils.clip_grad_norm_(params,
            max_grad_norm)`` followed by ``step()`` would, without rewriting the gradients.
        flatten (bool): orthogonalize a Muon param of more than 2 dims (a conv weight) as its
            ``[shape[0], -1]`` view, its learning rate adjusted for that matrix's shape;
            without it such a param raises torch's ValueError. Default: False.

    A param group with ``use_muon=False`` holds params of any shape, stepped as
    :class:`torch.optim.AdamW` (by :class:`~fusedopt.FusedAdamW`'s step) with that group's ``lr``, ``betas`` (default ``(0.9, 0.95)``),
    ``eps`` and ``weight_decay`` (missing keys take this optimizer's defaults, as torch fills
    any group); its state is AdamW's (``step``, ``exp_avg``, ``exp_avg_sq``).
    :func:`muon_param_groups` splits a model's params that way.
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = EPS,
        ns_steps: int = NS_STEPS,
        adjust_lr_fn: str | None = None,
        *,
        max_grad_norm: float | None = None,
        flatten: bool = False,
    ) -> None:
        _require_torch_muon()
        self.max_grad_norm = check_max_grad_norm(max_grad_norm)
        self.flatten = bool(flatten)
        # torch's Muon constructor, whose per-param check (2-D only) applies to Muon groups here:
        # its validation runs on a placeholder, then the groups are added as ours.
        torch.optim.Muon.__init__(
            self, [torch.empty(0, 0)], lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn
        )  # fmt: skip
        torch.optim.Optimizer.__init__(self, params, self.defaults)  # anew: our groups, empty state

    # torch.amp.GradScaler sets ``grad_scale`` and ``found_inf`` for the step (see ``step``).
    _step_supports_amp_scaling = True

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "max_grad_norm": self.max_grad_norm, "flatten": self.flatten}

    def __setstate__(self, state: dict) -> None:
        # unpickling and copies carry the options; load_state_dict's state does not: keep ours
        super().__setstate__(state)
        self.__dict__.setdefault("max_grad_norm", None)
        self.__dict__.setdefault("flatten", False)

    def add_param_group(self, param_group: dict) -> None:
        if param_group.get("use_muon", True) is False:
            param_group = {**ADAMW_DEFAULTS, **param_group}
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group.get("use_muon", True) is False:
            _check_adamw_group(group)
        else:
            for p in group["params"]:
                if is_dtensor(p):
                    shard_dim(p)  # refuses placements the owner exchange does not handle
                if p.ndim != 2 and not (self.flatten and p.ndim > 2):
                    raise ValueError(
                        f"Muon only supports 2D parameters whereas we found a parameter with size: {p.size()}"
                    )

    @torch.no_grad()
    def step(self, closure=None):
        """One step of every group (Muon groups as torch.optim.Muon, ``use_muon=False`` groups as
        torch.optim.AdamW), after clipping the gradients' global norm to ``max_grad_norm``.
        Under ``torch.compile`` the step itself runs eagerly (a graph break: its launches and
        torch's batched matmuls, as outside)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step()
        return loss

    @torch.compiler.disable
    def _step(self) -> None:
        # GradScaler (torch.amp's, or fusedopt's) hands a supporting optimizer its scale and inf
        # flag instead of unscaling the grads in place. The kernels unscale as its unscale_
        # would (g * fp32(1 / scale), in the grad's dtype) and skip on an inf on the device;
        # torch's ops (CPU without Triton) read the flag on the host and unscale new tensors.
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        muon, adamw = [], []
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if torch.is_complex(p):
                    raise RuntimeError("Muon does not support complex parameters")
                if p.grad.is_sparse:
                    raise RuntimeError("Muon does not support sparse gradients")
                check_param(p, p.grad)
            if group.get("use_muon", True) is False:
                adamw.append(group)
                continue
            for p in params:
                if p.grad.ndim != 2 and not (self.flatten and p.grad.ndim > 2):
                    raise ValueError("Param gradient must be a 2D matrix")
            check_newton_schulz(group["ns_coefficients"], group["ns_steps"])
            if params:
                muon.append((index, group, params))
        kernels, theirs = self._split(muon)
        if found_inf is not None and theirs and bool(found_inf):
            return
        clip = None
        if self.max_grad_norm is not None:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            if grads:
                # in fp32 (fp64 for fp64 grads) as the other fused optimizers: not rounded to bf16/fp16
                total = global_norm(split(grads), 2.0, grad_scale, exact=True)
                clip = clip_coefficient(total, self.max_grad_norm)
        inv_scale = None if grad_scale is None else grad_scale.double().reciprocal().float()
        for group, launch, grads, dtensors in kernels:
            device = launch.device
            exchange = None if dtensors is None else functools.partial(_orthogonalize, dtensors, group=group)
            launch.step(
                grads, group, _to(inv_scale, device), _to(found_inf, device), _to(clip, device), exchange
            )
        for group, params in theirs:
            grads = [p.grad for p in params]
            for factor in (inv_scale, clip):
                if factor is not None:
                    grads = _scaled(grads, factor)
            self._muon(group, params, grads)
        if adamw:
            self._adamw(adamw, grad_scale, found_inf, clip)

    def _split(self, muon: list[tuple[int, dict, list[torch.Tensor]]]) -> tuple[list, list]:
        """The Muon params with grads as ``(group, MuonLaunch, grads, dtensors)`` per group,
        device, dtype and kind (plain or DTensor: ``dtensors`` are then the params, whose
        matrices the step exchanges) for the kernels, and ``(group, params)`` for torch's ops:
        params on a device without Triton and tensors the kernels do not walk as they are (not
        contiguous, a grad or buffer of another dtype). Creates missing momentum buffers (a
        DTensor param's: a DTensor placed as it)."""
        launches = self.__dict__.setdefault("_launches", {})
        kernels, theirs = [], []
        for index, group, params in muon:
            mine: dict[tuple, list[torch.Tensor]] = {}
            rest = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                if _walkable(p, state["momentum_buffer"]):
                    mine.setdefault((p.device, p.dtype, is_dtensor(p)), []).append(p)
                else:
                    rest.append(p)
            for where, ps in mine.items():
                shards = [local(p) for p in ps]
                bufs = [local(self.state[p]["momentum_buffer"]) for p in ps]
                shapes = [_matrix_shape(p) for p in ps]  # whole matrices
                rows = [
                    (x.shape[0], shape[1]) for x, shape in zip(shards, shapes, strict=True)
                ]  # the local ones
                key = (group["adjust_lr_fn"], *((id(p), x.data_ptr(), b.data_ptr(), r) for p, x, b, r in zip(
                    ps, shards, bufs, rows, strict=True)))  # fmt: skip
                known = launches.get((index, where))
                if known is None or known[0] != key:
                    ratios = [adjusted_lr(1.0, group["adjust_lr_fn"], s) for s in shapes]
                    tall = [p.ndim == 2 and s[0] > s[1] for p, s in zip(ps, shapes, strict=True)]
                    known = launches[index, where] = (key, MuonLaunch(shards, bufs, rows, ratios, tall))
                kernels.append((group, known[1], [local(p.grad) for p in ps], ps if where[2] else None))
            if rest:
                theirs.append((group, rest))
        return kernels, theirs

    def _muon(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """torch.optim.Muon's step of one group with torch's ops: the momentum of all params in
        one multi-tensor pass, Newton–Schulz batched per shape, the decay and update per matrix
        shape."""
        bufs = [local(self.state[p]["momentum_buffer"]) for p in params]
        grads = [local(g) for g in grads]  # DTensors: their local shards
        momentum = group["momentum"]
        torch._foreach_lerp_(bufs, grads, 1 - momentum)
        updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) and lr.dim() != 0:
            lr = lr.squeeze()  # torch's _to_scalar: a tensor lr stays a 0-d tensor
        shapes = [_matrix_shape(p) for p in params]
        orthogonal = _orthogonalize(
            params, [u.reshape(u.shape[0], shape[1]) for u, shape in zip(updates, shapes, strict=True)], group
        )
        by_shape: dict[tuple, tuple[list, list]] = {}
        for p, shape, o in zip(params, shapes, orthogonal, strict=True):
            mine = by_shape.setdefault((shape, p.device, p.dtype), ([], []))
            mine[0].append(local(p))
            mine[1].append(o.reshape(local(p).shape))
        for (shape, _, _), (ps, os) in by_shape.items():
            # torch's ops with torch's operands: a tensor lr's decay factor is a 0-d tensor (cast to
            # a bf16 param's dtype by mul_, as torch's step does), its alpha read as a number
            decay = 1 - lr * group["weight_decay"]
            if ps[0].dtype in (torch.float32, torch.float64):
                torch._foreach_mul_(ps, decay)
            else:  # foreach rounds a number to a bf16/fp16 list's dtype first; mul_ does not
                for p in ps:
                    p.mul_(decay)
            alpha = -adjusted_lr(lr, group["adjust_lr_fn"], shape)
            if isinstance(alpha, torch.Tensor):
                for p, o in zip(ps, os, strict=True):
                    p.add_(o, alpha=alpha)
            else:
                torch._foreach_add_(ps, os, alpha=alpha)

    def _adamw(
        self,
        groups: list[dict],
        grad_scale: torch.Tensor | None,
        found_inf: torch.Tensor | None,
        clip: torch.Tensor | None,
    ) -> None:
        """The ``use_muon=False`` groups: one step of a :class:`FusedAdamW` over them (its
        launches, its state kept in this optimizer's ``state``), with this step's GradScaler
        values and clip coefficient (the global norm covers every group)."""
        key = tuple((id(g), tuple(map(id, g["params"]))) for g in groups)
        known = self.__dict__.get("_aux")
        if known is None or known[0] != key:
            known = self.__dict__["_aux"] = (
                key,
                _AuxAdamW([{"params": g["params"], **_adamw_hyper(g)} for g in groups]),
            )
        aux = known[1]
        for inner, group in zip(aux.param_groups, groups, strict=True):
            inner.update(_adamw_hyper(group))
        if aux.state is not self.state:  # one state: ours, held by the AdamW step's tracking dict
            aux.__dict__["state"] = self.state
            aux._own_state()
            aux._reset_plans(counters=True)
            self.__dict__["state"] = aux.state
        aux.given_clip = clip
        amp = {k: v for k, v in (("grad_scale", grad_scale), ("found_inf", found_inf)) if v is not None}
        aux.__dict__.update(amp)
        try:
            aux.step()
        finally:
            for k in amp:
                aux.__dict__.pop(k, None)


class _AuxAdamW(FusedAdamW):
    """FusedMuon's ``use_muon=False`` groups: FusedAdamW's step with the clip coefficient
    FusedMuon computed over all of its groups."""

    given_clip: torch.Tensor | None = None

    def _clip_coefficient(self, planned, theirs, amp):
        return self.given_clip

    def _traced_clip_coefficient(self, grads, theirs, amp):
        return self.given_clip


def _adamw_hyper(group: dict) -> dict:
    """The AdamW hyper-parameters of a ``use_muon=False`` group."""
    return {k: group[k] for k in ("lr", "betas", "eps", "weight_decay")}


def _walkable(p: torch.Tensor, buf: torch.Tensor) -> bool:
    """Whether the kernels step this param (a DTensor: its local shard, its buffer a DTensor
    placed as it): on a Triton device, of a float dtype, it, its grad and its buffer contiguous
    and of one dtype and shape."""
    if is_dtensor(p) and not (is_dtensor(buf) and buf.placements == p.placements):
        return False
    p, g, buf = local(p), local(p.grad), local(buf)
    return (
        runs_triton(p.device)
        and p.dtype in TL_DTYPE
        and g.dtype == buf.dtype == p.dtype
        and g.shape == buf.shape == p.shape
        and p.is_contiguous()
        and g.is_contiguous()
        and buf.is_contiguous()
        and buf.device == g.device == p.device
    )


def _to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def _orthogonalize(
    params: list[torch.Tensor], matrices: list[torch.Tensor], group: dict
) -> list[torch.Tensor]:
    """Newton–Schulz of each param's update (``matrices[i]``: the ``[shape[0], -1]`` view of
    ``params[i]``'s, a DTensor param's local rows of it), each result shaped as its input.
    Plain params: :func:`newton_schulz` here. Any DTensor param (FSDP2): every whole matrix on
    one owner rank, the rows sent there and back by two all-to-alls per process group
    (:func:`fusedopt.optim._muon_dist.orthogonalize_sharded`)."""

    def orthogonalize(ms: list[torch.Tensor]) -> list[torch.Tensor]:
        return newton_schulz(ms, group["ns_coefficients"], group["ns_steps"], group["eps"])

    return (
        orthogonalize_sharded(params, matrices, orthogonalize)
        if any_dtensor(params)
        else orthogonalize(matrices)
    )


def _scaled(grads: list[torch.Tensor], coef: torch.Tensor) -> list[torch.Tensor]:
    """``g * coef`` for each grad, as torch's clip and GradScaler's unscale multiply them (on new
    tensors)."""
    coef = coef.reshape(())
    # in the grad's dtype, as in-place mul_ (a 0-d grad times the fp32 factor would promote)
    return [(g * coef.to(g.device)).to(g.dtype) for g in grads]


def _check_adamw_group(group: dict) -> None:
    """torch.optim.AdamW's validation of the group's hyper-parameters."""
    lr, eps, betas, weight_decay = group["lr"], group["eps"], group["betas"], group["weight_decay"]
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not lr >= 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not eps >= 0.0:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not weight_decay >= 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


HEAD_NAMES = ("lm_head", "head", "output", "classifier", "fc_out")


def muon_param_groups(
    model: nn.Module, *, flatten: bool = False, head_names: Iterable[str] = HEAD_NAMES, **adamw
) -> list[dict]:
    """The params of ``model`` split the way Muon is used: ``[{"params": muon}, {"params":
    adamw, "use_muon": False, **adamw}]`` (empty groups left out), for :class:`FusedMuon`.

    Rules, in order, for each distinct param (a tied weight counts once, by its first module):

    1. fewer than 2 dims (biases, norms' weights, scalars): AdamW;
    2. a param of an ``nn.Embedding`` or ``nn.EmbeddingBag``, or tied to one: AdamW;
    3. the output head: a param of a module whose name's last part is in ``head_names``, or of
       an ``nn.Linear`` whose ``out_features`` is an embedding's ``num_embeddings`` (a vocabulary
       projection): AdamW;
    4. more than 2 dims: Muon if ``flatten`` (pass the same ``flatten=True`` to FusedMuon),
       else AdamW;
    5. every other matrix (the hidden layers'): Muon.

    ``adamw`` (e.g. ``lr=3e-4, betas=(0.9, 0.95), weight_decay=0.01``) goes into the AdamW
    group; keys it leaves out take FusedMuon's defaults."""
    heads = set(head_names)
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding | nn.EmbeddingBag)]
    vocab = {m.num_embeddings for m in embeddings}
    embedding_params = {id(p) for m in embeddings for p in m.parameters(recurse=False)}
    head_params = set()
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in heads or (isinstance(m, nn.Linear) and m.out_features in vocab):
            head_params.update(id(p) for p in m.parameters(recurse=False))
    muon, other = [], []
    for p in model.parameters():  # each distinct param once
        if p.ndim < 2 or id(p) in embedding_params or id(p) in head_params or (p.ndim > 2 and not flatten):
            other.append(p)
        else:
            muon.append(p)
    groups = []
    if muon:
        groups.append({"params": muon})
    if other:
        groups.append({"params": other, "use_muon": False, **adamw})
    return groups
