"""Codebooks against their definitions (PAPER.md), independent re-derivations and bitsandbytes."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from kbit.codebooks import (
    codebook,
    element_grid,
    estimate_quantiles,
    quantile_codebook,
    quantile_positions,
)
from kbit.spec import QuantSpec, SpecError, default_exponent_bits

F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is a test dependency")

FIXED = [("int", k, None) for k in range(2, 9)]
FIXED += [("float", k, e) for k in range(2, 9) for e in range(1, k)]
FIXED += [("dynamic", k, None) for k in range(2, 9)]
FIXED += [("nf", k, None) for k in range(2, 9)]
FIXED += [("mxfp", 4, 2), ("mxfp", 6, 2), ("mxfp", 6, 3), ("mxfp", 8, 4), ("mxfp", 8, 5)]
FIXED += [("mxint", 8, None), ("nvfp", 4, 2)]


@pytest.mark.parametrize(("dtype", "bits", "e"), FIXED)
def test_codebook_invariants(dtype: str, bits: int, e: int | None) -> None:
    cb = codebook(dtype, bits, e)
    assert cb.dtype == torch.float32 and cb.ndim == 1
    assert bool((cb[1:] > cb[:-1]).all()), "sorted ascending and unique"
    assert cb.abs().max().item() == 1.0
    assert cb.numel() <= 2**bits
    assert (cb == 0).sum() == 1, "every type here represents 0 exactly"


@pytest.mark.parametrize("bits", range(2, 9))
def test_int_is_symmetric_linspace(bits: int) -> None:
    m = 2**bits - 2
    expected = torch.tensor([float(Fraction(2 * i - m, m)) for i in range(m + 1)])
    assert torch.equal(codebook("int", bits), expected.to(torch.float32))
    assert torch.equal(codebook("int", bits), -codebook("int", bits).flip(0))


def _paper_float(bits: int, e_bits: int) -> torch.Tensor:
    """The paper's float type by enumerating every bit pattern, in exact rational arithmetic."""
    m_bits = bits - 1 - e_bits
    bias = 2 ** (e_bits - 1) - 1
    values = set()
    for sign in (1, -1):
        for e in range(2**e_bits):
            for m in range(2**m_bits):
                mant = Fraction(m, 2**m_bits)
                if e == 0:
                    v = mant * Fraction(2) ** (1 - bias)
                else:
                    v = (1 + mant) * Fraction(2) ** (e - bias)
                values.add(sign * v)
    top = max(values)
    return torch.tensor([float(v / top) for v in sorted(values)], dtype=torch.float32)


@pytest.mark.parametrize(("bits", "e"), [(k, e) for k in range(2, 9) for e in range(1, k)])
def test_float_matches_bit_pattern_enumeration(bits: int, e: int) -> None:
    assert torch.equal(codebook("float", bits, e), _paper_float(bits, e))


def test_float_default_exponent_bits_follow_the_paper() -> None:
    for bits in range(2, 9):
        assert torch.equal(
            codebook("float", bits), codebook("float", bits, default_exponent_bits(bits))
        )
    assert default_exponent_bits(3) == 2 and default_exponent_bits(4) == 3


def test_e2m1_is_the_ocp_fp4_grid() -> None:
    pos = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    grid = sorted({s * v / 6 for v in pos for s in (1, -1)})
    assert torch.equal(codebook("float", 4, 2), torch.tensor(grid, dtype=torch.float32))
    assert torch.equal(codebook("nvfp", 4), codebook("mxfp", 4))
    assert torch.equal(codebook("mxfp", 4), codebook("float", 4, 2))


def test_bitsandbytes_fp4_uses_a_different_bias() -> None:
    """bitsandbytes >= 0.40 biases E2M1 by 2^(E-1): same normals, subnormal 4x smaller."""
    bnb = F.create_fp8_map(signed=True, exponent_bits=2, precision_bits=1, total_bits=4).unique()
    ours = codebook("float", 4, 2)
    assert bnb.numel() == ours.numel() == 15
    differs = bnb != ours
    assert differs.sum() == 2, "only the +-subnormal differs"
    assert torch.allclose(ours[differs], 4 * bnb[differs])
    assert torch.equal(ours[differs].abs(), torch.full((2,), 1 / 12, dtype=torch.float32))


def test_nf4_equals_bitsandbytes_table() -> None:
    ref = F.create_normal_map(offset=0.9677083, use_extra_value=True)
    ref = ref.unique()  # 256 entries, 241 of them padding zeros
    assert torch.equal(codebook("nf", 4), ref)
    paper = [-1, -0.69619, -0.52507, -0.39492, -0.28444, -0.18477, -0.09105, 0]
    paper += [0.07958, 0.16093, 0.24611, 0.33792, 0.44071, 0.56262, 0.72296, 1]
    assert torch.allclose(codebook("nf", 4), torch.tensor(paper), atol=1e-5)


@pytest.mark.parametrize("bits", range(2, 9))
def test_nf_has_one_more_positive_level(bits: int) -> None:
    cb = codebook("nf", bits)
    assert cb.numel() == 2**bits
    assert (cb > 0).sum() == 2 ** (bits - 1) and (cb < 0).sum() == 2 ** (bits - 1) - 1
    # both ends are the offset quantile; the asymmetry is in the number of levels
    assert cb[0].item() == -1.0 and cb[-1].item() == 1.0


