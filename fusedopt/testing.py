"""Parity with torch, as the tests and ``fusedopt check`` run it, for your own options too.

* **Cases**: :class:`OptimCase` (a fused optimizer, the torch class it replaces, options) and
  :data:`OPTIM_CASES`; :class:`LossCase` and :data:`LOSS_CASES`; :class:`LinearCECase` and
  :data:`LINEAR_CE_CASES` (the ops on a linear head: the fused linear cross-entropy, the
  linear log-probs and entropy); :class:`DistillationCase` and :data:`DISTILLATION_CASES` (the
  fused linear distillation loss).
* **Layouts**: :func:`odd_params` (0-d, empty, 1, 7, 4097 elements, 3-d, a strided slice, a
  transposed matrix), :func:`gpt_shapes` (a small GPT's params), :func:`many_small_shapes`,
  :func:`one_large_shape`.
* **The tolerance contract** (tables in :mod:`fusedopt.tolerance`): :func:`assert_close`, and
  :class:`Result`, which folds many tensors into one verdict with its worst element.
* **The runners**: :func:`compare_optimizer` steps a fused optimizer and torch's (its for-loop
  path) side by side and compares every param and state tensor; :func:`compare_loss` compares a
  fused loss's value and input gradient; :func:`compare_linear_cross_entropy` the fused linear
  cross-entropy's (or another linear-head op's) value and gradients of input, weight and bias;
  :func:`compare_linear_distillation` the distillation loss's value and student gradients.
  :func:`assert_optimizer_matches` is the one-call form::

      import torch, fusedopt
      from fusedopt.testing import assert_optimizer_matches

      assert_optimizer_matches(fusedopt.FusedAdamW, torch.optim.AdamW, dict(lr=1e-3, amsgrad=True))

Oracles: fp32/fp64 against torch on the same tensors; bf16/fp16 against torch in fp32 from the
same values, params and every state tensor rounded to the dtype after each step. The linear
cross-entropy: against the composition in fp64, within twice the composition's own error in the
dtype (``LINEAR_CE_TOLERANCE``).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import fusedopt
from fusedopt import functional as FF
from fusedopt.losses.cross_entropy import cross_entropy_composition, z_loss_composition
from fusedopt.losses.linear_cross_entropy import linear_cross_entropy_reference
from fusedopt.losses.linear_distillation import linear_distillation_reference
from fusedopt.losses.linear_log_probs import linear_log_probs_reference
from fusedopt.optim import _amp, _precision, _quantize
from fusedopt.optim import muon as _muon
from fusedopt.optim._fused import EXTENSIONS
from fusedopt.tolerance import (
    CLIP_TOLERANCE,
    LINEAR_CE_TOLERANCE,
    LINEAR_DISTILLATION_TOLERANCE,
    LOSS_TOLERANCE,
    MUON_TOLERANCE,
    OPTIM_TOLERANCE,
    allowed_error,
    linear_ce_allowed_error,
    round_to_storage_,
)

__all__ = [
    "DISTILLATION_CASES",
    "LINEAR_CE_CASES",
    "LOSS_CASES",
    "MUON_CASES",
    "OPTIM_CASES",
    "DistillationCase",
    "LinearCECase",
    "LossCase",
    "OptimCase",
    "Result",
    "assert_close",
    "assert_optimizer_matches",
    "compare_linear_cross_entropy",
    "compare_linear_distillation",
    "compare_loss",
    "compare_muon",
    "compare_optimizer",
    "describe",
    "gpt_shapes",
    "leaves",
    "many_small_shapes",
    "odd_grads",
    "odd_params",
    "one_large_shape",
    "run_linear_cross_entropy",
    "run_linear_distillation",
]

LOW_PRECISION = (torch.bfloat16, torch.float16)
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


# Cases ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimCase:
    """A fused optimizer and the torch.optim class it must match, with one set of options."""

    fused_cls: type[torch.optim.Optimizer]
    torch_cls: type[torch.optim.Optimizer]
    kwargs: dict = field(default_factory=dict)
    group: str = ""  # the name ``fusedopt check --optimizers`` selects it by (default: "sgd", ...)
    # Named shapes ``fusedopt check`` adds to its param list for this case (8-bit state starts
    # at MIN_NUMEL elements, more than any tensor of the check's CPU layout holds).
    extra_params: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def __post_init__(self):
        if not self.group:
            object.__setattr__(self, "group", self.torch_cls.__name__.lower())

    @property
    def id(self) -> str:
        return f"{self.fused_cls.__name__}({','.join(f'{k}={v}' for k, v in self.kwargs.items())})"


def for_loop(torch_cls: type[torch.optim.Optimizer]) -> dict:
    """The keyword that picks the for-loop path of ``torch_cls`` (``foreach=False``), none for a
    class with one path (:class:`fusedopt.optim.lion.Lion`)."""
    return {"foreach": False} if "foreach" in inspect.signature(torch_cls).parameters else {}


def _cases(fused_cls, torch_cls, *option_sets: dict) -> list[OptimCase]:
    return [OptimCase(fused_cls, torch_cls, kwargs) for kwargs in option_sets]


SGD, ADAM, ADAMW = torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW
LION = fusedopt.optim.lion.Lion
OPTIM_CASES: list[OptimCase] = [
    *_cases(
        fusedopt.FusedSGD, SGD, dict(lr=0.1), dict(lr=0.1, momentum=0.9),
        dict(lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.1),
        dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01),
        dict(lr=0.1, momentum=0.9, maximize=True), dict(lr=0.1, weight_decay=0.2, maximize=True),
        dict(lr=0.1, momentum=0.9, max_grad_norm=1.0),
    ),
    *_cases(
        fusedopt.FusedAdam, ADAM, dict(lr=0.01), dict(lr=0.01, weight_decay=0.1),
        dict(lr=0.01, amsgrad=True, betas=(0.8, 0.9)), dict(lr=0.01, maximize=True, eps=1e-3),
        dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True), dict(lr=0.01, capturable=True, amsgrad=True),
    ),
    *_cases(
        fusedopt.FusedAdamW, ADAMW, dict(lr=0.01), dict(lr=0.01, weight_decay=0.5, amsgrad=True, maximize=True),
        dict(lr=0.01, max_grad_norm=1.0),
    ),
    *_cases(
        fusedopt.FusedRMSprop, torch.optim.RMSprop, dict(lr=0.01), dict(lr=0.01, centered=True, weight_decay=0.1),
        dict(lr=0.01, momentum=0.9, alpha=0.9, maximize=True),
        # alpha < 0.5: lerp's other branch (weight 1 - alpha >= 0.5).
        dict(lr=0.01, alpha=0.3, eps=1e-3, centered=True, momentum=0.5, capturable=True),
    ),
    *_cases(
        fusedopt.FusedAdagrad, torch.optim.Adagrad, dict(lr=0.1), dict(lr=0.1, lr_decay=0.05, weight_decay=0.1),
        dict(lr=0.1, initial_accumulator_value=0.1, eps=1e-3, weight_decay=0.2, maximize=True),
    ),
    # Low-precision options (docs/low-precision.md): against torch in fp32, rounded as ours is stored.
    *_cases(fusedopt.FusedAdamW, ADAMW, dict(lr=0.01, master_weights=True), dict(lr=0.01, state_dtype=torch.bfloat16)),
    *_cases(fusedopt.FusedAdam, ADAM, dict(lr=0.01, weight_decay=0.1, kahan_summation=True)),
    *_cases(fusedopt.FusedSGD, SGD, dict(lr=0.1, momentum=0.9, stochastic_rounding=True)),
    # Just over the 8-bit minimum: 16 blocks of 256 and a block of one element.
    OptimCase(
        fusedopt.FusedAdamW, ADAMW, dict(lr=0.01, state_dtype="int8"),
        extra_params=(("int8.weight", (_quantize.MIN_NUMEL + 1,)),),
    ),
    *_cases(
        fusedopt.FusedAdamax, torch.optim.Adamax, dict(lr=0.01), dict(lr=0.01, betas=(0.8, 0.9), weight_decay=0.1),
        dict(lr=0.01, maximize=True, eps=1e-3), dict(lr=0.01, capturable=True), dict(lr=0.01, max_grad_norm=1.0),
        dict(lr=0.01, state_dtype=torch.bfloat16),
    ),
    *_cases(
        fusedopt.FusedRAdam, torch.optim.RAdam, dict(lr=0.01), dict(lr=0.01, betas=(0.8, 0.9), weight_decay=0.1),
        dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
        # the rectified branch from step 6 (rho_t > 5), the plain one before
        dict(lr=0.01, betas=(0.9, 0.9), eps=1e-3, capturable=True), dict(lr=0.01, max_grad_norm=1.0),
        dict(lr=0.01, state_dtype=torch.bfloat16),
    ),
    *_cases(
        fusedopt.FusedNAdam, torch.optim.NAdam, dict(lr=0.01), dict(lr=0.01, betas=(0.8, 0.9), momentum_decay=0.01),
        dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
        dict(lr=0.01, weight_decay=0.1, eps=1e-3, capturable=True), dict(lr=0.01, max_grad_norm=1.0),
        dict(lr=0.01, state_dtype=torch.bfloat16),
    ),
    *_cases(
        fusedopt.FusedAdadelta, torch.optim.Adadelta, dict(), dict(lr=0.5, rho=0.8, weight_decay=0.1),
        dict(maximize=True, eps=1e-3), dict(capturable=True), dict(max_grad_norm=1.0),
        dict(state_dtype=torch.bfloat16),
    ),
    *_cases(
        fusedopt.FusedRprop, torch.optim.Rprop, dict(), dict(lr=0.05, etas=(0.3, 1.5), step_sizes=(0.01, 0.06)),
        dict(maximize=True), dict(capturable=True), dict(max_grad_norm=1.0), dict(state_dtype=torch.bfloat16),
    ),
    # Lion: torch has none; against the reference's for-loop (fusedopt.optim.lion.Lion).
    *_cases(
        fusedopt.FusedLion, LION, dict(lr=0.01), dict(lr=0.01, betas=(0.8, 0.95), weight_decay=0.1),
        dict(lr=0.01, maximize=True, weight_decay=0.5), dict(lr=0.01, max_grad_norm=1.0),
        dict(lr=0.01, master_weights=True), dict(lr=0.01, kahan_summation=True),
        dict(lr=0.01, state_dtype=torch.bfloat16),
    ),
    OptimCase(
        fusedopt.FusedLion, LION, dict(lr=0.01, state_dtype="int8"),
        extra_params=(("int8.weight", (_quantize.MIN_NUMEL + 1,)),),
    ),
]  # fmt: skip


# FusedMuon: its Muon groups against torch.optim.Muon, its use_muon=False group against
# torch.optim.AdamW (separate lists: the runners above are torch.optim-class-shaped).
MUON_ADAMW = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
MUON_CASES: list[OptimCase] = [
    OptimCase(fusedopt.FusedMuon, torch.optim.Muon, dict(lr=0.02), group="muon"),
    OptimCase(
        fusedopt.FusedMuon, torch.optim.Muon,
        dict(lr=0.02, nesterov=False, momentum=0.9, weight_decay=0.01, adjust_lr_fn="match_rms_adamw"), group="muon",
    ),
    OptimCase(fusedopt.FusedMuon, torch.optim.Muon, dict(lr=0.02, max_grad_norm=1.0), group="muon"),
]  # fmt: skip


@dataclass(frozen=True)
class LossCase:
    """A fused op and torch's, with one set of options.

    ``inputs``: ``"reduce"`` (one float matrix), ``"regression"`` (input and target matrices) or
    ``"classification"`` (logits and class indices; ``weighted`` adds a class weight). A 0-d
    result is back-propagated with ``grad_output``, any other with a random tensor.
    """

    name: str
    fused: Callable[..., torch.Tensor]
    reference: Callable[..., torch.Tensor]
    inputs: str
    kwargs: dict = field(default_factory=dict)
    grad_output: float = 1.0
    weighted: bool = False


LOSS_CASES: list[LossCase] = [
    LossCase("mean", FF.mean, torch.mean, "reduce"),
    LossCase("mean", FF.mean, torch.mean, "reduce", dict(dim=-1)),
    LossCase("mse_loss", FF.mse_loss, F.mse_loss, "regression"),
    LossCase("mse_loss", FF.mse_loss, F.mse_loss, "regression", dict(reduction="sum"), grad_output=-1.25),
    LossCase("mse_loss", FF.mse_loss, F.mse_loss, "regression", dict(reduction="none")),
    LossCase("l1_loss", FF.l1_loss, F.l1_loss, "regression"),
    LossCase("smooth_l1_loss", FF.smooth_l1_loss, F.smooth_l1_loss, "regression", dict(beta=0.5)),
    LossCase(
        "huber_loss", FF.huber_loss, F.huber_loss, "regression", dict(delta=0.5, reduction="sum"), -1.25
    ),
    LossCase("cross_entropy", FF.cross_entropy, F.cross_entropy, "classification"),
    LossCase(
        "cross_entropy",
        FF.cross_entropy,
        F.cross_entropy,
        "classification",
        dict(label_smoothing=0.1, ignore_index=3),
        grad_output=-1.25,
    ),
    LossCase(
        "cross_entropy",
        FF.cross_entropy,
        F.cross_entropy,
        "classification",
        dict(reduction="none"),
        weighted=True,
    ),
    # the z-loss (PaLM's) against its plain-torch composition
    LossCase(
        "cross_entropy",
        FF.cross_entropy,
        z_loss_composition,
        "classification",
        dict(z_loss=1e-2, label_smoothing=0.1, ignore_index=3),
        grad_output=-1.25,
        weighted=True,
    ),
    LossCase(
        "cross_entropy",
        FF.cross_entropy,
        z_loss_composition,
        "classification",
        dict(reduction="none", z_loss=1e-2),
    ),
    # Gemma 2's logit soft-capping (logits of order 1: a cap of 1 bends most), against the composition
    LossCase(
        "cross_entropy",
        FF.cross_entropy,
        cross_entropy_composition,
        "classification",
        dict(softcap=1.0, z_loss=1e-2, label_smoothing=0.1, ignore_index=3),
        grad_output=-1.25,
        weighted=True,
    ),
    LossCase(
        "cross_entropy",
        FF.cross_entropy,
        cross_entropy_composition,
        "classification",
        dict(reduction="none", softcap=1.0),
    ),
]


@dataclass(frozen=True)
class LinearCECase:
    """The fused linear cross-entropy (``fused``) and the composition it replaces
    (``reference``: ``F.cross_entropy(F.linear(input, linear_weight, linear_bias), ...)``), with
    one set of options: ``kwargs`` of ``F.cross_entropy``, a class weight (``weighted``), a bias;
    ``vocab_blocks`` > 0: the vocabulary order, in that many blocks of classes. Another op on a
    linear head, ``fused(input, linear_weight, target, linear_bias, **kwargs)``, with its
    reference (``linear_log_probs``; ``chunked=False``: it takes no ``chunk_rows``). A 0-d
    result is back-propagated with ``grad_output``, any other with a random tensor (several
    outputs: stacked)."""

    name: str
    kwargs: dict = field(default_factory=dict)
    grad_output: float = 1.0
    weighted: bool = False
    bias: bool = True
    vocab_blocks: int = 0
    fused: Callable[..., torch.Tensor] = FF.linear_cross_entropy
    reference: Callable[..., torch.Tensor] = linear_cross_entropy_reference
    chunked: bool = True  # the op takes chunk_rows

    @property
    def options(self) -> str:
        flags = (
            ("weight", self.weighted),
            ("bias", self.bias),
            (f"vocab/{self.vocab_blocks}", self.vocab_blocks),
        )
        return describe(self.kwargs, " ".join(e for e, on in flags if on))


LINEAR_CE_CASES: list[LinearCECase] = [
    LinearCECase("linear_cross_entropy"),
    LinearCECase(
        "linear_cross_entropy",
        dict(reduction="sum", label_smoothing=0.1, ignore_index=3),
        grad_output=-1.25,
        bias=False,
    ),
    LinearCECase("linear_cross_entropy", dict(reduction="none"), weighted=True),
    LinearCECase(
        "linear_cross_entropy", dict(label_smoothing=0.1), grad_output=-1.25, weighted=True, vocab_blocks=3
    ),
    LinearCECase("linear_cross_entropy", dict(z_loss=1e-2, ignore_index=3), weighted=True),  # PaLM's z-loss
    LinearCECase(  # Gemma 2's soft-capping, in the vocabulary order (the log-sum-exp kernel's cap)
        "linear_cross_entropy", dict(softcap=1.5, z_loss=1e-2), grad_output=-1.25, vocab_blocks=3
    ),
    # per-token log-probs and entropy (RL trainers) at a temperature, against their composition
    LinearCECase(
        "linear_log_probs",
        dict(temperature=0.7, return_entropy=True),
        fused=FF.linear_log_probs,
        reference=linear_log_probs_reference,
        chunked=False,
    ),
    LinearCECase(
        "linear_log_probs",
        bias=False,
        fused=FF.linear_log_probs,
        reference=linear_log_probs_reference,
        chunked=False,
    ),
]


@dataclass(frozen=True)
class DistillationCase:
    """The fused linear distillation loss (``fused``) and its composition (``reference``:
    ``fusedopt.losses.linear_distillation.linear_distillation_reference``) with one set of
    options: ``kwargs`` of ``linear_distillation_loss`` (with an ``ignore_index``, every fifth
    token's target is it), biases on both heads (``bias``). A 0-d result is back-propagated with
    ``grad_output``, any other with a random tensor."""

    name: str
    kwargs: dict = field(default_factory=dict)
    grad_output: float = 1.0
    bias: bool = True
    fused: Callable[..., torch.Tensor] = FF.linear_distillation_loss
    reference: Callable[..., torch.Tensor] = linear_distillation_reference

    @property
    def options(self) -> str:
        return describe(self.kwargs, "bias" if self.bias else "")


DISTILLATION_CASES: list[DistillationCase] = [
    DistillationCase("linear_distillation_loss"),
    DistillationCase(
        "linear_distillation_loss", dict(divergence="reverse_kl", temperature=2.0, reduction="sum"),
        grad_output=-1.25, bias=False,
    ),
    DistillationCase("linear_distillation_loss", dict(divergence="jsd", beta=0.3, temperature=0.7, ignore_index=3)),
    DistillationCase("linear_distillation_loss", dict(divergence="jsd", beta=0.0, reduction="none")),
]  # fmt: skip

SHORT = {"momentum": "mom", "dampening": "damp", "weight_decay": "wd", "decoupled_weight_decay": "decoupled"}


def describe(kwargs: dict, extra: str = "") -> str:
    """Options in a few characters: ``lr=0.1 mom=0.9 nesterov wd=0.01``."""
    parts = []
    for k, v in kwargs.items():
        k = SHORT.get(k, k)
        parts.append(k if v is True else f"{k}={tuple(v) if isinstance(v, list) else v}")
    return " ".join([*parts, extra]).strip() or "defaults"


# Layouts --------------------------------------------------------------------------------------


def odd_params(device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """Odd shapes: 0-d, empty, 1, 7, 4097, 3-d, a strided slice, a transposed matrix."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    return [rnd(), rnd(0), rnd(1), rnd(7), rnd(4097), rnd(3, 5, 7), rnd(6, 10)[:, ::3], rnd(9, 4).t()]


def odd_grads(params: Sequence[torch.Tensor], step: int, seed: int = 1) -> list[torch.Tensor]:
    """Fresh grads for a step. Odd steps give the transposed param a contiguous grad
    (strides that differ from the param's)."""
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    grads = []
    for p in params:
        g = torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype)
        grads.append(g if step % 2 or p.is_contiguous() else torch.empty_like(p).copy_(g))
    return grads


