"""The private torch names the optimizers use, each guarded: a torch without one gets a
fallback or a clear error, never an AttributeError from deep inside a step.
(``benchmarks/NOTES.md`` lists every private name the package uses and why.)
"""

from __future__ import annotations

import functools
import importlib

import torch

_optimizer = importlib.import_module("torch.optim.optimizer")


def check_fused_device_dtype(p: torch.Tensor) -> None:
    """torch's ``fused=True`` check of a param's device and dtype (same message), or ours."""
    check = getattr(_optimizer, "_device_dtype_check_for_fused", None)
    if check is not None:
        check(p)
    elif not (p.is_floating_point() and p.device.type in ("cuda", "cpu", "xpu", "mps", "hpu")):
        raise RuntimeError(
            "`fused=True` requires all the params to be floating point Tensors of supported devices, "
            f"but {p.dtype} and {p.device.type}"
        )


def capture_health_check(optimizer: torch.optim.Optimizer) -> None:
    """torch's refusal of CUDA-graph capture for a non-capturable optimizer (named
    ``_accelerator_graph_capture_health_check`` in newer torch, ``_cuda_graph_capture_health_check``
    before); nothing where neither exists."""
    check = getattr(optimizer, "_accelerator_graph_capture_health_check", None) or getattr(
        optimizer, "_cuda_graph_capture_health_check", None
    )
    if check is not None:
        check()


def check_capturable_device(p: torch.Tensor) -> None:
    """torch's refusal of ``capturable=True`` for a param on a device whose steps cannot be
    captured (the CPU): the same error type and message as torch's step, raised before anything
    changes (torch raises it after creating the state)."""
    if torch.compiler.is_compiling():  # torch leaves that check to the compiler too
        return
    supported = getattr(_optimizer, "_get_capturable_supported_devices", None)
    devices = supported() if supported is not None else ["cuda", "xpu", "hpu", "xla"]
    if p.device.type not in devices:
        raise AssertionError(
            f"If capturable=True, params and state_steps must be on supported devices: {devices}."
        )


def profiled_step(step):
    """``step`` wrapped as torch's ``Optimizer.profile_hook_step`` wraps it: the global and the
    optimizer's step pre-hooks (which may replace the arguments), the step, torch's
    ``_optimizer_step_code`` marker, the post-hooks, all inside a profiler range named
    ``Optimizer.step#<class>.step``; but the range is entered only while a profiler records
    (``torch._C._autograd._profiler_enabled()``) or dynamo traces: entering one costs about 10 us
    on the CPU when nothing records it, a tenth of a fused step's host time. Without the hook
    registries (another torch), torch's own wrapper."""
    hooked = torch.optim.Optimizer.profile_hook_step(step)
    pre = getattr(_optimizer, "_global_optimizer_pre_hooks", None)
    post = getattr(_optimizer, "_global_optimizer_post_hooks", None)
    recording = getattr(torch._C._autograd, "_profiler_enabled", None)
    if pre is None or post is None or recording is None:
        return hooked
    # Run eagerly (this frame not traced: dynamo fell back, e.g. at its recompile limit), the
    # whole step stays eager: dynamo must not compile frames inside it (a kernel launch).
    eager = torch.compiler.disable(step, recursive=True)

    @functools.wraps(step)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling() or recording():  # (dynamo cannot trace the latter)
            return hooked(*args, **kwargs)
        self = args[0]
        for hook in (*pre.values(), *self._optimizer_step_pre_hooks.values()):
            result = hook(self, args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(
                        f"{step} must return None or a tuple of (new_args, new_kwargs), but got {result}."
                    )
                args, kwargs = result
        out = eager(*args, **kwargs)
        self._optimizer_step_code()
        for hook in (*self._optimizer_step_post_hooks.values(), *post.values()):
            hook(self, args, kwargs)
        return out

    return wrapper
