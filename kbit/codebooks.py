"""Codebooks: the finite value sets a k-bit data type can represent.

A codebook is a 1-D float32 tensor, sorted ascending, without duplicates, with max |v| == 1.
Blockwise quantization divides a block by its scale and stores, for each value, the index of
the nearest codebook entry, so everything a data type *is* lives here. Definitions follow
PAPER.md exactly:

``int``
    ``linspace(-1, 1, 2^k - 1)``: symmetric, no zero point (one of the 2^k codes is unused).
``float``
    sign + E exponent + M = k-1-E mantissa bits, bias 2^(E-1)-1, subnormals when the exponent
    field is 0, every exponent field finite (no inf/NaN), normalised by the largest value.
    +0 and -0 collapse to one entry, so a float codebook has 2^k - 1 values.
``dynamic``
    bitsandbytes' dynamic exponent type ``create_dynamic_map(signed=True,
    max_exponent_bits=k-1, total_bits=k)``, rebuilt here with the same float32/float64
    arithmetic. bitsandbytes pads its map to 256 entries with zeros and sorts it, so its map
    has 256 - 2^k + 1 zeros; the codebook here is the sorted *unique* values (2^k of them,
    asymmetric: +1 exists, -1 does not).
``nf``
    NormalFloat: quantiles of N(0, 1) built like bitsandbytes ``create_normal_map(offset=
    0.9677083, use_extra_value=True)``: 2^(k-1) positive and 2^(k-1)-1 negative levels plus 0,
    normalised by the max. NF4 equals bitsandbytes' table in float32; other k use the same
    construction and offset.
``quantile``
    Per-tensor empirical quantiles (see :func:`quantile_codebook`).
``mxfp`` / ``mxint`` / ``nvfp``
    The OCP Microscaling v1.0 element grids (and NVFP4's E2M1), normalised by their max. The
    quantizer works on the *raw* grids (see :func:`element_grid`), because microscaling scales
    are powers of two (or E4M3 values) chosen from the raw element maximum. MXINT generalises
    OCP's MXINT8 (8-bit two's complement, implicit scale 2^-6, used symmetrically without -2)
    to k bits: ``i / 2^(k-2)`` for ``|i| <= 2^(k-1) - 1`` (MXINT4: -1.75 .. 1.75 in steps of
    0.25), emax 0.
"""

from __future__ import annotations

import math
from functools import cache
from typing import NamedTuple

import torch

from kbit.spec import QuantSpec, SpecError

#: SRAM-Quantiles chunk length (values sorted together), as in the paper's estimator
SRAM_CHUNK = 4096
#: bitsandbytes' NF4 outermost quantile; used for every k of the ``nf`` type
NF_OFFSET = 0.9677083


class ElementGrid(NamedTuple):
    """The raw element values of a microscaling format, before any scale is applied.

    ``even[i]`` says whether entry i has an even last mantissa (or integer) bit: OCP MX
    conversions round to nearest with ties to even, and this is what breaks a tie.
    ``emax`` is the exponent of the largest power of two not above ``max`` (the OCP
    ``emax_elem`` used to choose the shared scale).
    """

    values: torch.Tensor
    even: torch.Tensor
    max: float
    emax: int


# ------------------------------------------------------------------------- float formats
def float_magnitudes(
    exponent_bits: int, mantissa_bits: int, *, bias: int | None = None, special: str = "none"
) -> list[tuple[float, bool]]:
    """Non-negative values of a sign/exponent/mantissa format, with the mantissa LSB parity.

    ``special`` says which bit patterns are not numbers: ``"none"`` (all finite: the paper's
    float type, OCP E2M1/E2M3/E3M2), ``"e4m3"`` (only S.1111.111 is NaN: OCP E4M3) or
    ``"ieee"`` (exponent field all ones is inf/NaN: OCP E5M2).
    """
    if special not in ("none", "e4m3", "ieee"):
        raise ValueError(f"special={special!r}: allowed are 'none', 'e4m3', 'ieee'")
    if bias is None:
        bias = 2 ** (exponent_bits - 1) - 1
    out: list[tuple[float, bool]] = []
    top_field = 2**exponent_bits - 1
    for e in range(2**exponent_bits):
        if special == "ieee" and e == top_field:
            continue
        for m in range(2**mantissa_bits):
            if special == "e4m3" and e == top_field and m == 2**mantissa_bits - 1:
                continue
            frac = m / 2**mantissa_bits
            value = frac * 2.0 ** (1 - bias) if e == 0 else (1.0 + frac) * 2.0 ** (e - bias)
            out.append((value, m % 2 == 0))
    return out


def _signed_sorted(mags: list[tuple[float, bool]]) -> tuple[list[float], list[bool]]:
    """Mirror non-negative values to both signs, sort, and drop the duplicate zero."""
    table: dict[float, bool] = {}
    for v, even in mags:
        table[v] = even
        table[-v] = even
    keys = sorted(table)
    return keys, [table[k] for k in keys]


def _normalised(values: list[float]) -> torch.Tensor:
    """float64 division by the max magnitude, then one rounding to float32."""
    t = torch.tensor(values, dtype=torch.float64)
    return (t / t.abs().max()).to(torch.float32)


# ------------------------------------------------------------------------- fixed types
def _int_codebook(bits: int) -> torch.Tensor:
    # (2i - m) / m exactly symmetric with an exact 0 (torch.linspace is not, in float64)
    m = 2**bits - 2
    steps = torch.arange(0, m + 1, dtype=torch.float64) * 2 - m
    return (steps / m).to(torch.float32)


def _float_codebook(bits: int, exponent_bits: int) -> torch.Tensor:
    values, _ = _signed_sorted(float_magnitudes(exponent_bits, bits - 1 - exponent_bits))
    return _normalised(values)


def _dynamic_codebook(bits: int) -> torch.Tensor:
    # Same arithmetic as bitsandbytes create_dynamic_map(signed=True, max_exponent_bits=k-1,
    # total_bits=k): float32 linspace, means and products (python scalar * float32 tensor).
    # With max_exponent_bits = k-1 there are no "additional items" (2^0 - 1 = 0).
    max_exp = bits - 1
    data: list[float] = [0.0, 1.0]
    for i in range(max_exp):
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-(max_exp - 1) + i)
        data += (scale * means).tolist()
        data += (-scale * means).tolist()
    return torch.tensor(sorted(set(data)), dtype=torch.float32).unique()


def _nf_codebook(bits: int) -> torch.Tensor:
    # Same arithmetic as bitsandbytes create_normal_map(offset, use_extra_value=True).
    from scipy.stats import norm

    half = 2 ** (bits - 1)
    pos = norm.ppf(torch.linspace(NF_OFFSET, 0.5, half + 1)[:-1].numpy()).tolist()
    neg = (-norm.ppf(torch.linspace(NF_OFFSET, 0.5, half)[:-1].numpy())).tolist()
    values = torch.tensor([*pos, 0.0, *neg], dtype=torch.float32).sort().values
    values /= values.max()
    return values


@cache
def _element_grid_cached(dtype: str, bits: int, exponent_bits: int | None) -> ElementGrid:
    if dtype == "mxint":
        # k-bit two's complement with k-2 fraction bits (OCP MXINT8: 6), used symmetrically:
        # i / 2^(k-2) for i in -(2^(k-1) - 1) .. 2^(k-1) - 1, so the largest power of two not
        # above the maximum (< 2) is 2^0 and emax is 0 for every width
        top = 2 ** (bits - 1) - 1
        ks = torch.arange(-top, top + 1, dtype=torch.float64)
        values = (ks / 2 ** (bits - 2)).to(torch.float32)
        even = (ks.to(torch.int64) % 2) == 0
        return ElementGrid(values, even, top / 2 ** (bits - 2), 0)
    e = int(exponent_bits)  # validated by QuantSpec
    m = bits - 1 - e
    special = {(4, 3): "e4m3", (5, 2): "ieee"}.get((e, m), "none")
    vals, even = _signed_sorted(float_magnitudes(e, m, special=special))
    mx = max(vals)
    return ElementGrid(
        torch.tensor(vals, dtype=torch.float32),
        torch.tensor(even, dtype=torch.bool),
        float(mx),
        math.floor(math.log2(mx)),
    )