def gpt_shapes(width: int, layers: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a small GPT's params (torch ``nn.Linear`` layout: out x in), and a
    0-d scalar."""
    d = width
    shapes: list[tuple[str, tuple[int, ...]]] = [("wte", (vocab, d))]
    for i in range(layers):
        h = f"h.{i}."
        shapes += [
            (h + "ln_1.weight", (d,)), (h + "ln_1.bias", (d,)),
            (h + "attn.qkv.weight", (3 * d, d)), (h + "attn.qkv.bias", (3 * d,)),
            (h + "attn.proj.weight", (d, d)), (h + "attn.proj.bias", (d,)),
            (h + "ln_2.weight", (d,)), (h + "ln_2.bias", (d,)),
            (h + "mlp.fc.weight", (4 * d, d)), (h + "mlp.fc.bias", (4 * d,)),
            (h + "mlp.proj.weight", (d, 4 * d)), (h + "mlp.proj.bias", (d,)),
        ]  # fmt: skip
    return [*shapes, ("ln_f.weight", (d,)), ("ln_f.bias", (d,)), ("logit_scale", ())]


def many_small_shapes(count: int = 1000, numel: int = 4096) -> list[tuple[int, ...]]:
    return [(numel,)] * count


def one_large_shape(numel: int = 64 * 2**20) -> list[tuple[int, ...]]:
    return [(numel,)]


def leaves(tensors: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Independent leaf copies with the same layout (strided views stay strided views)."""
    out = []
    for t in tensors:
        base = t.detach() if dtype is None else t.detach().to(dtype)
        if t.numel() <= 1 or torch.empty_like(t).stride() == t.stride():
            copy = torch.empty_strided(base.size(), base.stride(), dtype=base.dtype, device=base.device)
        else:  # a strided view of a larger buffer (odd_params' slice)
            holder = torch.zeros(base.shape[0], base.shape[1] * 3, dtype=base.dtype, device=base.device)
            copy = holder[:, ::3]
        out.append(copy.copy_(base).requires_grad_())
    return out


# The tolerance contract -----------------------------------------------------------------------


@dataclass
class Result:
    """One comparison: the largest relative error of each compared tensor kind, the largest
    ratio of an element's error to what the contract allows there, and where it was."""

    kind: str  # "optimizer", "loss", "linear_ce" or "distillation"
    name: str
    options: str = ""
    dtype: str = ""
    steps: int | None = None
    shape: str = ""
    errors: dict[str, float] = field(default_factory=dict)  # kind -> max|a-e| / max|e|
    ratio: float = 0.0  # largest element error / what the tolerance allows there
    worst: str = ""  # where ``ratio`` was reached
    notes: list[str] = field(default_factory=list)  # contract breaches other than values
    error: str = ""  # an exception

    @property
    def verdict(self) -> str:
        if self.error:
            return "ERROR"
        return "PASS" if self.ratio <= 1.0 and not self.notes else "FAIL"

    def explain(self) -> str:
        """The verdict with the worst element and the notes, for an assertion message."""
        lines = [f"{self.verdict}: {self.name} {self.options} {self.dtype}".rstrip()]
        if self.ratio > 1.0:
            lines.append(f"worst {self.worst} (error {self.ratio:.3g}x what the tolerance allows)")
        return "\n".join([*lines, *self.notes, *([self.error] if self.error else [])])

    def compare(
        self, what: str, where: str, actual: torch.Tensor, expected: torch.Tensor, table: dict
    ) -> None:
        """Fold one tensor into the errors of ``what`` and into ``ratio`` (NaN must match NaN)."""
        if actual.shape != expected.shape:
            self.notes.append(f"{where}: shape {tuple(actual.shape)} vs torch {tuple(expected.shape)}")
            return
        dtype = actual.dtype
        a = actual.detach().cpu().double()
        e = expected.detach().cpu().to(dtype)
        self.errors.setdefault(what, 0.0)
        if a.numel() == 0:
            return
        ed = e.double()
        # Equal values (infinities, NaN and NaN) are no error; a NaN or an infinity against
        # anything else is an infinite one. Scales and allowances come from finite values.
        same = (a == ed) | (a.isnan() & ed.isnan())
        finite = ed.isfinite() & a.isfinite()
        err = torch.where(same, 0.0, torch.where(finite, (a - ed).abs(), math.inf))
        e_finite = torch.where(ed.isfinite(), e, torch.zeros((), dtype=dtype))
        scale = float(e_finite.double().abs().max())
        rel = float(err.max()) / scale if scale > 0 else float(err.max())
        self.errors[what] = max(self.errors[what], rel)
        ratios = err / allowed_error(e_finite, dtype, table).clamp_min(1e-300)
        i = int(ratios.argmax())
        if float(ratios.flatten()[i]) > self.ratio:
            self.ratio = float(ratios.flatten()[i])
            idx = [int(x) for x in torch.unravel_index(torch.tensor(i), a.shape)] if a.dim() else ""
            self.worst = f"{where}{idx}: {a.flatten()[i].item():.9g} vs torch {ed.flatten()[i].item():.9g}"


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, what: str = "tensor", table: dict = OPTIM_TOLERANCE
) -> None:
    """Raise ``AssertionError`` naming the worst element if ``actual`` is outside the contract
    (``table``: ``OPTIM_TOLERANCE`` or ``LOSS_TOLERANCE``) around the oracle ``expected``."""
    result = Result("tensor", what)
    result.compare("value", what, actual, expected, table)
    if result.verdict != "PASS":
        raise AssertionError(result.explain())


