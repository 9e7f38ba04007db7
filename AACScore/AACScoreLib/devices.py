"""Which compute device to use: CUDA only when a small operation on the GPU really works, never by guess.

A CUDA build of torch on a machine without a working GPU is common (the pinned wheels are CUDA builds), so
`torch.cuda.is_available()` alone is not trusted: a tiny operation must succeed too.
"""

from __future__ import annotations

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


def resolve_device(requested: str = "auto"):
    """torch.device for "auto" | "cpu" | "cuda"; an explicit "cuda" that cannot work raises DeviceError."""
    import torch

    if requested not in DEVICES:
        raise DeviceError(f"unknown device {requested!r}; use auto, cpu or cuda")
    if requested == "cpu":
        return torch.device("cpu")
    problem = cuda_problem()
    if problem is None:
        return torch.device("cuda")
    if requested == "cuda":
        raise DeviceError(f"--device cuda requested but {problem}; use --device cpu or auto")
    return torch.device("cpu")
