"""Compute precision of the dense body (experts, bottoms, gates, towers).

Parameters, gradients, optimizer state, embeddings, losses and returned logits keep their dtype
(float32, or float64 for a model converted with ``.double()``); the precision chosen here only
sets the dtype of the body's matrix products and activations (mixed precision), and only ever
lowers float32: a float64 model always computes in float64.

- ``"float32"`` (or ``None``): no cast; exact arithmetic in the parameters' dtype.
- ``"bfloat16"``: bfloat16 products and activations with float32 accumulation inside the
  GEMMs (~3 significant digits per activation), for float32 models.
- ``"auto"``: ``"bfloat16"`` where the device multiplies bfloat16 natively (CUDA devices with
  bfloat16 support, CPUs with AVX512-BF16 or AMX-BF16), ``"float32"`` elsewhere. The training
  entry point's default (``pipeline.train.config``, :data:`DEFAULT_PRECISION`).

Example:
    >>> import torch
    >>> resolve_compute_dtype("bfloat16", torch.device("cpu"), torch.float32)
    torch.bfloat16
    >>> resolve_compute_dtype("bfloat16", torch.device("cpu"), torch.float64)
    torch.float64
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

#: accepted values of ``compute_dtype`` / ``precision``
PRECISIONS = ("auto", "float32", "bfloat16")

#: the training entry point's default (``pipeline.train.config.TrainConfig.precision``); the library's
#: model constructors default to ``None`` (the parameters' dtype, exact)
DEFAULT_PRECISION = "auto"

Precision = str | torch.dtype | None


def check_precision(precision: Precision) -> Precision:
    """``precision`` if valid (a name of :data:`PRECISIONS`, ``torch.float32``,
    ``torch.bfloat16`` or ``None``), else ``ValueError``."""
    if precision is None or precision in (torch.float32, torch.bfloat16):
        return precision
    if isinstance(precision, str) and precision in PRECISIONS:
        return precision
    raise ValueError(f"compute_dtype/precision must be one of {PRECISIONS} (or None), got {precision!r}")


@functools.lru_cache(maxsize=None)
def native_bfloat16(device_type: str, index: int | None = None) -> bool:
    """Whether the device multiplies bfloat16 matrices in hardware (not emulated)."""
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return False
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # older torch without the keyword
            return bool(torch.cuda.is_bf16_supported())
    if device_type == "cpu":
        return _cpu_has_bf16()
    return False


def _cpu_has_bf16() -> bool:
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    for name in probes:  # private helpers of torch.cpu (torch >= 2.3); /proc/cpuinfo otherwise
        fn = getattr(torch.cpu, name, None)
        if fn is not None:
            try:
                if fn():
                    return True
            except RuntimeError:
                pass
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_compute_dtype(precision: Precision, device: torch.device, input_dtype: torch.dtype) -> torch.dtype:
    """The dtype the body computes in for ``precision`` on ``device`` with inputs of ``input_dtype``.

    Args:
        precision: one of :data:`PRECISIONS`, a torch dtype, or ``None`` (= ``input_dtype``).
        device: where the body runs.
        input_dtype: dtype of the body's input (and parameters).
    """
    precision = check_precision(precision)
    if input_dtype != torch.float32 or precision in (None, "float32", torch.float32):
        return input_dtype  # never down-cast anything but float32
    if precision == "auto":
        return torch.bfloat16 if native_bfloat16(device.type, device.index) else input_dtype
    return torch.bfloat16