# Runners --------------------------------------------------------------------------------------


def _round_new_state(ref: torch.optim.Optimizer, theirs: list[torch.Tensor], rounding: tuple) -> None:
    """Round the state the oracle creates in a step (in its ``_init_group``) before the step uses
    it, as ours is stored from the start (Rprop's ``step_size``, filled with ``lr``): rounding
    what is already rounded changes nothing."""
    init = getattr(ref, "_init_group", None)
    if init is None:
        return

    def _init_group(*args, **kwargs):
        out = init(*args, **kwargs)
        round_to_storage_(ref, theirs, *rounding)
        return out

    ref._init_group = _init_group


def compare_optimizer(
    case: OptimCase,
    params: Sequence[torch.Tensor],
    grads: Callable[[list[torch.Tensor], int], list[torch.Tensor]] = odd_grads,
    steps: int = 7,
    names: Sequence[str] | None = None,
) -> Result:
    """``steps`` steps of ``case.fused_cls`` and of ``case.torch_cls`` (its for-loop path) from
    the values and layouts of ``params`` with the same grads (``grads(params, step)``); every
    param and state tensor compared, state keys, dtypes and ``step`` counts checked.
    ``max_grad_norm`` is matched by ``clip_grad_norm_`` before torch's step."""
    dtype, device = params[0].dtype, params[0].device
    names = (
        list(names) if names is not None else [f"param {i} {tuple(p.shape)}" for i, p in enumerate(params)]
    )
    result = Result(
        "optimizer", case.fused_cls.__name__, describe(case.kwargs), DTYPE_NAMES.get(dtype, str(dtype)), steps
    )
    low = dtype in LOW_PRECISION
    ours, theirs = leaves(params), leaves(params, torch.float32 if low else None)
    kwargs = dict(case.kwargs)
    if device.type == "cpu":  # torch refuses capturable on CPU, and so do we; the algorithm is the same
        kwargs.pop("capturable", None)
    opt = case.fused_cls(ours, **kwargs)
    torch_kwargs = {k: v for k, v in kwargs.items() if k not in EXTENSIONS}
    ref = case.torch_cls(theirs, **for_loop(case.torch_cls), **torch_kwargs)
    # The oracle is torch in fp32 whose params and state are rounded as ours are stored:
    # params kept whole where master weights or a compensation keep their low bits (or where
    # stochastic rounding keeps them on average: then each step may be one rounding step off).
    precision = opt.precision
    stored = precision.state_dtype_for(dtype)
    exact_params = precision.mode(dtype) != 0 or (low and precision.stochastic_rounding)
    rounding = (None if exact_params else dtype, stored if stored in LOW_PRECISION else torch.float32)
    table = OPTIM_TOLERANCE
    if low and precision.stochastic_rounding:  # each store up to one step (of the tensor's scale) off
        table = {**OPTIM_TOLERANCE, dtype: dict(rtol=steps * torch.finfo(dtype).eps)}
    if low or stored in LOW_PRECISION:  # state torch creates in its constructor (Adagrad's sum) too
        round_to_storage_(ref, theirs, *rounding)
        _round_new_state(ref, theirs, rounding)
    for step in range(steps):
        for p, q, g in zip(ours, theirs, grads(ours, step), strict=True):
            p.grad, q.grad = g, g.to(q.dtype)
        with torch.random.fork_rng(devices=[]), _observed_clip() as coefficients:
            torch.manual_seed(step)  # stochastic rounding's seeds: the same every run
            opt.step()
        if "max_grad_norm" in case.kwargs:
            _clip_as_ours_(result, step, coefficients, theirs, case.kwargs["max_grad_norm"])
        ref.step()
        if low or stored in LOW_PRECISION:  # the oracle: torch in fp32, rounded as ours is stored
            round_to_storage_(ref, theirs, *rounding)
        if precision.quantized:  # 8-bit state: the oracle's state through the same quantizer
            _requantize_(opt, ref, ours, theirs)
    eight_bit = 0  # state tensors compared as 8-bit codes
    carried = opt.algorithm.carried
    for name, p, q in zip(names, ours, theirs, strict=True):
        result.compare("param", name, p, q, table)
        mine, expected = opt.state.get(p, {}), ref.state.get(q, {})
        if "master_weight" in mine:  # the fp32 copy: torch's fp32 param itself
            result.compare("master_weight", f"{name} master", mine["master_weight"], q, OPTIM_TOLERANCE)
        mine = {k: _dequantized(opt, p, k, v) for k, v in mine.items() if not _precision.ours(k)}
        if list(mine) != list(expected):
            result.notes.append(f"{name}: state keys {list(mine)} vs torch {list(expected)}")
        for key in expected.keys() & mine.keys():
            if key == "step":  # on the param's device (torch: only when fused or capturable)
                step_ok = float(mine[key]) == float(expected[key]) and mine[key].dtype == expected[key].dtype
                if not step_ok or mine[key].device != p.device:
                    result.notes.append(f"{name}: step {mine[key]!r} vs torch {expected[key]!r}")
                continue
            if (
                key in carried
            ):  # per-tensor scalar state (NAdam's mu_product): torch's dtype, the step's device
                if mine[key].dtype != expected[key].dtype or mine[key].device != p.device:
                    result.notes.append(f"{name}: state[{key}] {mine[key]!r} vs torch {expected[key]!r}")
                result.compare(key, f"{name} state[{key}]", mine[key], expected[key], OPTIM_TOLERANCE)
                continue
            if mine[key].dtype != precision.state_dtype_for(p.dtype):
                result.notes.append(f"{name}: state[{key}] is {mine[key].dtype}, param {p.dtype}")
            eight = _quantize.absmax_key(key) in opt.state[p]  # up to one code step of its block
            eight_bit += eight
            result.compare(
                key, f"{name} state[{key}]", mine[key], expected[key], QUANTIZED if eight else table
            )
    if precision.quantizes(dtype) and not eight_bit:
        result.notes.append(
            f"state_dtype='int8' compared no 8-bit state: no param of >= {_quantize.MIN_NUMEL} elements"
        )
    return result


