"""Where a command runs: the ``--device`` and ``--amp`` options of train, eval and analyze."""

from __future__ import annotations

import torch

from .errors import UserError

__all__ = ["amp_dtype", "resolve_device", "synchronize"]


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """The device named by ``spec`` (``auto``: CUDA when available, else CPU); a bare
    ``cuda`` means this process's GPU under torchrun (``local_rank``)."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec}: CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    return dev


def amp_dtype(amp: str, device: torch.device):
    """The autocast dtype of ``--amp`` (``auto``: bf16 on CUDA, none on CPU); None for off."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that host timers measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
