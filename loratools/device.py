"""Where the arithmetic runs: `--device auto|cpu|cuda`, and how many CPU threads torch may use."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .errors import UsageError


def resolve_device(device: str) -> torch.device:
    """auto = CUDA when available, else CPU; asking for CUDA where there is none is a usage error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here (use --device auto or cpu)")
    return torch.device(device)


@contextlib.contextmanager
def torch_threads(n: int, device: torch.device | None = None) -> Iterator[None]:
    """Run a block with torch limited to n CPU threads (no-op for CUDA work), restored afterwards.

    Memory-bound element-wise work and small matmuls get slower with more threads on a busy machine
    (measured in merge, combine and quantize), so those drivers pin 1 thread on the CPU.
    """
    if device is not None and device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
