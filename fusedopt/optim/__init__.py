"""Fused optimizers: torch.optim classes whose step is one multi-tensor Triton kernel."""

from fusedopt.optim.adadelta import FusedAdadelta
from fusedopt.optim.adagrad import FusedAdagrad
from fusedopt.optim.adam import FusedAdam, FusedAdamW
from fusedopt.optim.adamax import FusedAdamax
from fusedopt.optim.lion import FusedLion, Lion
from fusedopt.optim.muon import FusedMuon, muon_param_groups
from fusedopt.optim.nadam import FusedNAdam
from fusedopt.optim.radam import FusedRAdam
from fusedopt.optim.rmsprop import FusedRMSprop
from fusedopt.optim.rprop import FusedRprop
from fusedopt.optim.sgd import FusedSGD

__all__ = [
    "FusedAdadelta",
    "FusedAdagrad",
    "FusedAdam",
    "FusedAdamW",
    "FusedAdamax",
    "FusedLion",
    "FusedMuon",
    "FusedNAdam",
    "FusedRAdam",
    "FusedRMSprop",
    "FusedRprop",
    "FusedSGD",
    "Lion",
    "muon_param_groups",
]