@contextlib.contextmanager
def _observed_clip(module=_amp) -> Iterator[list[torch.Tensor]]:
    """The ``max_grad_norm`` clip coefficients a fused step computes while inside (one per step),
    through ``module.clip_coefficient`` (``_amp``'s for the fused step, ``muon``'s for FusedMuon)."""
    seen: list[torch.Tensor] = []
    original = module.clip_coefficient

    def observed(*args, **kwargs):
        coef = original(*args, **kwargs)
        if coef is not None:
            seen.append(coef.detach().clone())
        return coef

    module.clip_coefficient = observed
    try:
        yield seen
    finally:
        module.clip_coefficient = original


@torch.no_grad()
def _clip_as_ours_(
    result: Result, step: int, seen: list[torch.Tensor], params: list[torch.Tensor], max_norm: float
) -> None:
    """``max_grad_norm`` in the oracle: check the coefficient ours used against torch's
    ``clip_grad_norm_`` formula in fp64 on the same grads (:data:`CLIP_TOLERANCE`), then scale
    the oracle's grads by ours. A coefficient a few fp32 roundings away from ours would flip
    bf16/fp16 roundings of the state, and a momentum or moment that later cancels to near zero
    keeps such a flip as many rounding steps of its own value: the element-wise contract can
    only hold for the step after the same coefficient."""
    grads = [q.grad for q in params if q.grad is not None]
    norms = [torch.linalg.vector_norm(g.double()) for g in grads]
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros((), dtype=torch.float64)
    exact = torch.clamp(max_norm / (total + 1e-6), max=1.0).cpu()
    if len(seen) != 1:
        result.notes.append(f"step {step}: {len(seen)} max_grad_norm clip coefficients seen, not 1")
        coef = exact
    else:
        coef = seen[0]
        if coef.numel() != 1 or coef.dtype not in CLIP_TOLERANCE:
            result.notes.append(f"step {step}: clip coefficient {coef!r}")
        # the norms of fp64 grads are taken in fp64, of the others in fp32: the looser one rules
        computed = {torch.float64 if g.dtype == torch.float64 else torch.float32 for g in grads}
        rtol = max((CLIP_TOLERANCE[d] for d in computed), default=CLIP_TOLERANCE.get(coef.dtype, 0.0))
        where = f"step {step} clip coefficient"
        table = {torch.float64: dict(rtol=rtol, atol=0.0)}
        result.compare("clip_coef", where, coef.detach().double().cpu().reshape(()), exact, table)
    for g in grads:  # in the coefficient's dtype, rounded once to a bf16/fp16 grad's (as ours)
        g.mul_(coef.to(device=g.device))


