"""Moving small host-built tensors (index lists, task orders, masks) to the model's device
without making the host wait for the device."""

from __future__ import annotations

import torch
from torch import Tensor


def host_to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` (a small CPU tensor) on ``device``.

    A plain ``.to("cuda")`` from pageable memory synchronises the stream (the host waits for
    all queued device work); from pinned memory with ``non_blocking=True`` it is queued like a
    kernel, and PyTorch's pinned-memory allocator keeps the source alive until the copy ran.

    Example:
        >>> host_to_device(torch.arange(3), torch.device("cpu"))
        tensor([0, 1, 2])
    """
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
