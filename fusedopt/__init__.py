"""fusedopt: Triton kernels for PyTorch training, as drop-in torch replacements.

``torch.optim.AdamW(...)`` becomes ``fusedopt.FusedAdamW(...)`` and ``nn.CrossEntropyLoss()``
becomes ``fusedopt.nn.FusedCrossEntropyLoss()``; nothing else changes. Importing fusedopt
changes nothing in the process: to run the kernels on CPU through the Triton interpreter, set
``TRITON_INTERPRET=1`` yourself before importing it.
"""

from fusedopt import functional, nn
from fusedopt.amp import GradScaler
from fusedopt.clip import clip_grad_norm_
from fusedopt.optim import (
    FusedAdadelta,
    FusedAdagrad,
    FusedAdam,
    FusedAdamax,
    FusedAdamW,
    FusedLion,
    FusedMuon,
    FusedNAdam,
    FusedRAdam,
    FusedRMSprop,
    FusedRprop,
    FusedSGD,
    muon_param_groups,
)

__version__ = "0.1.0"

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
    "GradScaler",
    "__version__",
    "clip_grad_norm_",
    "functional",
    "muon_param_groups",
    "nn",
]