# 8-bit state: one step of the code map at the top of a block (1.4 % of its absmax, signed map).
QUANTIZED = {torch.float32: dict(rtol=0.015)}


def _dequantized(opt, p: torch.Tensor, key: str, v: torch.Tensor) -> torch.Tensor:
    scale = opt.state[p].get(_quantize.absmax_key(key))
    return v if scale is None else _quantize.dequantize(v, scale, _precision.signed_keys(opt)[key])


def _requantize_(opt, ref, ours, theirs) -> None:
    """Round the oracle's state as ours is stored: through the 8-bit quantizer where ours is."""
    for p, q in zip(ours, theirs, strict=True):
        for key, v in ref.state.get(q, {}).items():
            if _quantize.absmax_key(key) in opt.state.get(p, {}):
                signed = _precision.signed_keys(opt)[key]
                v.copy_(_quantize.dequantize(*_quantize.quantize(v, q, signed), signed))


def assert_optimizer_matches(
    fused_cls: type[torch.optim.Optimizer],
    torch_cls: type[torch.optim.Optimizer],
    kwargs: dict | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    steps: int = 7,
    params: Sequence[torch.Tensor] | None = None,
) -> None:
    """Raise ``AssertionError`` (worst element, notes) unless ``fused_cls(params, **kwargs)``
    matches ``torch_cls`` over ``steps`` steps under the tolerance contract. ``params``: their
    values and layouts (default :func:`odd_params` on ``device`` in ``dtype``). On CPU, set
    ``TRITON_INTERPRET=1`` before importing fusedopt to check the Triton kernels themselves."""
    case = OptimCase(fused_cls, torch_cls, dict(kwargs or {}))
    result = compare_optimizer(case, params if params is not None else odd_params(device, dtype), steps=steps)
    if result.verdict != "PASS":
        raise AssertionError(result.explain())


