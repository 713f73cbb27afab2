"""The algorithms in plain torch: the step of bf16/fp16 tensors (and of the low-precision
options) without Triton, torch's algorithm in fp32 rounded to the storage dtype after each step.

Each ``*_reference`` function steps one bucket's tensors in place with torch's own ops in the
order of torch.optim's for-loop implementation, computing in fp32 (fp64 for fp64 tensors) and
storing the results in the tensors' dtype. (fp32/fp64 tensors take torch's own step: see each
optimizer's ``_eager``.) With ``fused=True`` a function runs torch's fused CPU step in fp32
instead: Adam/AdamW's bf16/fp16 step always (torch's fused CPU Adam computes bf16/fp16 in fp32
and rounds each result once, in one pass: on the tensors themselves where their layouts allow),
and the low-precision options' step where the fp32 copies share a dense layout (as they have
since the options first ran without Triton). Either stays within the tolerance contract of
:mod:`fusedopt.tolerance`; the for-loop order is the contract's oracle itself.

The fp32 copies are made a batch at a time (:class:`Batch`): at most ``CHUNK`` elements,
small tensors packed end to end, large ones cut at multiples of ``CHUNK``, so the working
tensors are reused from step to step and stay in cache, and each op of the algorithm runs once
per batch instead of once per tensor. Every op is elementwise and torch computes an element
alike wherever it sits in a tensor, so the results are those of the ops on whole tensors, bit
for bit. How a bucket's tensors are read into the working copies and stored back is its
:class:`Storage`: in their own dtype to nearest even here (a batch of one slice of an fp32
tensor works on the tensor itself); with the low-precision options (master weights, Kahan,
stochastic rounding, 8-bit state) see :class:`fusedopt.optim._precision.Stored`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from fusedopt._multi_tensor import compute_dtype, shares_dense_layout

CHUNK = 1 << 18
"""Elements of a batch's working copies (1 MiB a column in fp32: a step's few columns stay in
cache; ops this long keep the per-op cost of torch's dispatch and of its threads small). A
multiple of 4096: a cut tensor's pieces start where torch's fused CPU steps start a unit of
work and where 8-bit state starts a block, so either sees the same elements together as in
the whole tensor."""


def skipped(found_inf: torch.Tensor | None) -> bool:
    """Whether GradScaler found an inf: a host read, for steps that run on the host's side."""
    return found_inf is not None and bool(found_inf.item())


def unscale_and_clip(
    g: torch.Tensor, grad_scale: torch.Tensor | None, clip_coef: torch.Tensor | None
) -> torch.Tensor:
    """``g / grad_scale * clip_coef`` (each factor where given), as the step kernels read a grad."""
    if grad_scale is not None:
        g = g / grad_scale.to(g.device)
    if clip_coef is not None:
        g = g * clip_coef.to(g.device)
    return g


def dense_cpu_fused_ok(bucket, grads: list[torch.Tensor]) -> bool:
    """Whether torch's fused CPU step is right for these tensors: fp32/fp64 (torch 2.13's fused
    CPU SGD leaves most bf16 params unchanged), dense, and grads laid out as their params (it
    corrupts other layouts; see TRITON_NOTES)."""
    ok = bucket.memo.get("cpu_fused")  # a bucket's layouts are fixed (its plan key has the strides)
    if ok is None:
        ok = bucket.memo["cpu_fused"] = (
            bucket.device.type == "cpu"
            and bucket.dtype in (torch.float32, torch.float64)
            and all(shares_dense_layout([*ops, g]) for *ops, g in zip(*bucket.columns, grads, strict=True))
        )
    return ok


def eager_grads(grads: list[torch.Tensor], amp, fused: bool) -> list[torch.Tensor] | None:
    """The grads torch's own fp32/fp64 step takes: None when GradScaler found an inf (a host
    read: these steps run on the CPU or are torch's own sparse ones), else unscaled and clipped
    copies (torch's fused step unscales by itself: only the clip is applied then)."""
    if not fused and skipped(amp.found_inf):
        return None
    scale = None if fused else amp.grad_scale
    if scale is None and amp.clip_coef is None:
        return grads
    return [
        unscale_and_clip(g.to(compute_dtype(g.dtype)) if g.is_floating_point() else g, scale, amp.clip_coef)
        for g in grads
    ]


