"""Blockwise quantization against bitsandbytes on CPU (fp32 block constants on our side).

bitsandbytes normalises with ``x * (1 / absmax)`` where kbit divides, so a value within a
few ulps of a midpoint may legitimately land on the other side: those near-ties are counted
and must be a tiny fraction. Its 4-bit path on CPU is plain torch (bucketize on midpoints,
like ours), so everything else must agree exactly. Its native 8-bit CPU kernel
(``quantize_blockwise``) finds the nearest code with an approximate binary search; there
the test bounds how far from a midpoint a disagreement can be.
"""

from __future__ import annotations

import pytest
import torch

from kbit.blockwise import quantize
from kbit.codebooks import codebook

F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is a test dependency")

BLOCKS = [64, 128, 256, 512, 1024, 2048, 4096]
N = (1 << 15) + 77  # a partial last block for every block size


@pytest.fixture(autouse=True)
def _eager_bitsandbytes():
    """bitsandbytes torch.compiles its CPU dequantizers per shape; eager gives the same
    values here without seconds of compilation per call."""
    torch.compiler.set_stance("force_eager")
    yield
    torch.compiler.set_stance("default")


def _data(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, generator=g) * 0.02
    x[::997] *= 10  # outliers, so blocks have varied absmax
    return x.to(dtype)


def _normalised(x: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    s = scales.float().repeat_interleave(block)[: x.numel()]
    return x.float() / s


def _near_tie(xn: torch.Tensor, cb: torch.Tensor, ulps: float) -> torch.Tensor:
    mids = (cb[:-1] + cb[1:]) / 2
    dist = (xn[:, None] - mids[None, :]).abs().min(dim=1)
    tol = ulps * torch.finfo(torch.float32).eps * torch.maximum(xn.abs(), mids[dist.indices].abs())
    return dist.values <= tol


def _unpack_bnb_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    p = packed.reshape(-1)
    out = torch.empty(p.numel() * 2, dtype=torch.long)
    out[0::2] = (p >> 4).long()  # bitsandbytes stores the first code in the high nibble
    out[1::2] = (p & 0xF).long()
    return out[:n]


@pytest.mark.parametrize(
    ("block", "dtype"),
    [(b, torch.float32) for b in BLOCKS] + [(b, torch.float16) for b in (64, 1024)],
)
def test_nf4_matches_quantize_4bit(block: int, dtype: torch.dtype) -> None:
    x = _data(dtype, seed=block)
    packed, state = F.quantize_4bit(x, blocksize=block, quant_type="nf4")
    bnb_codes = _unpack_bnb_4bit(packed, N)
    q = quantize(x, f"nf4-b{block}-sfp32")
    assert torch.equal(state.absmax, q.scales), "absmax per block, fp32"
    ours = q.unpacked_codes().long()
    differ = ours != bnb_codes
    tie = _near_tie(_normalised(x, q.scales, block), q.codebook, ulps=4)
    assert bool(tie[differ].all()), "codes differ only within a few ulps of a midpoint"
    assert differ.sum().item() <= max(2, N // 10_000)
    bnb_y = F.dequantize_4bit(packed, state)
    assert torch.equal(q.dequantize()[~differ], bnb_y[~differ])


SPECS_8BIT_KERNEL = [
    ("int", 3, None),
    ("int", 8, None),
    ("float", 4, 3),
    ("float", 5, 3),
    ("float", 8, 4),
    ("nf", 4, None),
    ("dynamic", 4, None),
    ("dynamic", 8, None),
]
_LIVE_MAPS: dict[bytes, torch.Tensor] = {}


def _bnb_map(cb: torch.Tensor) -> torch.Tensor:
    """The sorted 256-entry map bitsandbytes wants (top value repeated as padding).

    Each map stays alive for the whole session: bitsandbytes' native CPU kernel reuses its
    search structure for a map at the same memory address, so a freed map whose address is
    reused by a different one would be searched with the stale structure (observed with
    bitsandbytes 0.50.2: codes of the previous codebook came back).
    """
    key = cb.numpy().tobytes()
    if key not in _LIVE_MAPS:
        _LIVE_MAPS[key] = torch.cat([cb, cb[-1:].expand(256 - cb.numel())]).contiguous()
    return _LIVE_MAPS[key]


#: absolute resolution of bitsandbytes' native CPU code search (measured: below 2^-16)
BNB_SEARCH_RESOLUTION = 2**-15


@pytest.mark.parametrize("block", [64, 256, 4096])
@pytest.mark.parametrize(("dtype", "bits", "e"), SPECS_8BIT_KERNEL)
def test_blockwise_matches_quantize_blockwise(block: int, dtype: str, bits: int, e) -> None:
    x = _data(torch.float32, seed=bits)
    cb = codebook(dtype, bits, e)
    bnb_codes, state = F.quantize_blockwise(x, code=_bnb_map(cb), blocksize=block)
    spec = f"{dtype}{bits}{f'-e{e}' if e else ''}-b{block}-sfp32"
    q = quantize(x, spec)
    assert torch.equal(state.absmax, q.scales)
    ours = q.unpacked_codes().long()
    theirs = bnb_codes.long().clamp(max=cb.numel() - 1)  # padding decodes to the top value
    differ = ours != theirs
    # bitsandbytes' pick is never worse than the nearest value by more than its resolution,
    # and disagreements are rare (ours is the exact nearest: see test_quantize.py)
    xn = _normalised(x, q.scales, block)
    worse = (xn - cb[theirs]).abs() - (xn - cb[ours]).abs()
    assert worse.min().item() >= 0, "kbit's code is never farther than bitsandbytes'"
    assert worse.max().item() <= BNB_SEARCH_RESOLUTION
    assert differ.float().mean().item() < 0.02
    bnb_y = F.dequantize_blockwise(bnb_codes, state)
    assert torch.equal(q.dequantize()[~differ], bnb_y[~differ])
