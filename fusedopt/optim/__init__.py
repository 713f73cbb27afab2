"""Fused optimizers: torch.optim classes whose step is one multi-tensor Triton kernel."""

from fusedopt.optim.adam import FusedAdam, FusedAdamW
from fusedopt.optim.sgd import FusedSGD

__all__ = ["FusedAdam", "FusedAdamW", "FusedSGD"]