def loss_inputs(
    case: LossCase, dtype: torch.dtype, device: str, rows: int, classes: int, gen: torch.Generator
):
    """Positional args (the first one differentiated) and tensor kwargs of one loss case."""
    shape = (rows, classes)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    if case.inputs == "reduce":
        return [x], {}
    if case.inputs == "regression":
        return [x, torch.randn(shape, generator=gen).to(device=device, dtype=dtype)], {}
    if case.inputs != "classification":
        raise ValueError(f"unknown inputs {case.inputs!r}")
    target = torch.randint(0, classes, (rows,), generator=gen)
    if "ignore_index" in case.kwargs:
        target[::5] = case.kwargs["ignore_index"]
    extra = {}
    if case.weighted:
        extra["weight"] = (torch.rand(classes, generator=gen) + 0.5).to(device=device, dtype=dtype)
    return [x, target.to(device)], extra


@contextlib.contextmanager
def _torch_muon_given_copies() -> Iterator[None]:
    """torch's Muon with its Newton–Schulz given a copy of the update: for a bf16 param without
    Nesterov torch's ``grad.bfloat16()`` is the momentum buffer itself, which it then divides in
    place (docs/muon.md); FusedMuon does not copy that."""
    module = torch.optim._muon
    original = module._zeropower_via_newtonschulz
    module._zeropower_via_newtonschulz = lambda g, *args: original(g.clone(), *args)
    try:
        yield
    finally:
        module._zeropower_via_newtonschulz = original


