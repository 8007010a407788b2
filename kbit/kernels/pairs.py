"""Single-probe pair records for codebooks without arithmetic structure (nf, dynamic, quantile).

A *layout* maps a normalized value ``xn`` to a bucket with a few integer or float operations;
the tables are built so that no bucket holds two midpoints. Then the values of a bucket have
one of two codes, ``lo`` and ``lo + 1``, and one read of the bucket's 8-byte record decides:

* fake quantization: the record holds ``cb[lo]`` and ``cb[lo + 1]`` (``cb[lo]`` twice in a
  bucket without a midpoint); the kernel computes their float32 midpoint ``(a + b) * 0.5``,
  exactly the reference's ``(cb[:-1] + cb[1:]) / 2``, and picks ``b`` where ``xn`` is above;
* packing: the record holds ``lo`` and the midpoint (+inf without one): ``lo + (xn > mid)``.
  Where every bucket with a midpoint is a *cell*, the float32 values sharing all but their
  lowest ``w`` bits (log and per-binade layouts, whose index is those high bits), a 4-byte
  record suffices (``PairTables.pack32``): inside a cell ``xn > mid`` compares the low ``w``
  bits ``y`` of the order-preserving integer ``bits ^ (bits >> 31)`` (negative values
  reversed) with the midpoint's, ``T``. The record is ``lo << w | (2^w - 1 - T)`` (``T`` all
  ones without a midpoint), so adding ``y`` carries into ``lo`` exactly when ``y > T``: the
  code is ``(record + y) >> w``. Half the bytes of the shared-memory gather, and three
  integer instructions after it.

Layouts (``triton_kernels._pair_index``):

``uniform``
    ``RN(xn K + K)`` clamped to ``[0, 2K]``: 2K + 1 equal buckets over [-1, 1] (one float FMA,
    two clamps). Good for codebooks whose spacing is nearly even (nf, quantile of a normal).
``log``
    ``2^m`` buckets per binade of ``|xn|`` from its exponent and top ``m`` mantissa bits
    (a float clamp and integer operations), mirrored for negative values. Good for float grids.
``binade``
    the exponent field and sign of ``xn`` select a binade; each binade resolves as many
    leading mantissa bits as its midpoints need (a word per binade: first bucket, shift).
    Good for codebooks spanning many binades (dynamic).

The layout with the fewer buckets is used. Correctness does not depend on the layout's
quality: :func:`build` derives each bucket's codes from the exact value ranges the kernel's
index gives (float32 rounding emulated exactly, ``kbit.kernels.exact``) and rejects a layout
in which any bucket holds two midpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from kbit.kernels import exact

_F32 = np.float32
_TWO23 = _F32(8388608.0)
#: largest number of buckets a table may have
MAX_BUCKETS = 4096
LAYOUTS = ("auto", "uniform", "log", "binade")
#: ``PairTables.layout`` of the uniform index (one FMA) and of the per-binade index (its
#: word table is a dependent read)
LAYOUT_UNIFORM = 0
LAYOUT_BINADE = 1
_INDEX_COST = {0: 0, 2: 1, 1: 2}


@dataclass(frozen=True)
class PairTables:
    """Tables of one codebook. ``layout`` 0 (uniform, ``k``; ``nb = 2k + 1``), 1 (binade:
    ``lay`` words ``first_bucket << 5 | shift`` for ``ne`` binades per sign starting one below
    exponent field ``elo``, negative side second) or 2 (log: ``ne`` mantissa bits per binade
    from ``2^-elo``, ``nb / 2`` buckets per sign)."""

    layout: int
    nb: int
    k: float
    ne: int
    elo: int
    fake: np.ndarray  # int64: bits(cb[lo + 1]) << 32 | bits(cb[lo])
    pack: np.ndarray  # int64: lo << 32 | bits(midpoint or +inf)
    lay: np.ndarray  # int32 (layout 1), a dummy otherwise
    pack32: np.ndarray | None = None  # int32 cell records (module docstring), if they exist


def _bits(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, _F32).view(np.uint32).astype(np.int64)


def _records(cb: np.ndarray, mids: np.ndarray, lo: np.ndarray, internal: np.ndarray):
    """Fake and pack records of buckets with first code ``lo`` and 0/1 internal midpoints."""
    hi = np.minimum(lo + internal, cb.size - 1)
    fake = (_bits(cb[hi]) << 32) | _bits(cb[lo])
    mid_pad = np.append(mids, _F32(np.inf)).astype(_F32)
    mid = np.where(internal > 0, mid_pad[np.minimum(lo, mids.size)], _F32(np.inf)).astype(_F32)
    pack = (lo.astype(np.int64) << 32) | _bits(mid)
    return fake, pack


def uniform_index(x: np.ndarray, k: int) -> np.ndarray:
    """The kernel's uniform bucket of float32 values (exact emulation of its FMA)."""
    x = np.asarray(x, _F32)
    f = exact.fma32(x, np.full_like(x, _F32(k)), np.full_like(x, _F32(k) + _TWO23))
    f = np.minimum(np.maximum(f, _TWO23), _TWO23 + _F32(2 * k))
    return f.view(np.int32).astype(np.int64) - 0x4B000000


