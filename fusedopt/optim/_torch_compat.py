"""The private torch names the optimizers use, each guarded: a torch without one gets a
fallback or a clear error, never an AttributeError from deep inside a step.
(``benchmarks/NOTES.md`` lists every private name the package uses and why.)
"""

from __future__ import annotations

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
