"""Launchers of the fused linear log-probs (the layer under the autograd Function of
``fusedopt.losses.linear_log_probs``) and their custom ops for torch.compile
(``fusedopt::linear_log_probs``, ``fusedopt::linear_log_probs_backward``).

Both run on the token order of the linear cross-entropy (``token_chunks``: chunks of ``c``
tokens, one ``c x V`` logits buffer, the logits ``(X_k Wᵀ + b) / T`` computed into it with the
temperature as the matmul's alpha):

* forward: ``cross_entropy_targets_kernel`` checks the targets (one launch over all N), then per
  chunk ``log_probs_kernel`` writes the rows' log-probs, entropies and log-sum-exps; no
  gradient is computed here (the backward needs each row's upstream grads);
* backward: per chunk the logits again, ``log_probs_backward_kernel`` overwrites them with their
  gradient from the forward's ``lse`` and entropy and the rows' upstream grads, then the
  engine's ``grad_X = dZ W``, ``grad_W += dZᵀ X`` (fp32), ``grad_b += Σ dZ``: one matmul more
  than the gradients need, as ``reduction="none"`` of the linear cross-entropy.

No host sync, no float atomics. Grids: one program per token at most (``checked_grid``).
"""

from __future__ import annotations

import torch
import triton

from fusedopt._multi_tensor import TL_DTYPE, compute_dtype
from fusedopt.kernels import log_probs as kernels
from fusedopt.losses._common import checked_grid, compilable
from fusedopt.losses._cross_entropy_launch import _guard, _row_tile, _targets
from fusedopt.losses._linear_cross_entropy_launch import _backward_fake, chunk_rows, head, token_chunks

IGNORE_INDEX = -100  # a target that selects no log-prob

__all__ = ["IGNORE_INDEX", "backward", "chunk_rows", "forward"]


def _launch(kernel, z: torch.Tensor, target: torch.Tensor, *args, **switches) -> None:
    """``kernel`` over the chunk's logits ``z`` [c, V] (rows of unit stride) and its targets:
    the row kernel's tile and grid (``cross_entropy``'s size rule)."""
    num_rows, vocab = z.shape
    if num_rows == 0:
        return
    tile_rows, block, num_warps = _row_tile(num_rows, vocab, z.dtype)
    kernel[checked_grid(triton.cdiv(num_rows, tile_rows))](
        z, target, *args, DTYPE=TL_DTYPE[z.dtype], COMPUTE=TL_DTYPE[compute_dtype(z.dtype)], ROWS=tile_rows,
        BLOCK=block, num_warps=num_warps, **switches,
    )  # fmt: skip


def _forward_fake(x, weight, bias, target, temperature, chunk, entropy, save_lse, mm_dtype):
    compute = compute_dtype(mm_dtype)
    log_prob = x.new_empty(target.shape, dtype=compute)
    ent = x.new_empty(target.shape if entropy else 0, dtype=compute)
    return log_prob, ent, x.new_empty(x.shape[0] if save_lse else 0, dtype=compute)


@compilable("linear_log_probs", _forward_fake)
def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    temperature: float,
    chunk: int,
    entropy: bool,
    save_lse: bool,
    mm_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(log_prob, entropy, lse)`` of the logits ``(x Wᵀ + b) / temperature`` (``x`` [N, H],
    arguments checked by the caller): the first two of ``target``'s shape (the entropy empty
    unless asked), ``lse`` [N] for the backward (empty unless ``save_lse``); fp32 (fp64 for an
    fp64 ``mm_dtype``). Tokens in chunks of ``chunk`` rows."""
    n, vocab = x.shape[0], weight.shape[0]
    compute = compute_dtype(mm_dtype)
    flat = target.reshape(-1)
    log_prob = x.new_empty(n, dtype=compute)
    ent = x.new_empty(n if entropy else 0, dtype=compute)
    lse = x.new_empty(n if save_lse else 0, dtype=compute)

    def rows_step(z: torch.Tensor, start: int, stop: int) -> None:
        _launch(
            kernels.log_probs_kernel, z, flat[start:stop], log_prob[start:stop],
            ent[start:stop] if entropy else log_prob, lse[start:stop] if save_lse else log_prob,
            stop - start, vocab, z.stride(0), flat.stride(0), IGNORE_INDEX, ENTROPY=entropy, SAVE_LSE=save_lse,
        )  # fmt: skip

    with _guard(x.device), torch.autocast(x.device.type, enabled=False):
        _targets(flat, None, vocab, IGNORE_INDEX, compute)  # torch's IndexError (CPU), a device assert
        token_chunks(head(x, weight, bias, mm_dtype, 1.0 / temperature), chunk, (False,) * 3, rows_step)
    return log_prob.view(target.shape), ent.view(target.shape) if entropy else ent, lse


@compilable("linear_log_probs_backward", _backward_fake)
def backward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_log_prob: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    chunk: int,
    need_input: bool,
    need_weight: bool,
    need_bias: bool,
    mm_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients (input, weight, bias; empty where not needed) for the upstream grads of
    the log-probs and of the entropy (None: that output's gradient is not propagated; the
    entropy's needs the forward's ``entropy``), from the forward's ``lse``: the chunks' logits
    recomputed and overwritten with their gradient, then the engine's matmuls."""
    flat, entropy = target.reshape(-1), entropy.reshape(-1)
    vocab = weight.shape[0]
    glp = grad_log_prob.reshape(-1) if grad_log_prob is not None else None
    gh = grad_entropy.reshape(-1) if grad_entropy is not None else None

    def rows_step(z: torch.Tensor, start: int, stop: int) -> None:
        _launch(
            kernels.log_probs_backward_kernel, z, flat[start:stop], lse[start:stop],
            entropy[start:stop] if gh is not None else lse, glp[start:stop] if glp is not None else lse,
            gh[start:stop] if gh is not None else lse, stop - start, vocab, z.stride(0), flat.stride(0),
            glp.stride(0) if glp is not None else 0, gh.stride(0) if gh is not None else 0, 1.0 / temperature,
            IGNORE_INDEX, LOG_PROB=glp is not None, ENTROPY=gh is not None,
        )  # fmt: skip

    grads = (need_input, need_weight, need_bias)
    with _guard(x.device), torch.autocast(x.device.type, enabled=False):
        return token_chunks(head(x, weight, bias, mm_dtype, 1.0 / temperature), chunk, grads, rows_step)
