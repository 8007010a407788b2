"""GPU kernels (Triton) for blockwise k-bit quantization, bit-exact with the CPU reference.

``*_blockwise``: absmax types with any sorted codebook of at most 256 entries;
``*_microscaling``: mxfp/mxint/nvfp specs (E8M0 or E4M3 block scales, elements rounded to
nearest even). ``kbit.kernels.launch`` says how each codebook is searched,
``kbit.kernels.exact`` holds the proofs behind the arithmetic shortcuts.

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
    from kbit.kernels.launch import KernelConfig, Microscaling
    from kbit.spec import QuantSpec

__all__ = [
    "available",
    "dequantize_blockwise",
    "dequantize_microscaling",
    "fake_quantize_blockwise",
    "fake_quantize_microscaling",
    "quantize_blockwise",
    "quantize_microscaling",
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


def _format(spec: QuantSpec | str) -> Microscaling:
    from kbit.kernels import launch
    from kbit.spec import MICROSCALING_DTYPES, QuantSpec

    spec = QuantSpec.parse(spec)  # a QuantSpec is returned as is
    if spec.dtype not in MICROSCALING_DTYPES:
        raise ValueError(f"{spec.id} is not a microscaling spec ({', '.join(MICROSCALING_DTYPES)})")
    return launch.microscaling(spec.dtype, spec.bits, spec.exponent_bits, spec.block_size)


def fake_quantize_microscaling(
    x: torch.Tensor, spec: QuantSpec | str, *, config: KernelConfig | None = None
) -> torch.Tensor:
    """``dequantize(quantize(x))`` of an ``mxfp``/``mxint``/``nvfp`` spec in one fused pass
    (shared E8M0 or E4M3 block scales, elements rounded to nearest even); same shape and dtype
    as ``x``. Centering (``spec.center``) is the caller's (``kbit.blockwise``)."""
    from kbit.kernels import launch

    return launch.fake_quantize_microscaling(
        x, _format(spec), config=config or launch.DEFAULT_CONFIG
    )


def quantize_microscaling(
    x: torch.Tensor, spec: QuantSpec | str, *, config: KernelConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(packed codes, block scales as ``kbit.blockwise`` stores them: uint8 E8M0 or
    float8_e4m3fn, NVFP4's fp32 global scale or None)."""
    from kbit.kernels import launch

    return launch.quantize_microscaling(x, _format(spec), config=config or launch.DEFAULT_CONFIG)


def dequantize_microscaling(
    packed: torch.Tensor,
    scales: torch.Tensor,
    spec: QuantSpec | str,
    numel: int,
    global_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
    *,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Inverse of ``quantize_microscaling``: a 1-D tensor of ``numel`` values."""
    from kbit.kernels import launch

    return launch.dequantize_microscaling(
        packed, scales, _format(spec), numel, global_scale, out_dtype,
        config=config or launch.DEFAULT_CONFIG,
    )  # fmt: skip
