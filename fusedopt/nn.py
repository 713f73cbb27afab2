"""nn.Module faces of the fused losses: subclasses of the torch modules they replace, with the
same constructor arguments; only ``forward`` changes."""

from __future__ import annotations

from torch import Tensor, nn

from fusedopt import functional as F

__all__ = ["FusedCrossEntropyLoss", "FusedHuberLoss", "FusedL1Loss", "FusedMSELoss", "FusedSmoothL1Loss"]


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
    """``nn.CrossEntropyLoss`` computed by :func:`fusedopt.functional.cross_entropy`."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )
