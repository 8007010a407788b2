"""Codebooks whose codes the kernels compute in registers, and the constants they need.

Three families have arithmetic structure (everything here is host-side numpy/torch):

``IntCode``
    ``cb[i] = RN32((2i - m) / m)``, ``i = 0..m`` (the ``int`` type has ``m = 2^k - 2``).
    The kernel rounds ``xn * m + m`` to an integer ``N`` (a magic-number FMA), takes
    ``j = N >> 1``, so that the answer is ``j`` or ``j + 1``, computes both entries exactly
    as ``(2j - m) / m`` and ``(2j + 2 - m) / m`` and compares ``xn`` with their float32
    midpoint: the reference's comparison, ties to the lower code.
``FloatCode``
    The normalised float grid of the ``float`` type (E exponent bits, M mantissa bits, all
    patterns finite): ``cb = RN32(v / vmax)`` for the raw values ``v``. The kernel scales
    ``xn`` by ``vmax``, rounds it onto the raw grid with one add and one subtract of a power of
    two whose exponent comes from the value's exponent bits (ties to even, subnormals
    included), takes the raw neighbour on the other side of ``xn``, divides both by ``vmax``
    and compares with their midpoint.
``ElementCode``
    A microscaling element grid (OCP MX E2M1/E2M3/E3M2/E4M3/E5M2, MXINT8, NVFP4's E2M1):
    ``xn`` is already in the grid's units and the answer is the grid's round-to-nearest-even,
    with saturation at the largest finite element: the same add/subtract of a power of two,
    no comparison needed.

Divisions by ``m`` or ``vmax`` use ``fma(v, hi, v * lo)`` with ``hi + lo`` the split
reciprocal (``exact.split_reciprocal``); :func:`detect` checks it on every grid value and
rejects a codebook for which any entry would differ (none of the standard types does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from kbit.kernels import exact

_F32 = np.float32


@dataclass(frozen=True)
class IntCode:
    """``cb[i] = RN32((2i - m) / m)``: ``m`` steps between -1 and 1."""

    m: int
    rhi: float
    rlo: float

    @property
    def entries(self) -> int:
        return self.m + 1


@dataclass(frozen=True)
class FloatCode:
    """Normalised float grid: raw values of E/M bits over ``vmax``; ``emin = 1 - bias``."""

    exponent_bits: int
    mantissa_bits: int
    vmax: float
    vmax2: float  # the second largest raw value
    emin: int
    rhi: float
    rlo: float
    entries: int

    @property
    def emin_bits(self) -> int:
        """float32 bit pattern of ``2^emin`` with the mantissa cleared (its exponent field)."""
        return (self.emin + 127) << 23


@dataclass(frozen=True)
class ElementCode:
    """A raw microscaling element grid, rounded to nearest even, saturating at ``vmax``.

    ``zero`` is the code of 0 (the number of negative entries); codes are positions in the
    sorted grid. MXINT-k (multiples of 2^-(k-2) below 2) is the grid with ``emin = 1`` and
    ``k - 1`` mantissa bits: below 2^emin the grid is uniform with that spacing.
    """

    mantissa_bits: int
    emin: int
    vmax: float
    zero: int
    emax: int

    @property
    def emin_bits(self) -> int:
        return (self.emin + 127) << 23

    @property
    def entries(self) -> int:
        return 2 * self.zero + 1


def _split_checked(v: np.ndarray, d, want: np.ndarray) -> tuple[float | None, float]:
    """The reciprocal split for ``RN(v / d)``: ``(hi, 0.0)`` if one product ``RN(v hi)`` is
    already exact on every value, else ``(hi, lo)`` if the FMA form is; ``(None, 0)`` if
    neither reproduces ``want`` bit for bit."""
    hi, lo = exact.split_reciprocal(d)
    for cand in (0.0, lo):
        if np.array_equal(exact.divide_by_split(v, hi, cand).view(np.int32), want.view(np.int32)):
            return hi, cand
    return None, 0.0


def _int_code(cb: np.ndarray) -> IntCode | None:
    m = cb.size - 1
    if m < 1 or m > 255:
        return None
    a = np.array([2 * i - m for i in range(m + 1)], dtype=_F32)
    if not np.array_equal((a.astype(np.float64) / m).astype(_F32), cb):  # cheap filter first
        return None
    want = exact.exact_quotients(a, m)
    if not np.array_equal(want.view(np.int32), cb.view(np.int32)):
        return None
    hi, lo = _split_checked(a, m, cb)
    if hi is None:
        return None
    return IntCode(m, hi, lo)


def float_raw_grid(exponent_bits: int, mantissa_bits: int) -> np.ndarray:
    """Sorted signed raw values of the all-finite float format (one zero), float32."""
    from kbit.codebooks import float_magnitudes

    mags = sorted({v for v, _ in float_magnitudes(exponent_bits, mantissa_bits)})
    vals = [-v for v in reversed(mags) if v > 0] + mags
    return np.array(vals, dtype=_F32)


def _float_code(cb: np.ndarray) -> FloatCode | None:
    k = math.log2(cb.size + 1)
    if k != int(k) or not 2 <= k <= 8:
        return None
    k = int(k)
    for e in range(1, k):
        m = k - 1 - e
        raw = float_raw_grid(e, m)
        approx = (raw.astype(np.float64) / float(raw[-1])).astype(_F32)
        if not np.array_equal(approx, cb):  # cheap filter; the exact check follows
            continue
        vmax = Fraction(float(raw[-1]))
        want = exact.exact_quotients(raw, vmax)
        if not np.array_equal(want.view(np.int32), cb.view(np.int32)):
            continue
        hi, lo = exact.split_reciprocal(vmax)
        if not np.array_equal(
            exact.divide_by_split(raw, hi, lo).view(np.int32), want.view(np.int32)
        ):
            return None
        bias = 2 ** (e - 1) - 1
        return FloatCode(e, m, float(raw[-1]), float(raw[-2]), 1 - bias, hi, lo, cb.size)
    return None


_cache: dict[bytes, IntCode | FloatCode | None] = {}


def detect(codebook: torch.Tensor) -> IntCode | FloatCode | None:
    """The arithmetic family of a sorted float32 codebook, or None (use a table search).

    A codebook qualifies only if every entry equals the family's formula bit for bit and the
    kernel's division reproduces every entry; the result is cached per codebook value.
    """
    cb = codebook.detach().to("cpu", torch.float32).contiguous().numpy()
    key = cb.tobytes()
    if key not in _cache:
        if len(_cache) > 256:
            _cache.clear()
        _cache[key] = _int_code(cb) or _float_code(cb)
    return _cache[key]


def pow2_magnitudes(codebook: torch.Tensor) -> int | None:
    """N if a sorted float32 codebook is exactly {0, +-2^(1-N), ..., +-2^-1, +-1} (a float
    grid without mantissa bits, normalised), else None: its codes follow from an input's
    exponent and first mantissa bit (``triton_kernels._pow2_rank``)."""
    cb = codebook.detach().to("cpu", torch.float32).contiguous().numpy()
    n = (cb.size - 1) // 2
    if cb.size % 2 == 0 or not 1 <= n <= 126:
        return None
    mags = np.ldexp(np.float32(1), np.arange(1 - n, 1)).astype(np.float32)
    want = np.concatenate([-mags[::-1], np.zeros(1, np.float32), mags])
    return n if np.array_equal(cb.view(np.int32), want.view(np.int32)) else None


def element_code(dtype: str, bits: int, exponent_bits: int | None) -> ElementCode:
    """The element grid of a microscaling spec (``mxfp``, ``mxint``, ``nvfp``)."""
    from kbit.codebooks import element_grid
    from kbit.spec import QuantSpec

    spec = QuantSpec(dtype=dtype, bits=bits, exponent_bits=exponent_bits)
    g = element_grid(spec)
    zero = (g.values.numel() - 1) // 2
    if dtype == "mxint":
        return ElementCode(bits - 1, 1, float(g.max), zero, g.emax)
    m = bits - 1 - int(spec.exponent_bits)
    bias = 2 ** (int(spec.exponent_bits) - 1) - 1
    return ElementCode(m, 1 - bias, float(g.max), zero, g.emax)


#: E4M3 (the NVFP4 block scale): 3 mantissa bits, emin -6, largest finite 448
E4M3 = ElementCode(3, -6, 448.0, 126, 8)


def round_elements(u: np.ndarray, fmt: ElementCode) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's element rounding of non-negative float32 ``u`` in numpy: (value, rank).

    ``u`` is clamped to ``vmax``; ``c = 2^(max(e_u, emin) + 23 - M)`` has the grid's spacing
    as its unit in the last place, so ``RN(u + c) - c`` is ``u`` rounded to the grid with
    ties to even. The rank (magnitude code) is read from the same sum's bits.
    """
    u = np.minimum(np.asarray(u, _F32), _F32(fmt.vmax)).astype(_F32)
    ec = np.maximum(u.view(np.int32) & 0x7F800000, fmt.emin_bits)
    cbits = (ec + ((23 - fmt.mantissa_bits) << 23)).astype(np.int32)
    c = cbits.view(_F32)
    s = (u + c).astype(_F32)
    t = (s - c).astype(_F32)
    rank = ((ec - fmt.emin_bits) >> (23 - fmt.mantissa_bits)) + (s.view(np.int32) - cbits)
    return t, rank