@pytest.mark.parametrize("bits", range(2, 9))
def test_dynamic_equals_bitsandbytes(bits: int) -> None:
    ref = F.create_dynamic_map(signed=True, max_exponent_bits=bits - 1, total_bits=bits)
    # bitsandbytes pads to 256 entries with zeros; the codebook is the unique values
    assert ref.numel() == 256 and int((ref == 0).sum()) == 256 - 2**bits + 1
    assert torch.equal(codebook("dynamic", bits), ref.unique())
    assert codebook("dynamic", bits).numel() == 2**bits


@pytest.mark.parametrize(
    ("alias", "maximum", "count"),
    [
        ("mxfp4", 6.0, 15),
        ("mxfp6", 7.5, 63),
        ("mxfp6-e3-b32", 28.0, 63),
        ("mxfp8", 448.0, 253),  # S.1111.111 is NaN
        ("mxfp8-e5-b32", 57344.0, 247),  # exponent 31 is inf/NaN
        ("mxint8", 127 / 64, 255),
        ("nvfp4", 6.0, 15),
    ],
)
def test_microscaling_element_grids(alias: str, maximum: float, count: int) -> None:
    g = element_grid(QuantSpec.parse(alias))
    assert g.max == maximum and g.values.max().item() == maximum
    assert g.values.numel() == count
    assert g.emax == int(np.floor(np.log2(maximum)))
    assert torch.equal(g.values, -g.values.flip(0))
    assert bool(g.even[g.values == 0].all())


def test_mxint8_is_two_complement_with_six_fraction_bits() -> None:
    g = element_grid(QuantSpec.parse("mxint8"))
    assert torch.equal(g.values, torch.arange(-127, 128, dtype=torch.float32) / 64)


# --------------------------------------------------------------------------- quantile
def _numpy_quantile_codebook(x: np.ndarray, bits: int) -> torch.Tensor:
    n = 2**bits - 1
    probs = np.linspace(1 / (2 * n), 1 - 1 / (2 * n), n)
    q = np.append(np.quantile(x.astype(np.float64), probs), 0.0)
    return torch.from_numpy(np.unique((q / np.abs(q).max()).astype(np.float32)))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantile_exact_matches_numpy(bits: int, gen: torch.Generator) -> None:
    x = torch.randn(5000, generator=gen) * 0.02 + 0.001
    ours = codebook("quantile", bits, data=x, estimator="exact")
    assert torch.equal(ours, _numpy_quantile_codebook(x.numpy(), bits))


def test_quantile_positions_trim_half_a_bin() -> None:
    p = quantile_positions(4)
    assert p.numel() == 15
    assert p[0].item() == pytest.approx(1 / 30) and p[-1].item() == pytest.approx(29 / 30)
    assert torch.allclose(p.diff(), torch.full((14,), 1 / 15, dtype=torch.float64))


def test_sram_equals_exact_within_one_chunk(gen: torch.Generator) -> None:
    x = torch.randn(3000, generator=gen)
    assert torch.equal(estimate_quantiles(x, 4, "sram"), estimate_quantiles(x, 4, "exact"))
    chunk = torch.randn(4096, generator=gen)
    tiled = chunk.repeat(5)
    assert torch.allclose(
        estimate_quantiles(tiled, 4, "sram"), estimate_quantiles(chunk, 4, "exact"), atol=1e-7
    )


def test_sram_estimate_is_close_on_a_gaussian(gen: torch.Generator) -> None:
    x = torch.randn(1 << 20, generator=gen)
    sram = codebook("quantile", 4, data=x, estimator="sram")
    exact = codebook("quantile", 4, data=x, estimator="exact")
    assert sram.numel() == exact.numel() == 16
    # the chunk-averaged quantile is biased inward at the tails by O(1/4096)
    assert (sram - exact).abs().max().item() < 5e-3
    assert (sram - exact).abs().max().item() > 0, "the estimators are not the same code path"


def test_exact_quantiles_beyond_torch_quantile_limit() -> None:
    x = torch.linspace(-1.0, 1.0, (1 << 24) + 3)
    q = estimate_quantiles(x, 3, "exact")
    expected = torch.tensor(np.quantile(x.numpy().astype(np.float64), quantile_positions(3)))
    assert torch.allclose(q, expected, atol=1e-7)


def test_quantile_codebook_collapses_duplicates() -> None:
    x = torch.tensor([-1.0, 0.0, 1.0]).repeat(2000)
    cb = quantile_codebook(x, 4, "exact")
    assert cb.tolist() == [-1.0, 0.0, 1.0]


def test_codebook_errors_name_the_problem() -> None:
    with pytest.raises(SpecError, match="needs data"):
        codebook("quantile", 4)
    with pytest.raises(SpecError, match="only used by dtype 'quantile'"):
        codebook("int", 4, data=torch.ones(10))
    with pytest.raises(SpecError, match="baseline"):
        codebook("fp16", 16)
    with pytest.raises(SpecError, match=r"allowed are integers 2\.\.8"):
        codebook("int", 9)
    with pytest.raises(SpecError, match="exponent_bits"):
        codebook("float", 4, 4)
    with pytest.raises(ValueError, match="NaN or inf"):
        codebook("quantile", 4, data=torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="every quantile"):
        quantile_codebook(torch.zeros(100), 4)