def compare_muon(
    case: OptimCase,
    params: Sequence[torch.Tensor],
    grads: Callable[[list[torch.Tensor], int], list[torch.Tensor]],
    steps: int,
    names: Sequence[str],
) -> Result:
    """``steps`` steps of FusedMuon (the hidden matrices in a Muon group, every other param,
    embeddings included, in a ``use_muon=False`` group with :data:`MUON_ADAMW`) against
    torch.optim.Muon and torch.optim.AdamW on the same values, in the same dtype. Params of the
    Muon group within :data:`~fusedopt.tolerance.MUON_TOLERANCE`; momentum buffers, the AdamW
    group's params and state within ``OPTIM_TOLERANCE``. ``max_grad_norm``: the coefficient ours
    used checked against torch's formula, then torch's grads scaled by it (``_clip_as_ours_``)."""
    dtype = params[0].dtype
    result = Result(
        "optimizer", case.fused_cls.__name__, describe(case.kwargs), DTYPE_NAMES.get(dtype, str(dtype)), steps
    )
    hidden = [p.ndim == 2 and not n.startswith("wte") for n, p in zip(names, params, strict=True)]
    pick = lambda ts, want: [t for t, h in zip(ts, hidden, strict=True) if h == want]  # noqa: E731
    # the AdamW group's oracle as compare_optimizer's: for bf16/fp16, torch in fp32 rounded to
    # the dtype after each step (ours is FusedAdamW's step: fp32 math, the dtype on store)
    low = dtype in LOW_PRECISION
    ours, same = leaves(params), leaves(params)
    wide = leaves(params, torch.float32) if low else same
    theirs = [q if h else w for q, w, h in zip(same, wide, hidden, strict=True)]
    opt = case.fused_cls([{"params": pick(ours, True)}, {"params": pick(ours, False), "use_muon": False, **MUON_ADAMW}],
                         **case.kwargs)  # fmt: skip
    muon = case.torch_cls(
        pick(theirs, True), **{k: v for k, v in case.kwargs.items() if k != "max_grad_norm"}
    )
    adamw = torch.optim.AdamW(pick(theirs, False), **MUON_ADAMW)
    for step in range(steps):
        for p, q, g in zip(ours, theirs, grads(ours, step), strict=True):
            p.grad, q.grad = g, g.to(q.dtype)
        with _observed_clip(_muon) as coefficients:
            opt.step()
        if "max_grad_norm" in case.kwargs:
            _clip_as_ours_(result, step, coefficients, theirs, case.kwargs["max_grad_norm"])
        with _torch_muon_given_copies():
            muon.step()
        adamw.step()
        if low:
            round_to_storage_(adamw, pick(theirs, False), dtype)
    for name, h, p, q in zip(names, hidden, ours, theirs, strict=True):
        result.compare("param", name, p, q, MUON_TOLERANCE if h else OPTIM_TOLERANCE)
        mine, expected = opt.state.get(p, {}), (muon if h else adamw).state.get(q, {})
        if list(mine) != list(expected):
            result.notes.append(f"{name}: state keys {list(mine)} vs torch {list(expected)}")
        for key in expected.keys() & mine.keys():
            if key == "step":
                if float(mine[key]) != float(expected[key]):
                    result.notes.append(f"{name}: step {mine[key]!r} vs torch {expected[key]!r}")
                continue
            result.compare(key, f"{name} state[{key}]", mine[key], expected[key], OPTIM_TOLERANCE)
    return result


