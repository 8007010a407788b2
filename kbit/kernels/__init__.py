"""GPU kernels (Triton) for blockwise k-bit quantization, bit-exact with the CPU reference.

Importing this package never imports Triton: machines without Triton or a GPU use the torch
reference in ``kbit.blockwise``, and callers ask ``available(x)`` before dispatching here. With
``TRITON_INTERPRET=1`` set before Triton is first imported, the same kernels run on CPU tensors
through Triton's interpreter (slow; used by the tests).
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kbit.kernels.launch import KernelConfig

__all__ = [
    "available",
    "dequantize_blockwise",
    "fake_quantize_blockwise",
    "quantize_blockwise",
]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def available(x: torch.Tensor) -> bool:
    """True when the Triton kernels can run on ``x``'s device.

    CUDA tensors need Triton and a visible CUDA device; CPU tensors need Triton's interpreter
    (``TRITON_INTERPRET=1``).
    """
    if importlib.util.find_spec("triton") is None:
        return False
    if x.device.type == "cuda":
        return torch.cuda.is_available()
    return x.device.type == "cpu" and _interpreting()


def fake_quantize_blockwise(
    x: torch.Tensor,
    codebook: torch.Tensor,
    block_size: int | None,
    scale_dtype: torch.dtype = torch.float16,
    *,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(x))`` in one fused pass: read ``x`` once, write the result once.

    ``x``: fp16/bf16/fp32 of any shape; ``codebook``: sorted, at most 256 entries;
    ``block_size``: values per absmax block, ``None`` for one block per tensor. Returns a tensor
    of ``x``'s shape and dtype.
    """
    from kbit.kernels import launch

    return launch.fake_quantize_blockwise(
        x, codebook, block_size, scale_dtype, config=config or launch.DEFAULT_CONFIG
    )


def quantize_blockwise(
    x: torch.Tensor,
    codebook: torch.Tensor,
    block_size: int | None,
    scale_dtype: torch.dtype,
    bits: int,
    *,
    config: KernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed ``bits``-bit codes (uint8, LSB-first, ``ceil(numel*bits/8)`` bytes) and the 1-D
    block scales in ``scale_dtype`` (one per block of the flattened tensor)."""
    from kbit.kernels import launch

    return launch.quantize_blockwise(
        x, codebook, block_size, scale_dtype, bits, config=config or launch.DEFAULT_CONFIG
    )


def dequantize_blockwise(
    packed: torch.Tensor,
    scales: torch.Tensor,
    codebook: torch.Tensor,
    block_size: int | None,
    bits: int,
    numel: int,
    out_dtype: torch.dtype = torch.float16,
    *,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Inverse of ``quantize_blockwise``: a 1-D tensor of ``numel`` values in ``out_dtype``."""
    from kbit.kernels import launch

    return launch.dequantize_blockwise(
        packed,
        scales,
        codebook,
        block_size,
        bits,
        numel,
        out_dtype,
        config=config or launch.DEFAULT_CONFIG,
    )
