"""Bit packing of k-bit codes (k = 1..8) into a dense little-endian bitstream.

Layout: code i occupies bits ``[i*k, (i+1)*k)`` of the stream, and stream bit j is bit
``j % 8`` of byte ``j // 8`` (LSB first). n codes take exactly ``ceil(n*k/8)`` bytes, so the
storage on disk is what the bit accounting counts. The layout is independent of the device
and of the tensor's shape, and a kernel can decode any group of 8 codes from k bytes.

Both directions are vectorised: 8 codes make one group of 8k <= 64 bits, assembled in an
int64 with shifts (k < 8) or copied as is (k = 8). Works on CPU and CUDA tensors alike.
"""

from __future__ import annotations

import torch


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes that n codes of ``bits`` bits occupy: ceil(n * bits / 8)."""
    _check_bits(bits)
    return (n * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r}: allowed are integers 1..8")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (each < 2^bits) into a 1-D uint8 bitstream of ceil(n*k/8) bytes."""
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be a uint8 tensor, got {codes.dtype}")
    flat = codes.reshape(-1)
    n = flat.numel()
    if n and bits < 8 and int(flat.max()) >= 2**bits:
        raise ValueError(f"code {int(flat.max())} does not fit in {bits} bits (max {2**bits - 1})")
    if bits == 8:
        return flat.clone()
    groups = -(-n // 8)
    padded = torch.zeros(groups * 8, dtype=torch.int64, device=flat.device)
    padded[:n] = flat
    shifts = torch.arange(8, device=flat.device, dtype=torch.int64) * bits
    words = (padded.view(groups, 8) << shifts).sum(dim=1)  # disjoint bit ranges: sum == or
    byte_shifts = torch.arange(bits, device=flat.device, dtype=torch.int64) * 8
    out = ((words.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return out[: packed_nbytes(n, bits)].contiguous()


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first n codes of the stream, as a 1-D uint8 tensor."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 tensor, got {packed.dtype}")
    flat = packed.reshape(-1)
    need = packed_nbytes(n, bits)
    if flat.numel() != need:
        raise ValueError(
            f"{n} codes of {bits} bits need {need} bytes, but the stream has {flat.numel()}"
        )
    if bits == 8:
        return flat.clone()
    groups = -(-n // 8)
    padded = torch.zeros(groups * bits, dtype=torch.int64, device=flat.device)
    padded[: flat.numel()] = flat
    byte_shifts = torch.arange(bits, device=flat.device, dtype=torch.int64) * 8
    words = (padded.view(groups, bits) << byte_shifts).sum(dim=1)
    shifts = torch.arange(8, device=flat.device, dtype=torch.int64) * bits
    codes = (words.unsqueeze(1) >> shifts) & (2**bits - 1)
    return codes.reshape(-1)[:n].to(torch.uint8)