def _uniform(cb: np.ndarray, mids: np.ndarray, max_buckets: int) -> PairTables | None:
    """Smallest K for which no uniform bucket holds two midpoints (each midpoint and the next
    float32 above it: the values whose codes differ there)."""
    if mids.size == 0:
        return None
    above = np.nextafter(mids, _F32(np.inf))
    gaps = np.diff(mids.astype(np.float64))
    # buckets are 1/K wide: two midpoints closer than 1/(2K) cannot be separated
    start = 1 if gaps.size == 0 else max(1, int(0.5 / gaps.min()))
    for k in range(start, (max_buckets - 1) // 2 + 1):
        at, up = uniform_index(mids, k), uniform_index(above, k)
        inside = at[at == up]
        if inside.size and np.bincount(inside).max() > 1:
            continue
        nb = 2 * k + 1
        buckets = np.arange(nb)
        lo = np.searchsorted(at, buckets, side="left")  # midpoints whose values lie below
        internal = np.bincount(inside, minlength=nb)[:nb]
        fake, pack = _records(cb, mids, lo, internal)
        return PairTables(0, nb, float(k), 0, 0, fake, pack, np.zeros(1, np.int32))
    return None


def _binade_buckets(mids: np.ndarray, e: int, m: int, negative: bool):
    """Signed value range [a, b] of each of the 2^m buckets of binade ``e`` (fp32 exponent
    field) on one side: (a, b) float32 arrays in increasing magnitude order."""
    q = np.arange(1 << m, dtype=np.int64)
    lo_bits = (e << 23) + (q << (23 - m))
    hi_bits = lo_bits + (1 << (23 - m)) - 1
    lo_v = lo_bits.astype(np.uint32).view(_F32)
    hi_v = hi_bits.astype(np.uint32).view(_F32)
    return (-hi_v, -lo_v) if negative else (lo_v, hi_v)


def _codes_between(mids: np.ndarray, a: np.ndarray, b: np.ndarray):
    """(code of a, number of midpoints in [a, b)): the codes of a bucket's values."""
    ca = np.searchsorted(mids, a.astype(np.float64), side="left")
    cb_ = np.searchsorted(mids, b.astype(np.float64), side="left")
    return ca, cb_ - ca


def _binade(cb: np.ndarray, mids: np.ndarray, max_buckets: int) -> PairTables | None:
    """Per sign and binade the fewest leading mantissa bits that separate its midpoints.

    Slot 0 of a side holds everything below the lowest binade with a midpoint (zero and
    subnormals included), slots 1.. the binades up to the highest one, and the remaining
    slots (padding ``ne`` to a power of two) one bucket each above it; the last one also takes
    every larger value (the kernel clamps the exponent field)."""
    mags = np.abs(mids[mids != 0]).astype(_F32)
    fields = mags.view(np.uint32) >> 23 if mags.size else np.array([127], np.uint32)
    elo, ehi = max(int(fields.min()), 1), int(fields.max())  # field 0 joins the bucket below
    ne = pow2(ehi - elo + 3)
    words = np.zeros(2 * ne, np.int64)
    los, ins = [], []
    base = 0
    for side, negative in ((0, False), (1, True)):
        for slot in range(ne):
            e = elo - 1 + slot
            if slot == 0 or e > ehi:  # one bucket: below elo, or one binade above ehi
                lo_bits = 0 if slot == 0 else e << 23
                hi_bits = (elo << 23) - 1 if slot == 0 else ((e + 1) << 23) - 1
                if slot == ne - 1:
                    hi_bits = 0x7F7FFFFF
                a = np.array([lo_bits, hi_bits], np.uint32).view(_F32)
                a_, b_ = (-a[1:], -a[:1]) if negative else (a[:1], a[1:])
                m = 0
            else:
                for m in range(0, 24):
                    a_, b_ = _binade_buckets(mids, e, m, negative)
                    if _codes_between(mids, a_, b_)[1].max() <= 1:
                        break
            ca, n_in = _codes_between(mids, a_, b_)
            if n_in.max() > 1:
                return None
            words[side * ne + slot] = (base << 5) | (23 - m)
            los.append(ca)
            ins.append(n_in)
            base += ca.size
            if base > max_buckets or e > 254:
                return None
    lo = np.concatenate(los)
    internal = np.concatenate(ins)
    fake, pack = _records(cb, mids, lo, internal)
    return PairTables(1, lo.size, 0.0, ne, elo, fake, pack, words.astype(np.int32))


def cell_bits(t: PairTables) -> np.ndarray | None:
    """Low bits ``low`` of every bucket whose index is the high bits of its values (log: one
    width; per-binade: its binade's), or None (uniform index)."""
    if t.layout == 2:
        return np.full(t.nb, 23 - t.ne, np.int64)
    if t.layout == 1:
        sh = t.lay.astype(np.int64) & 31
        return np.repeat(sh, np.left_shift(1, 23 - sh))
    return None


def _cell_records(t: PairTables) -> np.ndarray | None:
    """int32 records ``lo << w | (2^w - 1 - T)`` (module docstring), or None where a bucket
    with a midpoint is not exactly one cell (the clamped end buckets) or a cell has no low
    bits."""
    low = cell_bits(t)
    if low is None or low.size != t.nb or low.min() < 1:
        return None
    lo = t.pack >> 32
    mbits = t.pack & 0xFFFFFFFF
    mask = (np.int64(1) << low) - 1
    inside = mbits != 0x7F800000  # +inf: no midpoint in the bucket
    b = np.flatnonzero(inside)
    m, mk = mbits[b], mask[b]
    ends = np.stack([m & ~mk, m | mk, (m & ~mk) - 1, (m | mk) + 1]).astype(np.uint32)
    got = bucket_of(ends.view(_F32).ravel(), t).reshape(4, -1)
    neighbours_inside = (got[2] == b) & (m & ~mk > 0) | (got[3] == b) & (m | mk < 0xFFFFFFFF)
    if not (np.all(got[0] == b) and np.all(got[1] == b)) or np.any(neighbours_inside):
        return None
    key = np.where(mbits >> 31 == 1, ~mbits, mbits) & mask
    rec = (lo << low) | (mask - np.where(inside, key, mask))
    return rec.astype(np.uint32).view(np.int32)


def log_index(x: np.ndarray, mlow: int, elow: int, nmag: int) -> np.ndarray:
    """The kernel's log bucket (``triton_kernels._bucket_index``) of float32 values."""
    xb = np.asarray(x, _F32).view(np.int32).astype(np.int64)
    i = np.maximum((xb & 0x7FFFFFFF) - ((127 - elow) << 23), 0) >> (23 - mlow)
    i = np.minimum(i, nmag - 1)
    return np.where(xb < 0, nmag - 1 - i, nmag + i)


def _monotone_tables(cb, mids, index, nb, layout, k=0.0, ne=0, elo=0) -> PairTables | None:
    """Tables for an index that is monotone in the signed value: a bucket's first code is the
    number of midpoints whose bucket is lower; a midpoint is inside a bucket when the next
    float32 above it lands in the same one (the values on both sides share the bucket)."""
    at = index(mids)
    up = index(np.nextafter(mids, _F32(np.inf)))
    inside = at[at == up]
    if inside.size and np.bincount(inside).max() > 1:
        return None
    lo = np.searchsorted(at, np.arange(nb), side="left")
    internal = np.bincount(inside, minlength=nb)[:nb]
    fake, pack = _records(cb, mids, lo, internal)
    return PairTables(layout, nb, k, ne, elo, fake, pack, np.zeros(1, np.int32))


def _log(cb: np.ndarray, mids: np.ndarray, max_buckets: int) -> PairTables | None:
    """The fewest mantissa bits per binade (same for all binades) that separate the midpoints,
    from the binade of the smallest nonzero |midpoint| to that of the largest."""
    mags = np.abs(mids[mids != 0]).astype(np.float64)
    if mags.size == 0:
        return None
    elow = int(np.ceil(-np.log2(mags.min()))) + 1
    etop = max(1, int(np.floor(np.log2(mags.max()))) + 2)
    if elow >= 126 or etop >= 127:
        return None
    for mlow in range(0, 15):
        nmag = (elow + etop) << mlow
        if 2 * nmag > max_buckets:
            return None
        t = _monotone_tables(cb, mids, lambda v, m=mlow, n=nmag: log_index(v, m, elow, n),
                             2 * nmag, 2, ne=mlow, elo=elow)  # fmt: skip
        if t is not None:
            return t
    return None


def binade_index(x: np.ndarray, t: PairTables) -> np.ndarray:
    """The kernel's binade bucket of float32 values (``triton_kernels._pair_index``)."""
    xb = np.asarray(x, _F32).view(np.int32).astype(np.int64)
    mag = xb & 0x7FFFFFFF
    e = np.minimum(np.maximum(mag >> 23, t.elo - 1), t.elo + t.ne - 2)
    p = t.lay.astype(np.int64)[e - (t.elo - 1) + np.where(xb < 0, t.ne, 0)]
    return (p >> 5) + ((mag & 0x7FFFFF) >> (p & 31))


def bucket_of(x: np.ndarray, t: PairTables) -> np.ndarray:
    """The kernel's bucket of float32 values for any layout."""
    if t.layout == 0:
        return uniform_index(x, int(t.k))
    if t.layout == 2:
        return log_index(x, t.ne, t.elo, t.nb // 2)
    return binade_index(x, t)


def build(
    cb: np.ndarray, layout: str = "auto", max_buckets: int = MAX_BUCKETS
) -> PairTables | None:
    """Pair tables of a sorted float32 codebook; ``layout``: ``"uniform"``, ``"log"``,
    ``"binade"`` or ``"auto"`` (``_choose``). None: no layout within ``max_buckets`` separates
    the midpoints."""
    cb = np.asarray(cb, _F32)
    if cb.size < 2:
        return None
    mids = ((cb[:-1] + cb[1:]) / _F32(2)).astype(_F32)
    if layout not in LAYOUTS:
        raise ValueError(f"pair layout {layout!r}: allowed are {', '.join(LAYOUTS)}")
    build_ = {"uniform": _uniform, "log": _log, "binade": _binade}
    cands = {
        t.layout: t
        for name, fn in build_.items()
        if layout in ("auto", name) and (t := fn(cb, mids, max_buckets)) is not None
    }
    if not cands:
        return None
    t = _choose(cands)
    return replace(t, pack32=_cell_records(t))


def _choose(cands: dict[int, PairTables]) -> PairTables:
    """The layout to use (measured on an H200, benchmarks/kernels_notes.md "v6"): the uniform
    index is the cheapest (one FMA, two clamps) and wins up to 1024 entries unless another
    layout needs far fewer; then the log index up to 512 entries; else the smallest table."""
    size = {k: pow2(t.nb) for k, t in cands.items()}
    uni = cands.get(0)
    others = [v for k, v in size.items() if k != 0]
    if (
        uni is not None
        and size[0] <= 1024
        and (size[0] <= 64 or not others or size[0] <= 2 * min(others))
    ):
        return uni
    if 2 in cands and size[2] <= 512:
        return cands[2]
    return min(cands.values(), key=lambda t: (pow2(t.nb), _INDEX_COST[t.layout]))


def pow2(v: int) -> int:
    """The smallest power of two >= v (>= 1)."""
    return 1 << max(0, (v - 1).bit_length())
