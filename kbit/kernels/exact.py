"""Exact float32 arithmetic on the host: the proofs behind the kernels' shortcuts.

The kernels replace two correctly rounded operations by cheaper sequences, and every
replacement is used only where this module has shown it to give the same float32 bits:

* a block's division ``x / s`` by the reciprocal of ``s`` and one FMA correction
  (:func:`kernel_divide`), on the input/scale dtype pairs listed in
  ``launch.FAST_DIVISION``, each checked on every pair of values by
  :func:`check_fast_division` (``tests/test_kernels.py``, marked slow);
* the division of a grid value by the codebook's normalising constant, ``RN(v / d)``, by one
  multiplication and one FMA with the two halves of ``1 / d`` (:func:`split_reciprocal`),
  checked on every value of the grid when a codebook's constants are derived
  (``arith``).

Everything here is numpy on float64 with error-free transformations (Dekker's product,
Knuth's two-sum), so the emulation is exact: a float32 operation rounds once, to nearest,
ties to even, with subnormals (the kernels never flush them).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

_F32 = np.float32
_F64 = np.float64


def two_sum(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(s, e)`` with ``s = RN64(a + b)`` and ``a + b = s + e`` exactly (Knuth)."""
    s = a + b
    bb = s - a
    e = (a - (s - bb)) + (b - bb)
    return s, e