# Batches of working copies ---------------------------------------------------------------------


class Batch:
    """Elements of a bucket's tensors stepped together: pieces ``(tensor, start, stop)`` laid
    end to end in flat working tensors of ``n`` elements. A tensor whose operands are all
    contiguous is cut into flat slices; another is one piece, in its own shape."""

    __slots__ = ("cache", "cut", "n", "pieces", "shapes", "single", "spans")

    def __init__(self, pieces: list[tuple[int, int, int]], cut: list[bool], shapes: list[torch.Size]):
        self.pieces = pieces
        self.cut = [cut[i] for i, _, _ in pieces]
        self.shapes = [shapes[i] for i, _, _ in pieces]
        self.spans = []
        n = 0
        for _, start, stop in pieces:
            self.spans.append((n, n + stop - start))
            n += stop - start
        self.n = n
        self.single = len(pieces) == 1 and self.cut[0]  # one flat slice: its views are itself
        self.cache: dict = {}  # views of the bucket's tensors and of the scratch, by name

    def parts(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The pieces of ``tensors`` (a column: one tensor per tensor of the bucket)."""
        return [
            tensors[i].view(-1)[start:stop] if cut else tensors[i]
            for (i, start, stop), cut in zip(self.pieces, self.cut, strict=True)
        ]

    def views(self, work: torch.Tensor) -> list[torch.Tensor]:
        """The pieces' places in ``work`` (flat, ``n`` elements), shaped as :meth:`parts`."""
        return [
            work[a:b] if cut else work[a:b].view(shape)
            for (a, b), cut, shape in zip(self.spans, self.cut, self.shapes, strict=True)
        ]

    def each(self, values: Sequence) -> list:
        """``values`` (one per tensor of the bucket) for each piece."""
        return [values[i] for i, _, _ in self.pieces]


def layout(
    numels: list[int], cut: list[bool], shapes: list[torch.Size], keys: Sequence[Hashable]
) -> list[Batch]:
    """Batches of at most CHUNK elements (a tensor that cannot be cut may make a larger one of
    its own) whose tensors share a key (their scalars: a batch is stepped with one value of
    each): a tensor of ``cut`` is cut at multiples of CHUNK from its start, its last piece
    packed with the tensors that follow. Empty tensors take no part."""
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    batches = []
    for members in groups.values():
        pieces: list[tuple[int, int, int]] = []
        n = 0
        for i in members:
            numel, start = numels[i], 0
            if numel == 0:
                continue
            if numel > CHUNK and not cut[i]:
                batches.append(Batch([(i, 0, numel)], cut, shapes))
                continue
            while numel - start > CHUNK:
                batches.append(Batch([(i, start, start + CHUNK)], cut, shapes))
                start += CHUNK
            if n + numel - start > CHUNK:
                batches.append(Batch(pieces, cut, shapes))
                pieces, n = [], 0
            pieces.append((i, start, numel))
            n += numel - start
        if pieces:
            batches.append(Batch(pieces, cut, shapes))
    return batches


class Storage:
    """How a step reads a bucket's tensors into working copies and stores them back: in their
    own dtype, rounded to nearest even (torch's ``copy_``). The working tensors (the bucket's
    scratch: one of CHUNK elements per name) and the layout of the batches are kept by the
    bucket (its ``memo``) from step to step.

    Args:
        bucket: a :class:`fusedopt.optim._plan.Bucket`; ``columns``: the params, the
            algorithm's state columns (an absent one repeats the params), the precision column.
    """

    def __init__(self, bucket):
        self.bucket = bucket
        self.columns = bucket.columns
        self.memo = bucket.memo
        self.dtype = compute_dtype(bucket.dtype)

    options = False  # whether the low-precision options read and store (``Stored``)

    def fused(self, grads: list[torch.Tensor]) -> bool:
        """Whether the algorithm's fp32 math is torch's fused CPU step (see ``Stored``)."""
        return False

    def dense(self, grads: list[torch.Tensor], used: Sequence[bool]) -> bool:
        """Whether each tensor's param, used state and grad share one dense layout (kept for
        the bucket: its layouts are fixed)."""
        key = ("dense", tuple(used))
        ok = self.memo.get(key)
        if ok is None:
            ok = self.memo[key] = all(
                shares_dense_layout([*self.operands(i, used), g]) for i, g in enumerate(grads)
            )
        return ok

    def begin(self) -> None:
        """Once per step, before the algorithm runs (also a step GradScaler skips)."""

    def prepare(self, used: Sequence[bool]) -> None:
        """Once per step, before the batches are stepped (by several threads)."""

    def operands(self, i: int, used: Sequence[bool]) -> list[torch.Tensor]:
        """Tensor ``i``'s param and used state: what a cut must find contiguous."""
        return [self.columns[0][i], *(c[i] for c, u in zip(self.columns[1:-1], used, strict=True) if u)]

    def batches(
        self, keys: Sequence[Hashable], used: Sequence[bool], grads: list[torch.Tensor]
    ) -> list[Batch]:
        """The layout for tensors grouped as ``keys`` groups them (kept: the groups change
        rarely, and the layouts not for a bucket: its plan key has the grads' strides)."""
        first: dict = {}
        signature = (tuple(first.setdefault(k, i) for i, k in enumerate(keys)), tuple(used))
        cache = self.memo.setdefault("layouts", {})
        batches = cache.get(signature)
        if batches is None:
            cut = [all(t.is_contiguous() for t in (*self.operands(i, used), g)) for i, g in enumerate(grads)]
            params = self.columns[0]
            batches = cache[signature] = layout(
                [p.numel() for p in params], cut, [p.shape for p in params], keys
            )
        return batches

    def work(self, batch: Batch, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Working tensor ``name`` of the batch's ``n`` elements (of ``dtype``, by default the
        compute dtype): its part of the bucket's scratch, or a new tensor for a batch larger
        than CHUNK."""
        key = (name, dtype or self.dtype, getattr(_WORKER, "index", 0))  # each thread its own
        w = batch.cache.get(key)
        if w is None:
            if batch.n > CHUNK:
                return torch.empty(batch.n, dtype=key[1], device=self.bucket.device)
            scratch = self.memo.setdefault("scratch", {})
            buffer = scratch.get(key)
            if buffer is None:
                buffer = scratch[key] = torch.empty(CHUNK, dtype=key[1], device=self.bucket.device)
            w = batch.cache[key] = buffer[: batch.n]
        return w

    def views(self, batch: Batch, name: str, w: torch.Tensor) -> list[torch.Tensor]:
        """The pieces' places in working tensor ``name`` (``w``)."""
        if batch.single:
            return [w]
        if batch.n > CHUNK:
            return batch.views(w)
        key = ("views", name, w.dtype, getattr(_WORKER, "index", 0))
        views = batch.cache.get(key)
        if views is None:
            views = batch.cache[key] = batch.views(w)
        return views

    def parts(self, batch: Batch, column: int) -> list[torch.Tensor]:
        """The batch's pieces of ``bucket.columns[column]`` (kept: views of the bucket's
        tensors are as valid as the bucket)."""
        parts = batch.cache.get(column)
        if parts is None:
            parts = batch.cache[column] = batch.parts(self.columns[column])
        return parts

    def copy_in(self, batch: Batch, name: str, column: int) -> torch.Tensor:
        """Working tensor ``name`` holding the batch's pieces of ``bucket.columns[column]``; a
        batch of one slice of a tensor in the compute dtype works on the tensor itself."""
        parts = self.parts(batch, column)
        if batch.single and parts[0].dtype == self.dtype:
            return parts[0]
        w = self.work(batch, name)
        torch._foreach_copy_(self.views(batch, name, w), parts)
        return w

    def copy_out(self, batch: Batch, name: str, w: torch.Tensor, column: int) -> None:
        """Working tensor ``name`` (``w``) into the batch's pieces of ``bucket.columns[column]``."""
        parts = self.parts(batch, column)
        if parts[0] is not w:  # else the step worked on the tensor itself
            torch._foreach_copy_(parts, self.views(batch, name, w))

    def load_param(self, batch: Batch) -> torch.Tensor:
        return self.copy_in(batch, "x", 0)

    def load_state(self, batch: Batch, j: int) -> torch.Tensor:
        return self.copy_in(batch, f"s{j}", 1 + j)

    def store_state(self, batch: Batch, j: int, w: torch.Tensor) -> None:
        self.copy_out(batch, f"s{j}", w, 1 + j)

    def store_param(self, batch: Batch, x: torch.Tensor) -> None:
        self.copy_out(batch, "x", x, 0)


_WORKER = threading.local()  # ``index``: which of the threads stepping batches this is
_HELPERS: dict = {}  # (process id, threads) -> the pool of helper threads


def each(batches: list[Batch], step: Callable[[Batch], None]) -> None:
    """``step(batch)`` for every batch, by as many threads as torch uses (this one included):
    each takes the next batch when done with one and runs its ops on one core. (One op at a
    time over both cores would make hundreds of rounds of torch's thread team a step, each
    waiting for its slowest thread: on a machine shared with other work, many times the
    step's own time.) A thread ``index`` (``_WORKER``) has its own working tensors."""
    threads = torch.get_num_threads()
    n = min(threads, len(batches))
    if n <= 1:
        for batch in batches:
            step(batch)
        return
    queue = iter(batches)  # shared: a list iterator hands each batch out once

    def drain(index: int) -> None:
        _WORKER.index = index
        with torch.no_grad():  # grad mode is per thread
            for batch in queue:
                step(batch)

    key = (os.getpid(), n - 1)  # a forked child has none of its parent's threads
    pool = _HELPERS.get(key)
    if pool is None:
        pool = _HELPERS[key] = ThreadPoolExecutor(
            n - 1, "fusedopt-cpu-step", initializer=torch.set_num_threads, initargs=(1,)
        )
    helpers = [pool.submit(drain, i) for i in range(1, n)]
    torch.set_num_threads(1)  # this thread's setting only
    try:
        drain(0)
    finally:
        torch.set_num_threads(threads)
        _WORKER.index = 0
        errors = [e for e in (h.exception() for h in helpers) if e is not None]
    if errors:
        raise errors[0]


Math = Callable[[Batch, Hashable, torch.Tensor, torch.Tensor, list], None]


def run(
    storage: Storage,
    grads: list[torch.Tensor],
    amp,
    keys: Sequence[Hashable],
    used: Sequence[bool],
    math: Math,
    *,
    maximize: bool,
    fused: bool,
) -> None:
    """``math(batch, key, x, d, states)`` for each batch (:func:`each`) on its working copies:
    the param, the grad the update uses (unscaled, clipped and negated for ``maximize`` in
    torch's order; for torch's fused step only clipped: it unscales and negates by itself) and
    the state columns (None where not ``used``), loaded before and stored after."""

    def step(batch: Batch) -> None:
        x = storage.load_param(batch)
        d = storage.work(batch, "d")
        torch._foreach_copy_(storage.views(batch, "d", d), batch.parts(grads))
        if amp.grad_scale is not None and not fused:
            d.div_(amp.grad_scale.to(d.device))
        if amp.clip_coef is not None:
            d.mul_(amp.clip_coef.to(d.device))
        if maximize and not fused:
            d.neg_()
        states = [storage.load_state(batch, j) if u else None for j, u in enumerate(used)]
        math(batch, keys[batch.pieces[0][0]], x, d, states)
        for j, w in enumerate(states):
            if w is not None:
                storage.store_state(batch, j, w)
        storage.store_param(batch, x)

    batches = storage.batches(keys, used, grads)
    storage.prepare(used)
    each(batches, step)


# The algorithms --------------------------------------------------------------------------------


def sgd_reference(
    storage: Storage,
    grads: list[torch.Tensor],
    amp,
    fresh: list[bool],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    fused: bool = False,
) -> None:
    """SGD step. ``fresh[i]`` marks a momentum buffer created this step (it takes the grad)."""

    def math(batch: Batch, new: bool, x: torch.Tensor, d: torch.Tensor, states: list) -> None:
        (b,) = states
        if fused:  # never with a fresh buffer (torch's fused SGD takes them all fresh or none)
            torch._fused_sgd_(
                storage.views(batch, "x", x), storage.views(batch, "d", d),
                [] if b is None else storage.views(batch, "s0", b), weight_decay=weight_decay,
                momentum=momentum, lr=lr, dampening=dampening, nesterov=nesterov, maximize=maximize,
                is_first_step=False, grad_scale=amp.grad_scale,
            )  # fmt: skip
            return
        if weight_decay != 0:
            d.add_(x, alpha=weight_decay)
        if b is not None:
            if new:
                b.copy_(d)
            else:
                b.mul_(momentum).add_(d, alpha=1 - dampening)
            if nesterov:
                d.add_(b, alpha=momentum)
        x.add_(d if b is None or nesterov else b, alpha=-lr)

    run(storage, grads, amp, fresh, [momentum != 0], math, maximize=maximize, fused=fused)


def _decay_(x: torch.Tensor, d: torch.Tensor, lr: float, weight_decay: float, decoupled: bool) -> None:
    """Weight decay as the Adam family applies it: ``x *= 1 - lr * wd`` (decoupled) or
    ``d += wd * x`` (L2)."""
    if weight_decay != 0:
        if decoupled:
            x.mul_(1 - lr * weight_decay)
        else:
            d.add_(x, alpha=weight_decay)


def _moments_(m: torch.Tensor, v: torch.Tensor, d: torch.Tensor, beta1: float, beta2: float) -> None:
    """Adam's moments: ``m = lerp(m, d, 1 - beta1)``, ``v = beta2 v + (1 - beta2) d * d``."""
    m.lerp_(d, 1 - beta1)
    v.mul_(beta2).addcmul_(d, d, value=1 - beta2)


def adam_reference(
    storage: Storage,
    grads: list[torch.Tensor],
    amp,
    bias_corrections: list[tuple[float, float]],
    *,
    amsgrad: bool,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
    fused: bool = False,
    steps: list[torch.Tensor] | None = None,
) -> None:
    """Adam/AdamW step; ``bias_corrections[i] = (1 - beta1**t, sqrt(1 - beta2**t))`` for tensor
    i (``fused``: torch's fused step reads ``t`` from ``steps[i]``).

    torch's fused CPU Adam computes bf16/fp16 tensors in fp32 and rounds each result once, bit
    for bit as it steps fp32 copies that are rounded afterwards: with the plain storage, dense
    layouts and grads that need no unscaling or clipping it steps the tensors themselves, in
    one pass."""
    used = [True, True, amsgrad]
    if (
        fused
        and not storage.options
        and amp.grad_scale is None
        and amp.clip_coef is None
        and storage.dense(grads, used)
    ):
        params, exp_avgs, exp_avg_sqs, vmax = storage.columns[:4]
        step = torch._fused_adamw_ if decoupled_weight_decay else torch._fused_adam_
        step(
            params, grads, exp_avgs, exp_avg_sqs, vmax if amsgrad else [], steps, lr=lr, beta1=beta1,
            beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=amsgrad, maximize=maximize,
        )  # fmt: skip
        return

    def math(batch: Batch, key: tuple, x: torch.Tensor, d: torch.Tensor, states: list) -> None:
        m, v, vmax = states
        if fused:
            step = torch._fused_adamw_ if decoupled_weight_decay else torch._fused_adam_
            step(
                storage.views(batch, "x", x), storage.views(batch, "d", d), storage.views(batch, "s0", m),
                storage.views(batch, "s1", v), storage.views(batch, "s2", vmax) if amsgrad else [],
                batch.each(steps), lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
                amsgrad=amsgrad, maximize=maximize, grad_scale=amp.grad_scale,
            )  # fmt: skip
            return
        bc1, bc2_sqrt = key
        _decay_(x, d, lr, weight_decay, decoupled_weight_decay)
        _moments_(m, v, d, beta1, beta2)
        denom = storage.work(batch, "t")
        if vmax is not None:
            torch.maximum(vmax, v, out=vmax)
            torch.sqrt(vmax, out=denom)
        else:
            torch.sqrt(v, out=denom)
        denom.div_(bc2_sqrt).add_(eps)
        x.addcdiv_(m, denom, value=-(lr / bc1))

    run(storage, grads, amp, bias_corrections, used, math, maximize=maximize, fused=fused)


def rmsprop_reference(
    storage: Storage,
    grads: list[torch.Tensor],
    amp,
    *,
    centered: bool,
    lr: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    maximize: bool,
) -> None:
    """RMSprop step (state columns: square_avg, momentum_buffer if momentum > 0, grad_avg if
    centered)."""

    def math(batch: Batch, _, x: torch.Tensor, d: torch.Tensor, states: list) -> None:
        v, b, ga = states
        if weight_decay != 0:
            d.add_(x, alpha=weight_decay)
        v.mul_(alpha).addcmul_(d, d, value=1 - alpha)
        avg = storage.work(batch, "t")
        if ga is not None:
            ga.lerp_(d, 1 - alpha)
            torch.addcmul(v, ga, ga, value=-1, out=avg).sqrt_()
        else:
            torch.sqrt(v, out=avg)
        avg.add_(eps)
        if b is not None:
            b.mul_(momentum).addcdiv_(d, avg)
            x.add_(b, alpha=-lr)
        else:
            x.addcdiv_(d, avg, value=-lr)

    keys = [None] * len(grads)  # no per-tensor scalar
    run(storage, grads, amp, keys, [True, momentum > 0, centered], math, maximize=maximize, fused=False)


def adagrad_reference(
    storage: Storage,
    grads: list[torch.Tensor],
    amp,
    clrs: list[float],
    *,
    weight_decay: float,
    eps: float,
    maximize: bool,
    fused: bool = False,
    lr: float = 0.0,
    lr_decay: float = 0.0,
    steps: list[torch.Tensor] | None = None,
) -> None:
    """Adagrad step (dense grads); ``clrs[i] = lr / (1 + (t - 1) * lr_decay)`` for tensor i
    (``fused``: torch's fused step computes it from ``lr``, ``lr_decay`` and ``steps[i]``)."""

    def math(batch: Batch, clr: float, x: torch.Tensor, d: torch.Tensor, states: list) -> None:
        (s,) = states
        if fused:
            torch._fused_adagrad_(
                storage.views(batch, "x", x), storage.views(batch, "d", d), storage.views(batch, "s0", s),
                batch.each(steps), lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps,
                maximize=maximize, grad_scale=amp.grad_scale,
            )  # fmt: skip
            return
        if weight_decay != 0:
            d.add_(x, alpha=weight_decay)
        s.addcmul_(d, d, value=1)
        std = storage.work(batch, "t")
        torch.sqrt(s, out=std)
        x.addcdiv_(d, std.add_(eps), value=-clr)

    run(storage, grads, amp, clrs, [True], math, maximize=maximize, fused=fused)


def adamax_reference(
    storage: Storage,
    grads: list[torch.Tensor],
    amp,
    clrs: list[float],
    *,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """Adamax step (state columns: exp_avg, exp_inf); ``clrs[i] = lr / (1 - beta1**t)``."""

    def math(batch: Batch, clr: float, x: torch.Tensor, d: torch.Tensor, states: list) -> None:
        m, u = states
        if weight_decay != 0:
            d.add_(x, alpha=weight_decay)
        m.lerp_(d, 1 - beta1)
        t = storage.work(batch, "t")
        torch.maximum(u.mul_(beta2), torch.abs(d, out=t).add_(eps), out=u)
        x.addcdiv_(m, u, value=-clr)

    run(storage, grads, amp, clrs, [True, True], math, maximize=maximize, fused=False)


def adadelta_reference(
    storage: Storage,
    grads: list[torch.Tensor],
    amp,
    *,
    lr: float,
    rho: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """Adadelta step (state columns: square_avg, acc_delta)."""

    def math(batch: Batch, _, x: torch.Tensor, d: torch.Tensor, states: list) -> None:
        v, a = states
        if weight_decay != 0:
            d.add_(x, alpha=weight_decay)
        v.mul_(rho).addcmul_(d, d, value=1 - rho)
        std = torch.add(v, eps, out=storage.work(batch, "t")).sqrt_()
        delta = torch.add(a, eps, out=storage.work(batch, "u")).sqrt_().div_(std).mul_(d)
        a.mul_(rho).addcmul_(delta, delta, value=1 - rho)
        x.add_(delta, alpha=-lr)

    keys = [None] * len(grads)  # no per-tensor scalar
    run(storage, grads, amp, keys, [True, True], math, maximize=maximize, fused=False)


def rprop_reference(
    storage: Storage,
    grads: list[torch.Tensor],
    amp,
    *,
    etaminus: float,
    etaplus: float,
    step_size_min: float,
    step_size_max: float,
    maximize: bool,
) -> None:
    """Rprop step (state columns: prev, step_size)."""

    def math(batch: Batch, _, x: torch.Tensor, d: torch.Tensor, states: list) -> None:
        prev, s = states
        eta = torch.mul(d, prev, out=storage.work(batch, "t")).sign_()
        grew, flipped, same = (storage.work(batch, k, torch.bool) for k in ("grew", "flipped", "same"))
        torch.gt(eta, 0, out=grew), torch.lt(eta, 0, out=flipped), torch.eq(eta, 0, out=same)
        eta.masked_fill_(grew, etaplus).masked_fill_(flipped, etaminus).masked_fill_(same, 1)
        s.mul_(eta).clamp_(step_size_min, step_size_max)
        d.masked_fill_(flipped, 0)
        x.addcmul_(torch.sign(d, out=storage.work(batch, "u")), s, value=-1)
        prev.copy_(d)

    keys = [None] * len(grads)  # no per-tensor scalar
    run(storage, grads, amp, keys, [True, True], math, maximize=maximize, fused=False)


def _decayed_moments_reference(storage: Storage, grads, amp, keys: list, finish, options: dict) -> None:
    """The steps of RAdam and NAdam: Adam's decay (``options["decoupled_weight_decay"]``) and
    moments, then ``finish(batch, key, x, d, m, v)`` (the update of the param); ``options``:
    also maximize, lr, beta1, beta2, weight_decay."""

    def math(batch: Batch, key: tuple, x: torch.Tensor, d: torch.Tensor, states: list) -> None:
        m, v = states
        _decay_(x, d, options["lr"], options["weight_decay"], options["decoupled_weight_decay"])
        _moments_(m, v, d, options["beta1"], options["beta2"])
        finish(batch, key, x, d, m, v)

    run(storage, grads, amp, keys, [True, True], math, maximize=options["maximize"], fused=False)


def radam_reference(storage: Storage, grads: list[torch.Tensor], amp, corrections: list, **options) -> None:
    """RAdam step (state columns: exp_avg, exp_avg_sq); ``corrections[i] = (1 - beta1**t,
    sqrt(1 - beta2**t), rect)`` for tensor i (``rect`` None where ``rho_t <= 5``); ``options``:
    lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize."""

    def finish(batch: Batch, key: tuple, x: torch.Tensor, d: torch.Tensor, m: torch.Tensor, v: torch.Tensor):
        bc1, bc2_sqrt, rect = key
        u = torch.div(m, bc1, out=storage.work(batch, "u")).mul_(options["lr"])
        if rect is not None:  # float / tensor is torch's reciprocal, then a product
            adaptive = torch.sqrt(v, out=storage.work(batch, "t")).add_(options["eps"]).reciprocal_()
            u.mul_(adaptive.mul_(bc2_sqrt)).mul_(rect)
        x.sub_(u)

    _decayed_moments_reference(storage, grads, amp, corrections, finish, options)


def nadam_reference(storage: Storage, grads: list[torch.Tensor], amp, coefficients: list, **options) -> None:
    """NAdam step (state columns: exp_avg, exp_avg_sq); ``coefficients[i] = (1 - beta2**t,
    -lr (1 - mu_t) / (1 - mu_product), -lr mu_{t+1} / (1 - mu_product mu_{t+1}))`` for tensor
    i (:func:`nadam_coefficients`); ``options`` as :func:`radam_reference`'s."""

    def finish(batch: Batch, key: tuple, x: torch.Tensor, d: torch.Tensor, m: torch.Tensor, v: torch.Tensor):
        bc2, grad_coef, avg_coef = key
        denom = torch.div(v, bc2, out=storage.work(batch, "t")).sqrt_().add_(options["eps"])
        x.addcdiv_(d, denom, value=grad_coef).addcdiv_(m, denom, value=avg_coef)

    _decayed_moments_reference(storage, grads, amp, coefficients, finish, options)


def nadam_coefficients(
    mu_product: torch.Tensor, step: float, *, lr: float, beta1: float, beta2: float, momentum_decay: float
) -> tuple[float, float, float]:
    """NAdam's per-tensor values of step ``step``, in torch's arithmetic: ``mu_product`` (the
    0-d state) is multiplied by ``mu_t`` in place, the rest in Python floats."""
    mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
    mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * momentum_decay)))
    product = float(mu_product.mul_(mu))
    return 1 - beta2**step, -lr * (1.0 - mu) / (1.0 - product), (-lr * mu_next) / (1.0 - product * mu_next)


