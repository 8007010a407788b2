"""Bit packing: exact layout against a plain-Python bitstream, round trips, sizes, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kbit.packing import pack, packed_nbytes, unpack


def _bitstream(codes: list[int], bits: int) -> list[int]:
    """The LSB-first stream built one bit at a time: the layout definition, spelled out."""
    stream = [(c >> b) & 1 for c in codes for b in range(bits)]
    stream += [0] * (-len(stream) % 8)
    return [sum(stream[i + j] << j for j in range(8)) for i in range(0, len(stream), 8)]


@given(
    bits=st.integers(1, 8),
    data=st.data(),
)
def test_pack_matches_bit_by_bit_layout_and_round_trips(bits: int, data: st.DataObject) -> None:
    codes = data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=0, max_size=77))
    t = torch.tensor(codes, dtype=torch.uint8)
    packed = pack(t, bits)
    assert packed.dtype == torch.uint8 and packed.ndim == 1
    assert packed.numel() == packed_nbytes(len(codes), bits) == -(-len(codes) * bits // 8)
    assert packed.tolist() == _bitstream(codes, bits)
    assert torch.equal(unpack(packed, bits, len(codes)), t)


@pytest.mark.parametrize("bits", range(1, 9))
def test_round_trip_large_odd_length(bits: int, gen: torch.Generator) -> None:
    n = 7 * 14_287  # odd, not a multiple of 8; packed from a 2-D view (row-major)
    codes = torch.randint(0, 2**bits, (n,), generator=gen, dtype=torch.int64).to(torch.uint8)
    packed = pack(codes.view(7, -1), bits)
    assert packed.numel() == (n * bits + 7) // 8
    assert torch.equal(unpack(packed, bits, n), codes)


def test_known_three_bit_layout() -> None:
    # codes 1, 2, 3 -> bits 100 010 110 (LSB first) -> byte0 = 1 | 2<<3 | (3&3)<<6, byte1 = 3>>2
    assert pack(torch.tensor([1, 2, 3], dtype=torch.uint8), 3).tolist() == [1 | 16 | 192, 0]


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="does not fit in 3 bits"):
        pack(torch.tensor([8], dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match=r"allowed are integers 1\.\.8"):
        pack(torch.tensor([1], dtype=torch.uint8), 9)
    with pytest.raises(TypeError, match="uint8"):
        pack(torch.tensor([1], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="need 2 bytes"):
        unpack(torch.zeros(3, dtype=torch.uint8), 4, 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_cuda_matches_cpu(bits: int, gen: torch.Generator) -> None:
    codes = torch.randint(0, 2**bits, (1001,), generator=gen).to(torch.uint8)
    packed = pack(codes.cuda(), bits)
    assert torch.equal(packed.cpu(), pack(codes, bits))
    assert torch.equal(unpack(packed, bits, 1001).cpu(), codes)
