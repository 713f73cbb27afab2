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

With ``block`` (eager only) both run the vocabulary order instead, the only one a head sharded
over the vocabulary runs (``shard``, ``fusedopt.losses._vocab_parallel``): all the tokens per
block of the (local) classes. Forward: each block's rows' state ``(m, s, z_y, u)`` merged into
theirs (:data:`LOG_PROB_STATE`), one ``combine_rows`` across the ranks, the rows finished from
the merged state (a launch that reads no logits); backward: the gradient pass of the
vocabulary order (``vocab_blocks``: the logits again, the gradient kernel on each window with
global class indices, ``grad_W`` and ``grad_b`` of the local classes, one all-reduce of
``grad_X``). Two collectives per forward and backward, whatever N and the number of blocks.

No host sync, no float atomics. Grids: one program per token at most (``checked_grid``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton

from fusedopt._multi_tensor import TL_DTYPE, compute_dtype
from fusedopt.kernels import log_probs as kernels
from fusedopt.losses import _vocab_parallel as vocab_parallel
from fusedopt.losses._common import checked_grid, compilable
from fusedopt.losses._cross_entropy_launch import _guard, _row_tile, _targets
from fusedopt.losses._linear_cross_entropy_launch import (
    Head,
    _backward_fake,
    block_buffer,
    block_logits,
    chunk_rows,
    head,
    token_chunks,
    vocab_blocks,
)

IGNORE_INDEX = -100  # a target that selects no log-prob
# log_probs_kernel's state rows as vocab_parallel.merge_rows merges them: the max m, Σ exp(z - m),
# the target's logit, the entropy's Σ exp(z - m) (m - z)
LOG_PROB_STATE = (vocab_parallel.MAX, 0, vocab_parallel.SUM, (0, 1))

__all__ = ["IGNORE_INDEX", "backward", "chunk_rows", "forward"]


def _launch(kernel, z: torch.Tensor, target: torch.Tensor, *args, **switches) -> None:
    """``kernel`` over the chunk's logits ``z`` [c, V] (rows of unit stride) and its targets:
    the row kernel's tile and grid (``cross_entropy``'s size rule)."""
    num_rows, vocab = z.shape
    if num_rows == 0:
        return
    tile_rows, block, num_warps = _row_tile(num_rows, max(vocab, 1), z.dtype)
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
    *,
    block: int | None = None,
    shard: vocab_parallel.VocabShard | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(log_prob, entropy, lse)`` of the logits ``(x Wᵀ + b) / temperature`` (``x`` [N, H],
    arguments checked by the caller): the first two of ``target``'s shape (the entropy empty
    unless asked), ``lse`` [N] for the backward (empty unless ``save_lse``); fp32 (fp64 for an
    fp64 ``mm_dtype``). Tokens in chunks of ``chunk`` rows, or with ``block`` the vocabulary
    order over blocks of that many classes (``shard``: the weight and bias are this rank's
    slice of the classes, the rows' state combined across the ranks)."""
    n = x.shape[0]
    classes = shard.classes if shard is not None else weight.shape[0]
    compute = compute_dtype(mm_dtype)
    flat = target.reshape(-1)
    log_prob = x.new_empty(n, dtype=compute)
    ent = x.new_empty(n if entropy else 0, dtype=compute)
    lse = x.new_empty(n if save_lse else 0, dtype=compute)

    def rows(z: torch.Tensor, start: int, stop: int, col0: int = 0, state=None, window=False) -> None:
        """The tokens start .. stop - 1 over the classes col0 .. col0 + z.shape[1] - 1 (a
        ``window``: their ``state`` written), or from their ``state`` (``z`` of no classes)."""
        _launch(
            kernels.log_probs_kernel, z, flat[start:stop], log_prob[start:stop],
            ent[start:stop] if entropy else log_prob, lse[start:stop] if save_lse else log_prob,
            state if state is not None else log_prob, stop - start, z.shape[1], col0, classes, z.stride(0),
            flat.stride(0), IGNORE_INDEX, ENTROPY=entropy, SAVE_LSE=save_lse, WINDOW=window,
            FROM_STATE=state is not None and not window,
        )  # fmt: skip

    with _guard(x.device), torch.autocast(x.device.type, enabled=False):
        _targets(flat, None, classes, IGNORE_INDEX, compute)  # torch's IndexError (CPU), a device assert
        h = head(x, weight, bias, mm_dtype, 1.0 / temperature)
        if block is None:
            token_chunks(h, chunk, (False,) * 3, rows)
        else:
            state = _row_state(h, block, shard, compute, lambda z, col0, out: rows(z, 0, n, col0, out, True))
            rows(state.as_strided((n, 0), (0, 1)), 0, n, state=state)
    return log_prob.view(target.shape), ent.view(target.shape) if entropy else ent, lse


def _row_state(
    h: Head, block: int, shard: vocab_parallel.VocabShard | None, dtype: torch.dtype, window: Callable
) -> torch.Tensor:
    """The rows' state over all the classes, [4, N] (:data:`LOG_PROB_STATE`):
    ``window(z, col0, out)`` writes into ``out`` that of the logits ``z`` [N, C] of the classes
    ``col0 .. col0 + C - 1``, for each block of the head's classes; each merged into the
    running state in turn (constant memory), then, with a ``shard``, the ranks' combined."""
    n, vocab = h.x.shape[0], h.weight.shape[0]
    offset = shard.offset if shard is not None else 0
    buffer = block_buffer(h.x, block, vocab)
    states = h.x.new_empty((2, 4, n), dtype=dtype)  # the running state, a block's
    for v0 in range(0, max(vocab, 1), block):  # an empty shard: one window of no classes
        v1 = min(v0 + block, vocab)
        z = block_logits(h, buffer, v0, v1) if v1 > v0 else states.as_strided((n, 0), (0, 1))
        window(z, offset + v0, states[1 if v0 else 0])
        if v0 > 0:
            states[0] = vocab_parallel.merge_rows(states, LOG_PROB_STATE)
    if shard is None:
        return states[0]
    return vocab_parallel.combine_rows(states[0], shard, LOG_PROB_STATE)


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
    *,
    block: int | None = None,
    shard: vocab_parallel.VocabShard | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients (input, weight, bias; empty where not needed) for the upstream grads of
    the log-probs and of the entropy (None: that output's gradient is not propagated; the
    entropy's needs the forward's ``entropy``), from the forward's ``lse``: the chunks' logits
    recomputed and overwritten with their gradient, then the engine's matmuls (``block``,
    ``shard``: the vocabulary order, as :func:`forward`; the input's gradient summed across
    the ranks)."""
    flat, entropy = target.reshape(-1), entropy.reshape(-1)
    classes = shard.classes if shard is not None else weight.shape[0]
    offset = shard.offset if shard is not None else 0
    glp = grad_log_prob.reshape(-1) if grad_log_prob is not None else None
    gh = grad_entropy.reshape(-1) if grad_entropy is not None else None

    def rows(z: torch.Tensor, start: int, stop: int, col0: int = 0) -> None:
        """The tokens start .. stop - 1 over the classes col0 .. col0 + z.shape[1] - 1."""
        _launch(
            kernels.log_probs_backward_kernel, z, flat[start:stop], lse[start:stop],
            entropy[start:stop] if gh is not None else lse, glp[start:stop] if glp is not None else lse,
            gh[start:stop] if gh is not None else lse, stop - start, z.shape[1], col0, classes, z.stride(0),
            flat.stride(0), glp.stride(0) if glp is not None else 0, gh.stride(0) if gh is not None else 0,
            1.0 / temperature, IGNORE_INDEX, LOG_PROB=glp is not None, ENTROPY=gh is not None,
        )  # fmt: skip

    grads = (need_input, need_weight, need_bias)
    with _guard(x.device), torch.autocast(x.device.type, enabled=False):
        h = head(x, weight, bias, mm_dtype, 1.0 / temperature)
        if block is None:
            return token_chunks(h, chunk, grads, rows)
        n = x.shape[0]
        buffer = block_buffer(h.x, block, h.weight.shape[0])
        return vocab_blocks(h, buffer, block, grads, lambda z, v0, v1: rows(z, 0, n, offset + v0), shard)
