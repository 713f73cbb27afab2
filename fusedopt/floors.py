"""Byte floors: the tensors a fused step, a clip, an AMP phase or a loss must read and write.

The one table behind every bytes-per-element figure: ``fusedopt bench`` takes its bytes and GB/s
from it, and ``tests/test_floors.py`` checks the kernels' and optimizers' docstrings and the
README's table against it. A floor is a sequence of passes over memory, each reading and writing
whole tensors once per element, so its bytes per element are the tensors read and written times
the element size. Hyper-parameters, pointer tables and per-tensor scalars (a few KB a step) are
not counted.

An optimizer step reads the param, its grad and every state tensor, and writes the param and
every state tensor. The state tensors are those its algorithm creates for the options given
(``algorithm.state(group)``, the spec the launcher and the kernel read), so an option that adds a
buffer changes the floor with nothing else to edit. ``max_grad_norm`` adds the norm pass.

    step(fusedopt.FusedAdam).bytes_per_element()                               # 28
    step(fusedopt.FusedSGD, momentum=0.9).bytes_per_element(torch.bfloat16)   # 10
    amp_phase("torch").bytes_per_element()                                     # 48
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Pass:
    """One trip over memory: the tensors it reads and writes, each once per element."""

    name: str
    reads: tuple[str, ...]
    writes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Floor:
    """Passes over memory, in order; ``sizes``: the element size of tensors stored in another
    dtype than the one :meth:`bytes_per_element` is given (an fp32 master, bf16 state, ...)."""

    passes: tuple[Pass, ...]
    sizes: tuple[tuple[str, int], ...] = ()

    @property
    def tensors(self) -> int:
        """Tensor reads plus tensor writes per element, over all passes."""
        return sum(len(p.reads) + len(p.writes) for p in self.passes)

    def bytes_per_element(self, dtype: torch.dtype = torch.float32) -> int:
        sizes = dict(self.sizes)
        return sum(sizes.get(t, dtype.itemsize) for p in self.passes for t in (*p.reads, *p.writes))

    def __add__(self, other: Floor) -> Floor:
        return Floor(self.passes + other.passes, self.sizes + other.sizes)

    def __str__(self) -> str:
        """``pass: read -> written`` for each pass, joined by ``+``."""
        return " + ".join(
            f"{p.name}: {', '.join(p.reads)}" + (f" -> {', '.join(p.writes)}" if p.writes else "")
            for p in self.passes
        )


# clip_grad_norm_'s norm; the optimizers' max_grad_norm; fusedopt.GradScaler's inf check (the same read).
NORM = Floor((Pass("norm", ("grad",)),))
CLIP = Floor((Pass("clip", ("grad",), ("grad",)),))  # g *= coef, in place
UNSCALE = Floor((Pass("unscale_", ("grad",), ("grad",)),))  # torch.amp.GradScaler: unscale + inf check


def step(optimizer: type[torch.optim.Optimizer], dtype: torch.dtype = torch.float32, **options) -> Floor:
    """The floor of one step of a fused optimizer class built with ``options`` (its
    constructor's keywords; the defaults for the rest) for params of ``dtype``: with
    ``master_weights`` the step reads the fp32 master instead of the param and writes both;
    ``kahan_summation`` reads and writes the compensation; ``state_dtype`` sizes the state
    (``"int8"``: 1 byte)."""
    opt = optimizer([torch.zeros(1, requires_grad=True)], **options)  # its group, validated
    state = tuple(opt.algorithm.state(opt.param_groups[0]))
    precision = opt.precision
    aux = precision.aux_key(dtype)
    value = aux if aux == "master_weight" else "param"
    extra = (aux,) if aux == "kahan_compensation" else ()
    writes = ("param", "master_weight") if aux == "master_weight" else ("param",)
    # Sizes recorded only where they differ from dtype's. 8-bit state: 1 byte (its fp32 absmax,
    # 4 bytes per 256 elements read and written, is left out: 0.03 B/elt; so are tensors under
    # 4,096 elements, which keep fp32 state).
    stored = 1 if precision.quantizes(dtype) else precision.state_dtype_for(dtype).itemsize
    sizes = {name: stored for name in state} if stored != dtype.itemsize else {}
    if aux == "master_weight":
        sizes[aux] = 4
    floor = Floor(
        (Pass("step", (value, "grad", *extra, *state), (*writes, *extra, *state)),), tuple(sizes.items())
    )
    return floor if opt.max_grad_norm is None else NORM + floor


def amp_phase(recipe: str) -> Floor:
    """The optimizer phase of an AMP step (AdamW, clipping to a max norm), by recipe:

    * ``"torch"``: ``scaler.unscale_(opt)``, ``clip_grad_norm_``, ``scaler.step(opt)`` (with
      torch's AdamW or fusedopt's parts in their place: the same passes);
    * ``"torch-graph"``: no scaler; ``clip_grad_norm_`` and the step (what a CUDA graph replays);
    * ``"fusedopt"``: ``fusedopt.GradScaler`` and ``FusedAdamW(max_grad_norm=...)``: the norm pass,
      which is also the inf check, then the step. This is the phase's floor: the norm must be
      known before any param is written.
    """
    from fusedopt import FusedAdamW

    adamw = step(FusedAdamW)
    recipes = {
        "torch": UNSCALE + NORM + CLIP + adamw,
        "torch-graph": NORM + CLIP + adamw,
        "fusedopt": step(FusedAdamW, max_grad_norm=1.0),
    }
    return recipes[recipe]


_POINTWISE = Floor((Pass("loss + grad", ("input", "target"), ("grad",)),))
# Forward + backward, reduction "mean", grad_output 1; per input element (cross-entropy: per logit).
LOSSES: dict[str, Floor] = {
    "mean": Floor((Pass("mean", ("input",)),)),  # its gradient is grad / N expanded: no memory
    "mse_loss": _POINTWISE,
    "l1_loss": _POINTWISE,
    "smooth_l1_loss": _POINTWISE,
    "huber_loss": _POINTWISE,
    "cross_entropy": Floor((Pass("loss + grad", ("logits",), ("grad",)),)),
    # Per element of the input [N, H] and the linear weight [V, H], (N + V) H in all: each read, its
    # gradient written; the logits [N, V] need never reach memory (the fused op holds one chunk).
    # The op is matmul-bound (6 N H V FLOPs: logits, input and weight gradients), far from this floor.
    "linear_cross_entropy": Floor((Pass("loss + grads", ("x/W",), ("dx/dW",)),)),
    # Per element of the student's input and weight, (N + V) H, with a teacher head of the same
    # shape: both heads read, the student's gradients written; neither's logits need reach memory.
    # Matmul-bound as the linear cross-entropy (8 N H V FLOPs: both heads' logits, two gradients).
    "linear_distillation_loss": Floor((Pass("loss + grads", ("x/W", "teacher x/W"), ("dx/dW",)),)),
}
LOSSES["linear_log_probs"] = LOSSES[
    "linear_cross_entropy"
]  # the same head: per-token outputs, N (+ N) floats
