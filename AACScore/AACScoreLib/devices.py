"""Which compute device to use: CUDA only when a small operation on the GPU really works, never by guess.

A CUDA build of torch on a machine without a working GPU is common (the pinned wheels are CUDA builds), so
`torch.cuda.is_available()` alone is not trusted: a tiny operation must succeed too.
"""

from __future__ import annotations

from typing import Callable

from .errors import DeviceError

DEVICES = ("auto", "cpu", "cuda")


def cuda_problem() -> str | None:
    """Why CUDA cannot be used here, or None when a tiny operation on the GPU works."""
    try:
        import torch
    except ImportError:
        return "torch is not installed (use Settings > Install dependencies)"
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        return f"torch {torch.__version__} ({build}) sees no usable NVIDIA GPU"
    try:
        (torch.ones(2, device="cuda") * 2).sum().item()
    except Exception as error:  # noqa: BLE001 - a broken driver raises anything
        return f"a test operation on the GPU failed ({error})"
    return None


def _device_and_problem(requested: str, problem: Callable[[], str | None]) -> tuple[str, str | None]:
    """("cpu" | "cuda", why CUDA is not used or None) for "auto", "cpu" or "cuda"."""
    if requested not in DEVICES:
        raise DeviceError(f"unknown device {requested!r}; use auto, cpu or cuda")
    if requested == "cpu":
        return "cpu", None
    why = problem()
    return ("cuda", None) if why is None else ("cpu", why)


def device_choice(requested: str = "auto", problem: Callable[[], str | None] = cuda_problem) -> tuple[str, str]:
    """("cpu" | "cuda", a sentence for the user), for the Slicer panel.

    CUDA asked for but unusable falls back to the CPU with a message that says why, instead of failing
    midway through a batch.
    """
    requested = (requested or "auto").lower()
    device, why = _device_and_problem(requested, problem)
    if device == "cuda":
        return "cuda", "Using the NVIDIA GPU (CUDA)."
    if why is None:
        return "cpu", "Using the CPU, as chosen."
    if requested == "cuda":
        return "cpu", f"CUDA was requested but cannot be used: {why}. Using the CPU instead (slower)."
    return "cpu", f"Using the CPU: {why}."


def resolve_device(requested: str = "auto"):
    """torch.device for "auto" | "cpu" | "cuda", for command lines and the API: an explicit "cuda" that cannot
    work raises DeviceError rather than running many times slower than asked."""
    import torch

    requested = (requested or "auto").lower()
    device, why = _device_and_problem(requested, cuda_problem)
    if why is not None and requested == "cuda":
        raise DeviceError(f"--device cuda requested but {why}; use --device cpu or auto")
    return torch.device(device)