def radam_corrections(beta1: float, beta2: float, step: float) -> tuple[float, float, float | None]:
    """RAdam's per-tensor values of step ``step``, in torch's Python-float arithmetic."""
    bias_correction2 = 1 - beta2**step
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2
    rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
    return 1 - beta1**step, bias_correction2**0.5, rect if rho_t > 5.0 else None


def counted_reference(
    bucket, amp, storage: Storage | None, reference: Callable[[Storage, list[float]], None]
) -> None:
    """The non-Triton step of an algorithm with step counters whose fastest correct CPU path is
    its reference on cache-sized working copies (every dtype: faster than torch's for-loop and
    foreach steps, which pass over whole tensors op by op): nothing when GradScaler found an
    inf, else the counters advance and ``reference(storage, steps)`` runs (``storage``: the
    low-precision options' or the plain one; ``steps``: each tensor's count, this step
    included)."""
    if skipped(amp.found_inf):
        return
    torch._foreach_add_(bucket.counters, 1)
    reference(storage or Storage(bucket), torch.stack(bucket.counters).tolist())


def scalar_reference(reference: Callable[..., None]) -> Callable[..., None]:
    """The non-Triton step (an ``Algorithm``'s ``eager``) of an algorithm whose reference takes
    no per-tensor value: ``reference(storage, grads, amp, maximize=, **scalars)`` through
    :func:`counted_reference`, the group's scalars as host floats (CPU tensors: no sync to
    speak of)."""

    def eager(hyper: dict, flags: dict, bucket, grads, amp, state, storage: Storage | None = None) -> None:
        h = {k: float(v) for k, v in hyper.items()}
        counted_reference(
            bucket, amp, storage,
            lambda storage, steps: reference(storage, bucket.grads(grads), amp, maximize=flags["MAXIMIZE"], **h),
        )  # fmt: skip

    return eager


def lion_math_(
    x: torch.Tensor,
    d: torch.Tensor,
    m: torch.Tensor,
    c: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> None:
    """One Lion step of one tensor (or working copy) in place, in the ``lion-pytorch`` package's
    order of ops: ``x`` the param, ``d`` the grad (maximize already applied), ``m`` its
    ``exp_avg``, ``c`` scratch of ``x``'s shape (the update's direction)."""
    if weight_decay != 0:
        x.mul_(1 - lr * weight_decay)
    torch.mul(m, beta1, out=c).add_(d, alpha=1 - beta1).sign_()
    x.add_(c, alpha=-lr)
    m.mul_(beta2).add_(d, alpha=1 - beta2)


def lion_reference(
    storage: Storage,
    grads: list[torch.Tensor],
    amp,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """Lion step (state column: exp_avg)."""

    def math(batch: Batch, _, x: torch.Tensor, d: torch.Tensor, states: list) -> None:
        (m,) = states
        lion_math_(
            x, d, m, storage.work(batch, "t"), lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay
        )

    keys = [None] * len(grads)  # no per-tensor scalar
    run(storage, grads, amp, keys, [True], math, maximize=maximize, fused=False)