def element_grid(spec: QuantSpec) -> ElementGrid:
    """Raw element grid of a microscaling spec (mxfp, mxint, nvfp): values in native units.

    E2M1 max 6, E2M3 7.5, E3M2 28, E4M3 448 (S.1111.111 is NaN), E5M2 57344 (inf/NaN
    excluded), MXINT8 127/64, MXINT4 7/4 (MXINTk: (2^(k-1) - 1) / 2^(k-2)).
    """
    if spec.dtype not in ("mxfp", "mxint", "nvfp"):
        raise SpecError(f"element_grid is for mxfp, mxint and nvfp specs, not {spec.dtype!r}")
    g = _element_grid_cached(spec.dtype, spec.bits, spec.exponent_bits)
    return ElementGrid(g.values.clone(), g.even.clone(), g.max, g.emax)


@cache
def _fixed_codebook(dtype: str, bits: int, exponent_bits: int | None) -> torch.Tensor:
    if dtype == "int":
        return _int_codebook(bits)
    if dtype == "float":
        return _float_codebook(bits, int(exponent_bits))  # type: ignore[arg-type]
    if dtype == "dynamic":
        return _dynamic_codebook(bits)
    if dtype == "nf":
        return _nf_codebook(bits)
    grid = _element_grid_cached(dtype, bits, exponent_bits)
    return (grid.values.double() / grid.max).to(torch.float32)


# ------------------------------------------------------------------------- quantile type
def quantile_positions(bits: int) -> torch.Tensor:
    """Probabilities of the 2^k - 1 quantiles: the centres of 2^k - 1 equal-mass bins.

    ``linspace(offset, 1 - offset, 2^k - 1)`` with ``offset = 1 / (2 (2^k - 1))``: exactly the
    positions the paper's SRAM-Quantiles estimator evaluates (it trims ``offset`` at each end).
    Eq. 6 as printed (adjacent quantiles at i / (2^k + 1), averaged) describes the same idea,
    a representative in the middle of each equal-mass bin, but its index range is not
    symmetric; the positions the paper's estimator actually used are the definition here, so
    the ``exact`` and ``sram`` estimators estimate the same quantity.
    """
    n = 2**bits - 1
    offset = 1.0 / (2 * n)
    return torch.linspace(offset, 1.0 - offset, n, dtype=torch.float64)