def compare_loss(
    case: LossCase, dtype: torch.dtype, device: str, rows: int, classes: int, seed: int = 0
) -> Result:
    """Value and input gradient of ``case.fused`` against ``case.reference`` (in fp32 for
    bf16/fp16 inputs) on ``rows x classes`` inputs."""
    options = describe(case.kwargs, "weight" if case.weighted else "")
    result = Result("loss", case.name, options, DTYPE_NAMES.get(dtype, str(dtype)))
    gen = torch.Generator().manual_seed(seed)
    args, extra = loss_inputs(case, dtype, device, rows, classes, gen)
    result.shape = "x".join(str(n) for n in args[0].shape)
    ref_dtype = torch.float32 if dtype in LOW_PRECISION else dtype

    def upcast(t):
        return t.to(ref_dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    x = args[0].clone().requires_grad_()
    xr = upcast(args[0]).clone().requires_grad_()
    ours = case.fused(x, *args[1:], **case.kwargs, **extra)
    theirs = case.reference(
        xr, *map(upcast, args[1:]), **case.kwargs, **{k: upcast(v) for k, v in extra.items()}
    )
    go = (
        torch.full((), case.grad_output, device=device)
        if ours.dim() == 0
        else torch.randn(ours.shape, generator=gen).to(device)
    )
    (grad,) = torch.autograd.grad(ours, x, go.to(ours.dtype))
    (grad_ref,) = torch.autograd.grad(theirs, xr, go.to(theirs.dtype))
    for what, t in (("value", ours), ("grad", grad)):
        if t.dtype != dtype:
            result.notes.append(f"{what} dtype {t.dtype} for {dtype} inputs (torch: {dtype})")
    result.compare("value", "value", ours, theirs, LOSS_TOLERANCE)
    result.compare("grad", "grad", grad, grad_ref, LOSS_TOLERANCE)
    return result


def compare_linear_cross_entropy(
    case: LinearCECase,
    dtype: torch.dtype,
    device: str,
    rows: int,
    hidden: int,
    vocab: int,
    seed: int = 0,
    *,
    chunk_rows: int | None = None,
) -> Result:
    """Value and gradients of input, linear_weight (and linear_bias) of ``case.fused`` (with
    ``chunk_rows``) against ``case.reference`` on ``rows`` tokens of ``hidden`` features and a
    vocabulary of ``vocab``, under :data:`fusedopt.tolerance.LINEAR_CE_TOLERANCE`: the oracle
    is the composition in fp64 from the same values, the bound twice the composition's own
    error in ``dtype``."""
    result = Result("linear_ce", case.name, case.options, DTYPE_NAMES.get(dtype, str(dtype)))
    result.shape = f"{rows}x{hidden}x{vocab}"
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen) * scale).to(device=device, dtype=dtype)

    x, w = rnd(rows, hidden), rnd(vocab, hidden, scale=2 / hidden**0.5)  # logits of order 1
    b = rnd(vocab) if case.bias else None
    target = torch.randint(0, vocab, (rows,), generator=gen)
    if "ignore_index" in case.kwargs:
        target[::5] = case.kwargs["ignore_index"]
    target = target.to(device)
    kwargs = dict(case.kwargs)
    if case.weighted:
        kwargs["weight"] = (torch.rand(vocab, generator=gen) + 0.5).to(device=device, dtype=dtype)

    def grad(out: torch.Tensor) -> torch.Tensor:
        """``case.grad_output`` for a 0-d result, else the same random values for every run
        (rounded to the dtype: the oracle's too)."""
        if out.dim() == 0:
            return torch.full((), case.grad_output, device=device)
        return torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)

    chunks = {}
    if case.vocab_blocks:
        chunks = dict(chunk_classes=-(-vocab // case.vocab_blocks))
    elif case.chunked:
        chunks = dict(chunk_rows=chunk_rows)
    ours = run_linear_cross_entropy(case.fused, x, w, target, b, grad, **chunks, **kwargs)
    in_dtype = run_linear_cross_entropy(case.reference, x, w, target, b, grad, **kwargs)
    oracle = run_linear_cross_entropy(case.reference, x, w, target, b, grad, torch.float64, **kwargs)
    _compare_to_oracle(result, ours, in_dtype, oracle, dtype, LINEAR_CE_TOLERANCE)
    return result


def _compare_to_oracle(result: Result, ours, in_dtype, oracle, dtype: torch.dtype, table: dict) -> None:
    """Fold ``[loss, grad_input, grad_weight(, grad_bias)]`` of the fused op into ``result``:
    each within what ``table`` (of :data:`LINEAR_CE_TOLERANCE`'s form) allows against the
    composition in fp64 (``oracle``), given the composition's own error in ``dtype``."""
    names = ["value", "grad_input", "grad_weight", "grad_bias"]
    for name, mine, theirs, exact in zip(names, ours, in_dtype, oracle, strict=False):  # no bias: 3
        if mine.dtype != theirs.dtype:
            result.notes.append(f"{name} dtype {mine.dtype} (torch: {theirs.dtype})")
        bound = linear_ce_allowed_error(exact, theirs, dtype, table)
        exact_table = {torch.float64: dict(atol=bound, rtol=0.0)}  # compared in fp64, not rounded
        result.compare(name, name, mine.double(), exact, exact_table)


def compare_linear_distillation(
    case: DistillationCase, dtype: torch.dtype, device: str, rows: int, hidden: int, vocab: int, seed: int = 0
) -> Result:
    """Value and student gradients (input, weight, bias) of ``case.fused`` against
    ``case.reference`` on ``rows`` tokens, a student of ``hidden`` features and a teacher of
    ``hidden + 8`` over a vocabulary of ``vocab``, under
    :data:`fusedopt.tolerance.LINEAR_DISTILLATION_TOLERANCE` (the oracle: the composition in fp64
    from the same values)."""
    result = Result("distillation", case.name, case.options, DTYPE_NAMES.get(dtype, str(dtype)))
    result.shape = f"{rows}x{hidden}x{vocab}"
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen) * scale).to(device=device, dtype=dtype)

    xs, ws = rnd(rows, hidden), rnd(vocab, hidden, scale=2 / hidden**0.5)
    xt, wt = rnd(rows, hidden + 8), rnd(vocab, hidden + 8, scale=3 / (hidden + 8) ** 0.5)
    bs, bt = (rnd(vocab), rnd(vocab)) if case.bias else (None, None)
    target = torch.randint(0, vocab, (rows,), generator=gen)
    target[::5] = case.kwargs.get("ignore_index", -100)
    target = target.to(device)
    if case.kwargs.get("reduction", "mean") == "none":
        grad = torch.randn(rows, generator=gen).to(device, dtype)  # the same values for the oracle
    else:
        grad = torch.full((), case.grad_output, device=device)
    args = (xs, ws, xt, wt, target, bs, bt, grad)
    ours = run_linear_distillation(case.fused, *args, **case.kwargs)
    in_dtype = run_linear_distillation(case.reference, *args, **case.kwargs)
    oracle = run_linear_distillation(case.reference, *args, torch.float64, **case.kwargs)
    _compare_to_oracle(result, ours, in_dtype, oracle, dtype, LINEAR_DISTILLATION_TOLERANCE)
    return result


def run_linear_cross_entropy(fn, x, w, target, b=None, grad_output=None, dtype=None, **kwargs) -> list:
    """``[loss, grad_input, grad_weight(, grad_bias)]`` of ``fn(x, w, target, b, **kwargs)`` (the
    fused op or the composition; several outputs stacked into one ``loss``) on leaf copies of
    ``x``, ``w``, ``b``, cast to ``dtype`` if given, tensor ``kwargs`` too; back-propagated with
    ``grad_output`` (None: ones; a function: of the loss)."""

    def cast(t):
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    leaves = [cast(t).detach().clone().requires_grad_() for t in (x, w, b) if t is not None]
    kwargs = {k: cast(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    loss = fn(leaves[0], leaves[1], target, leaves[2] if b is not None else None, **kwargs)
    return _backward(loss, leaves, grad_output)


def _backward(loss, leaves: list[torch.Tensor], grad_output) -> list:
    """``[loss, *its gradients in leaves]`` (several outputs stacked into one), back-propagated
    with ``grad_output`` (None: ones; a function: of the loss)."""
    loss = torch.stack(loss) if isinstance(loss, tuple) else loss
    if grad_output is None:
        go = torch.ones_like(loss)
    else:
        go = (grad_output(loss) if callable(grad_output) else grad_output).to(loss.device, loss.dtype)
    return [loss, *torch.autograd.grad(loss, leaves, go)]


def run_linear_distillation(
    fn, xs, ws, xt, wt, target=None, bs=None, bt=None, grad_output=None, dtype=None, **kwargs
) -> list:
    """``[loss, grad student_input, grad student_weight(, grad student_bias)]`` of ``fn`` (the
    fused loss or its composition) on leaf copies of the student's ``xs``, ``ws``, ``bs`` and
    the teacher's ``xt``, ``wt``, ``bt``, cast to ``dtype`` if given; back-propagated with
    ``grad_output`` (None: ones)."""

    def cast(t):
        return t.to(dtype) if dtype is not None and t is not None else t

    leaves = [cast(t).detach().clone().requires_grad_() for t in (xs, ws, bs) if t is not None]
    student_bias = leaves[2] if bs is not None else None
    loss = fn(
        leaves[0],
        leaves[1],
        cast(xt),
        cast(wt),
        target,
        student_bias=student_bias,
        teacher_bias=cast(bt),
        **kwargs,
    )
    return _backward(loss, leaves, grad_output)
