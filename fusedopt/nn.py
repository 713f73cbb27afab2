"""nn.Module faces of the fused losses: subclasses of the torch modules they replace, with the
same constructor arguments; only ``forward`` changes."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.modules.loss import _WeightedLoss

from fusedopt import functional as F
from fusedopt.losses.cross_entropy import check_softcap, check_z_loss
from fusedopt.losses.linear_distillation import arguments as distillation_arguments

__all__ = [
    "FusedCrossEntropyLoss",
    "FusedHuberLoss",
    "FusedL1Loss",
    "FusedLinearCrossEntropyHead",
    "FusedLinearCrossEntropyLoss",
    "FusedLinearDistillationLoss",
    "FusedMSELoss",
    "FusedSmoothL1Loss",
]


class FusedMSELoss(nn.MSELoss):
    """``nn.MSELoss`` computed by :func:`fusedopt.functional.mse_loss`."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(input, target, reduction=self.reduction)


class FusedL1Loss(nn.L1Loss):
    """``nn.L1Loss`` computed by :func:`fusedopt.functional.l1_loss`."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.l1_loss(input, target, reduction=self.reduction)


class FusedSmoothL1Loss(nn.SmoothL1Loss):
    """``nn.SmoothL1Loss`` computed by :func:`fusedopt.functional.smooth_l1_loss`."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.smooth_l1_loss(input, target, reduction=self.reduction, beta=self.beta)


class FusedHuberLoss(nn.HuberLoss):
    """``nn.HuberLoss`` computed by :func:`fusedopt.functional.huber_loss`."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.huber_loss(input, target, reduction=self.reduction, delta=self.delta)


class FusedCrossEntropyLoss(nn.CrossEntropyLoss):
    """``nn.CrossEntropyLoss`` computed by :func:`fusedopt.functional.cross_entropy`; keyword-only
    ``z_loss`` (default 0: none) adds ``z_loss · lse²`` per target not ignored, ``softcap``
    (default None: none) caps every logit at ``softcap · tanh(z / softcap)``."""

    def __init__(self, *args, z_loss: float = 0.0, softcap: float | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.z_loss = check_z_loss(z_loss)
        self.softcap = check_softcap(softcap) or None

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
        )


class _LinearCrossEntropyOptions:
    """The keyword options of :func:`fusedopt.functional.linear_cross_entropy` a module keeps as
    attributes (what torch's loss modules do with theirs)."""

    OPTIONS = (
        "ignore_index",
        "reduction",
        "label_smoothing",
        "chunk_rows",
        "chunk_classes",
        "z_loss",
        "softcap",
    )

    def _keep(self, **options) -> None:
        assert options.keys() == set(self.OPTIONS)
        for name, value in options.items():
            setattr(self, name, value)

    def _options(self) -> dict:
        return {name: getattr(self, name) for name in self.OPTIONS}


class FusedLinearCrossEntropyLoss(_LinearCrossEntropyOptions, _WeightedLoss):
    """Cross-entropy of ``F.linear(input, linear_weight, linear_bias)`` computed by
    :func:`fusedopt.functional.linear_cross_entropy`, the logits never held whole.

    Constructor as ``nn.CrossEntropyLoss`` (``weight`` a buffer of class weights), plus the
    keywords ``chunk_rows`` (tokens per chunk, default from the shapes), ``chunk_classes``
    (the vocabulary order instead, in blocks of that many classes), ``z_loss`` and ``softcap``.
    """

    def __init__(
        self,
        weight: Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        chunk_rows: int | None = None,
        chunk_classes: int | None = None,
        z_loss: float = 0.0,
        softcap: float | None = None,
    ) -> None:
        super().__init__(weight, None, None, reduction)
        self._keep(
            ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
            chunk_rows=chunk_rows, chunk_classes=chunk_classes, z_loss=check_z_loss(z_loss),
            softcap=check_softcap(softcap) or None,
        )  # fmt: skip

    def forward(
        self, input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Tensor | None = None
    ) -> Tensor:
        return F.linear_cross_entropy(
            input, linear_weight, target, linear_bias, weight=self.weight, **self._options()
        )


class FusedLinearCrossEntropyHead(_LinearCrossEntropyOptions, nn.Linear):
    """A language model's output layer and its loss in one module: an ``nn.Linear`` (same
    constructor, parameters and ``state_dict``) whose ``forward(input, target)`` returns the
    cross-entropy of its logits through :func:`fusedopt.functional.linear_cross_entropy`, and
    ``forward(input)`` the logits, as ``nn.Linear`` (generation).

    The loss reads the weight inside the module's own ``forward``, so sharding wrappers that
    gather parameters around it (FSDP2's ``fully_shard``) gather this weight as for any layer.
    Keywords: ``ignore_index``, ``reduction``, ``label_smoothing`` as ``nn.CrossEntropyLoss``,
    ``chunk_rows``, ``chunk_classes``, ``z_loss`` and ``softcap`` as
    :func:`fusedopt.functional.linear_cross_entropy`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        chunk_rows: int | None = None,
        chunk_classes: int | None = None,
        z_loss: float = 0.0,
        softcap: float | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self._keep(
            ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
            chunk_rows=chunk_rows, chunk_classes=chunk_classes, z_loss=check_z_loss(z_loss),
            softcap=check_softcap(softcap) or None,
        )  # fmt: skip

    def extra_repr(self) -> str:
        options = ", ".join(f"{name}={value!r}" for name, value in self._options().items())
        return f"{super().extra_repr()}, {options}"

    def forward(self, input: Tensor, target: Tensor | None = None) -> Tensor:
        if target is None:
            return super().forward(input)
        return F.linear_cross_entropy(input, self.weight, target, self.bias, **self._options())


class FusedLinearDistillationLoss(nn.Module):
    """Distillation loss between a student's and a teacher's linear heads, computed by
    :func:`fusedopt.functional.linear_distillation_loss` (neither head's logits held whole).

    Keywords ``divergence`` (``"kl"``, ``"reverse_kl"``, ``"jsd"``), ``beta``, ``temperature``,
    ``ignore_index``, ``reduction`` as that function (checked here); ``forward(student_input,
    student_weight, teacher_input, teacher_weight, target=None, student_bias=None,
    teacher_bias=None)``. Gradients reach the student's tensors only.
    """

    def __init__(
        self,
        divergence: str = "kl",
        beta: float = 0.5,
        temperature: float = 1.0,
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        options = distillation_arguments(divergence, beta, temperature, ignore_index, reduction)
        self.divergence, self.beta, self.temperature, self.ignore_index, self.reduction = options

    def extra_repr(self) -> str:
        return (
            f"divergence={self.divergence!r}, beta={self.beta}, temperature={self.temperature}, "
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}"
        )

    def forward(
        self,
        student_input: Tensor,
        student_weight: Tensor,
        teacher_input: Tensor,
        teacher_weight: Tensor,
        target: Tensor | None = None,
        student_bias: Tensor | None = None,
        teacher_bias: Tensor | None = None,
    ) -> Tensor:
        return F.linear_distillation_loss(
            student_input, student_weight, teacher_input, teacher_weight, target, student_bias=student_bias,
            teacher_bias=teacher_bias, divergence=self.divergence, beta=self.beta, temperature=self.temperature,
            ignore_index=self.ignore_index, reduction=self.reduction,
        )  # fmt: skip