def _interpolated(sorted_rows: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """numpy's default ('linear') quantile of each sorted row at ``probs`` (float64)."""
    length = sorted_rows.shape[-1]
    h = probs.to(sorted_rows.device) * (length - 1)
    lo = h.floor().long().clamp(0, length - 1)
    hi = h.ceil().long().clamp(0, length - 1)
    frac = h - lo.to(torch.float64)
    a = sorted_rows[..., lo].double()
    b = sorted_rows[..., hi].double()
    return a + (b - a) * frac


def estimate_quantiles(data: torch.Tensor, bits: int, estimator: str = "sram") -> torch.Tensor:
    """The 2^k - 1 quantiles of ``data`` at :func:`quantile_positions`, float64.

    ``exact``: sort everything once (no torch.quantile, whose input is limited to 16M values)
    and interpolate linearly between order statistics, like numpy's default.
    ``sram``: SRAM-Quantiles: sort chunks of 4096 values independently, take the same
    quantiles in each chunk and average them over chunks (a trailing partial chunk is
    weighted by its length). Cheap on a GPU and what the paper used.
    """
    x = data.detach().reshape(-1).to(torch.float32)
    if x.numel() == 0:
        raise ValueError("quantile codebook needs a non-empty data tensor")
    if not torch.isfinite(x).all():
        raise ValueError("quantile codebook data contains NaN or inf")
    probs = quantile_positions(bits)
    if estimator == "exact":
        return _interpolated(x.sort().values, probs).cpu()
    if estimator != "sram":
        raise SpecError(f"quantile estimator {estimator!r}: allowed are 'sram', 'exact'")
    n = x.numel()
    if n <= SRAM_CHUNK:  # a single chunk: its quantiles are the estimate
        return _interpolated(x.sort().values, probs).cpu()
    full = n // SRAM_CHUNK
    parts: list[torch.Tensor] = []
    weights: list[float] = []
    if full:
        rows = x[: full * SRAM_CHUNK].view(full, SRAM_CHUNK).sort(dim=1).values
        parts.append(_interpolated(rows, probs).sum(dim=0))
        weights.append(float(full * SRAM_CHUNK))
    rem = n - full * SRAM_CHUNK
    if rem:
        tail = x[full * SRAM_CHUNK :].sort().values
        parts.append(_interpolated(tail, probs) * (rem / SRAM_CHUNK))
        weights.append(float(rem))
    # full chunks count with weight 1 each, the tail with rem / 4096
    total_chunks = sum(weights) / SRAM_CHUNK
    return (torch.stack(parts).sum(dim=0) / total_chunks).cpu()


def quantile_codebook(data: torch.Tensor, bits: int, estimator: str = "sram") -> torch.Tensor:
    """Per-tensor quantile codebook: 2^k - 1 quantiles plus an added 0, / max |q|.

    Duplicates (data with ties, e.g. already-quantized weights) collapse, so the result can
    have fewer than 2^k entries; it always has max |v| == 1 unless all quantiles are 0, which
    is an error (the data carries no spread to quantize).
    """
    if not 2 <= bits <= 8:
        raise SpecError(f"bits={bits!r} for dtype 'quantile': allowed are integers 2..8")
    q = estimate_quantiles(data, bits, estimator)
    q = torch.cat([q, torch.zeros(1, dtype=q.dtype)])
    top = q.abs().max()
    if top == 0:
        raise ValueError("quantile codebook: every quantile of the data is 0")
    return (q / top).to(torch.float32).unique()


# ------------------------------------------------------------------------- entry point
def codebook(
    dtype: str,
    bits: int,
    exponent_bits: int | None = None,
    *,
    data: torch.Tensor | None = None,
    estimator: str = "sram",
) -> torch.Tensor:
    """The normalised codebook of a data type: float32, sorted, unique, max |v| == 1.

    ``exponent_bits`` defaults to the spec's default (paper: E=2 at 3 bits, E=3 at 4..8 bits;
    mxfp4 E2M1, mxfp6 E2M3, mxfp8 E4M3). ``data`` is required for (and only allowed with)
    ``dtype="quantile"``; ``estimator`` is ``"sram"`` or ``"exact"``.
    """
    if dtype == "fp16":
        raise SpecError("fp16 is the unquantized baseline and has no codebook")
    spec = QuantSpec(
        dtype=dtype,
        bits=bits,
        exponent_bits=exponent_bits,
        quantile_estimator=estimator if dtype == "quantile" else "sram",
    )
    if dtype == "quantile":
        if data is None:
            raise SpecError("dtype 'quantile' needs data=<tensor> to estimate its quantiles")
        return quantile_codebook(data, bits, estimator)
    if data is not None:
        raise SpecError(f"data= is only used by dtype 'quantile', not {dtype!r}")
    return _fixed_codebook(spec.dtype, spec.bits, spec.exponent_bits).clone()


def codebook_for(spec: QuantSpec, data: torch.Tensor | None = None) -> torch.Tensor:
    """The normalised codebook of ``spec`` (quantile specs estimate it from ``data``)."""
    if spec.dtype == "quantile":
        return codebook("quantile", spec.bits, data=data, estimator=spec.quantile_estimator)
    return codebook(spec.dtype, spec.bits, spec.exponent_bits)