def round_f32(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """float32 nearest-even rounding of the exact value ``hi + lo`` (float64 arrays) where
    ``hi = RN64(hi + lo)``.

    ``hi`` rounds correctly unless it lies exactly halfway between two float32 values; then
    the sign of ``lo`` (what float64 rounding dropped) decides, not the tie rule.
    """
    hi = np.asarray(hi, _F64)
    lo = np.asarray(lo, _F64)
    with np.errstate(over="ignore"):  # beyond float32's range: inf, as the hardware rounds
        f = hi.astype(_F32)
    fd = f.astype(_F64)
    other = np.nextafter(f, np.where(hi > fd, np.inf, -np.inf).astype(_F32))
    tie = (fd != hi) & (np.abs(hi - fd) == np.abs(other.astype(_F64) - hi)) & (lo != 0)
    if not tie.any():
        return f
    # at a float64 tie point the dropped remainder says which neighbour is nearer
    upper = np.where(fd > hi, f, other)
    lower = np.where(fd > hi, other, f)
    return np.where(tie, np.where(lo > 0, upper, lower), f).astype(_F32)


def rn32(v: np.ndarray) -> np.ndarray:
    """float32 rounding of float64 values that are exact (no remainder)."""
    return np.asarray(v, _F64).astype(_F32)


def fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``RN32(a * b + c)`` for float32 arrays, rounded once (the GPU's ``fma.rn.f32``).

    ``a * b`` of two float32 values is exact in float64 (48 bits); the sum is then split
    exactly into a float64 value and its remainder.
    """
    p = np.asarray(a, _F32).astype(_F64) * np.asarray(b, _F32).astype(_F64)
    s, e = two_sum(p, np.asarray(c, _F32).astype(_F64))
    return round_f32(s, e)


def _split(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c = a * 134217729.0  # 2**27 + 1 (Veltkamp)
    hi = c - (c - a)
    return hi, a - hi


def two_prod(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(p, e)`` with ``p = RN64(a * b)`` and ``a * b = p + e`` exactly (Dekker)."""
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    e = ((ah * bh - p) + ah * bl + al * bh) + al * bl
    return p, e


def div32(x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Correctly rounded float32 quotient ``RN32(x / s)`` of float32 arrays (``s != 0``).

    The float64 quotient is off only where it lands exactly halfway between two float32
    values; the sign of the exact remainder ``x - s * q`` then says which way to round.
    """
    xd = np.asarray(x, _F32).astype(_F64)
    sd = np.asarray(s, _F32).astype(_F64)
    q = xd / sd
    p, pe = two_prod(sd, q)
    rem = (xd - p) - pe  # x - p is exact (Sterbenz); the sign of the rounded result is exact
    lo = np.where(rem == 0, 0.0, np.sign(rem) * np.sign(sd))
    return round_f32(q, lo)


def kernel_divide(x: np.ndarray, s: np.ndarray, r: np.ndarray) -> np.ndarray:
    """The kernels' fast division: ``q = RN(x r)``, ``q' = RN(q + RN(x - s q) r)``.

    ``r = RN(1 / s)`` per block (``div32(1, s)``); ``x`` and ``s`` float32.
    """
    x = np.asarray(x, _F32)
    s = np.asarray(s, _F32)
    r = np.asarray(r, _F32)
    with np.errstate(over="ignore"):
        q = rn32(x.astype(_F64) * r.astype(_F64))
    e = fma32(-s, q, x)
    return fma32(e, r, q)


def _same_bits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Equal float32 bit patterns, counting +0 and -0 as the same (the same code)."""
    return (a.view(np.int32) == b.view(np.int32)) | ((a == 0) & (b == 0))


def finite_values(dtype: str) -> np.ndarray:
    """Every finite value of a 16-bit float type (``"fp16"`` or ``"bf16"``) as float32."""
    bits = np.arange(65536, dtype=np.uint32)
    if dtype == "fp16":
        v = bits.astype(np.uint16).view(np.float16).astype(_F32)
    elif dtype == "bf16":
        v = (bits << 16).view(_F32)
    else:
        raise ValueError(f"dtype {dtype!r}: allowed are 'fp16', 'bf16'")
    return v[np.isfinite(v)]


def scale_ceiling(s: np.ndarray, scale_dtype: str) -> np.ndarray:
    """The largest block absmax that rounds to scale ``s`` (inf for the dtype's maximum):
    values of a block with scale ``s`` lie within ``[-ceiling, ceiling]``."""
    s = np.asarray(s, _F32)
    if scale_dtype == "fp16":
        with np.errstate(over="ignore"):
            up = np.nextafter(s.astype(np.float16), np.float16(np.inf)).astype(_F64)
        top = 65504.0
    else:
        up = ((s.view(np.uint32) + (1 << 16)).astype(np.uint32)).view(_F32).astype(_F64)
        top = float(np.frombuffer(np.uint32(0x7F7F0000).tobytes(), _F32)[0])
    mid = (s.astype(_F64) + up) / 2  # halfway to the next scale value: rounds to even
    even = (
        (s.astype(np.float16).view(np.uint16) & 1) == 0
        if scale_dtype == "fp16"
        else ((s.view(np.uint32) >> 16) & 1) == 0
    )
    ceil = np.where(even, mid, np.nextafter(mid, -np.inf))
    return np.where(s.astype(_F64) >= top, np.inf, ceil)


def is_correctly_rounded(q: np.ndarray, x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Whether float32 ``q`` is ``RN32(x / s)`` (``s > 0``), without dividing.

    ``x / s`` must lie between the midpoints from ``q`` to its two neighbours, and on a
    midpoint only if ``q`` is even. The midpoints have 25 significant bits, so their
    products with ``s`` are exact in float64.
    """
    q = np.asarray(q, _F32)
    up = np.nextafter(q, _F32(np.inf)).astype(_F64)
    down = np.nextafter(q, _F32(-np.inf)).astype(_F64)
    qd = q.astype(_F64)
    sd = np.asarray(s, _F32).astype(_F64)
    xd = np.asarray(x, _F32).astype(_F64)
    hi = sd * ((qd + up) / 2)
    lo = sd * ((qd + down) / 2)
    even = (q.view(np.int32) & 1) == 0
    inside = (xd > lo) & (xd < hi)
    on_edge = ((xd == lo) | (xd == hi)) & even
    return inside | on_edge


#: scales below this are multiplied by 2^64, with x, before the reciprocal division
#: (``triton_kernels.DIV_RECIP_PRESCALED``): keeps x and the residual normal
PRESCALE_BELOW = 2.0**-30
PRESCALE = 2.0**64


def round_to_scale(v: np.ndarray, scale_dtype: str) -> np.ndarray:
    """float32 ``v`` rounded to the scale dtype like ``kbit.blockwise.round_scale``."""
    v = np.asarray(v, _F32)
    if scale_dtype == "fp16":
        return np.minimum(v, _F32(65504)).astype(np.float16).astype(_F32)
    b = v.view(np.uint32).astype(np.int64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.astype(np.uint32).view(_F32)


def check_fast_division(
    x_dtype: str,
    scale_dtype: str,
    *,
    prescale: bool = False,
    scales: np.ndarray | None = None,
    chunk: int = 16,
) -> dict[str, float]:
    """Compare :func:`kernel_divide` with the correctly rounded quotient on every pair that a
    block can hold: every positive scale ``s`` that a finite ``x_dtype`` absmax rounds to in
    ``scale_dtype`` (or those of ``scales``), with every finite ``x`` of ``x_dtype`` not above
    the largest absmax that rounds to ``s``.

    With ``prescale``, scales below :data:`PRESCALE_BELOW` are multiplied, with ``x``, by
    2^64 first, as the kernel does. Returns the number of pairs checked, of pairs that
    differ, and the largest magnitude of either quotient among the differing pairs
    (``bound``): quotients of at most that size are the only ones that can differ. A code
    then differs only if a codebook midpoint lies within ``bound`` of 0 (``launch`` falls
    back to ``div_rn`` for such a codebook).
    """
    xs = finite_values(x_dtype)
    xs = xs[np.argsort(np.abs(xs), kind="stable")]
    mags = np.abs(xs)
    reachable = np.unique(round_to_scale(mags, scale_dtype))  # scales an absmax can round to
    reachable = reachable[reachable > 0]
    if scales is None:
        scales = reachable
    scales = np.sort(np.asarray(scales, _F32))
    scales = scales[np.isin(scales, reachable)]
    ceilings = scale_ceiling(scales, scale_dtype)
    pairs = bad = 0
    bound = 0.0
    for i in range(0, scales.size, chunk):
        s = scales[i : i + chunk, None]
        lim = ceilings[i : i + chunk]
        nx = int(np.searchsorted(mags, lim.max(), side="right"))
        x = xs[None, :nx]
        k = np.where(prescale & (s < _F32(PRESCALE_BELOW)), _F32(PRESCALE), _F32(1.0))
        s2 = (s * k).astype(_F32)  # exact: a power of two
        x2 = (x * k).astype(_F32)
        r = div32(np.ones_like(s2), s2)
        got = kernel_divide(x2, s2, r)
        xb = np.broadcast_to(x, got.shape)
        sb = np.broadcast_to(s, got.shape)
        ok = is_correctly_rounded(got, xb, sb)
        reach = np.abs(x).astype(_F64) <= lim[:, None]
        diff = ~ok & reach
        pairs += int(reach.sum())
        if diff.any():
            bad += int(diff.sum())
            want = div32(xb[diff], sb[diff])
            bound = max(bound, float(np.abs(got[diff]).max()), float(np.abs(want).max()))
    return {"pairs": pairs, "differ": bad, "bound": bound}


# ----------------------------------------------------------------------------- constants
def split_reciprocal(d: Fraction | int) -> tuple[float, float]:
    """``(hi, lo)`` float32 values with ``hi = RN(1/d)`` and ``lo = RN(1/d - hi)``."""
    inv = Fraction(1) / Fraction(d)
    hi = float(_F32(float(inv)))
    hi_exact = Fraction(hi)
    if _F32(float(hi_exact)) != _F32(hi):
        raise AssertionError("float32 conversion is not exact")
    # float(inv) is RN64 and then RN32: double rounding cannot hit a tie for 1/d with d of
    # at most 24 significant bits (checked below against the exact value)
    if abs(hi_exact - inv) > abs(Fraction(float(np.nextafter(_F32(hi), _F32(np.inf)))) - inv):
        raise AssertionError("reciprocal not correctly rounded")
    lo = float(_F32(float(inv - hi_exact)))
    return hi, lo


def divide_by_split(v: np.ndarray, hi: float, lo: float) -> np.ndarray:
    """The kernels' ``fma(v, hi, v * lo)`` for float32 grid values ``v`` (``RN(v hi)`` when
    ``lo`` is 0, as the kernels compute it then)."""
    v = np.asarray(v, _F32)
    if lo == 0.0:
        return rn32(v.astype(_F64) * np.float64(_F32(hi)))
    p = rn32(v.astype(_F64) * np.float64(_F32(lo)))
    return fma32(v, np.full_like(v, hi), p)


def exact_quotients(values: np.ndarray, d: Fraction | int) -> np.ndarray:
    """float32 ``RN(v / d)`` for float32 ``values``, through exact rationals."""
    out = []
    for v in np.asarray(values, _F32).tolist():
        q = Fraction(v) / Fraction(d)
        f = _F32(float(q))  # may double-round: fix by comparing neighbours exactly
        cands = [np.nextafter(f, _F32(-np.inf)), f, np.nextafter(f, _F32(np.inf))]
        best = min(cands, key=lambda c: (abs(Fraction(float(c)) - q), int(c.view(np.int32)) & 1))
        out.append(best)
    return np.array(out, dtype=_F32)
