"""Triton kernels for blockwise k-bit quantization, bit-exact with ``kbit.blockwise``.

This module imports Triton at import time; ``kbit.kernels`` imports it lazily so that the rest
of the library works on machines without Triton. Every kernel reproduces the reference bit for
bit; what each step computes and why it is exact:

* **Block scale** (``_block_scale``). Absmax types: the block's absmax rounded to the scale
  dtype (nearest even after clamping to its largest finite value). MX: the E8M0 exponent
  ``max(E(absmax) - emax, 0)`` read from the absmax's exponent field (``floor(log2)`` for a
  normal absmax; a subnormal or zero absmax gives the minimum, 2^-127, as the reference's
  clamp does). NVFP4: ``E4M3(min(absmax / (6 g), 448))`` with ``g`` the per-tensor scale,
  rounded with the element rounding below.
* **Division** ``xn = x / s`` (``_divide``), always the IEEE quotient: ``div_rn``; or, on the
  input/scale dtypes where ``kbit.kernels.exact.check_fast_division`` found no pair that
  differs, the block's correctly rounded reciprocal ``r = 1/s`` and per value
  ``q = x r``, ``q + (x - s q) r`` (one multiply, two FMAs); or, for MX's power-of-two
  scales, ``x * 2^-e`` (exact). A zero scale gives ``xn = 0``.
* **Code** (``_value`` / ``_code``, ``FAMILY``):

  - ``FAMILY=1`` int grids and ``FAMILY=2`` normalised float grids (``kbit.kernels.arith``):
    the two candidate entries are found from the value's bits with one magic-number rounding
    (no table), both entries computed exactly, and ``xn`` compared with their float32
    midpoint: the reference's comparison, ties to the lower code.
  - ``FAMILY=3`` microscaling element grids: round to nearest even onto the grid by adding
    and subtracting ``2^(e + 23 - M)`` (``e`` the value's binade, at least the grid's
    smallest normal one), saturating at the largest element; the code is read from the sum's
    bits.
  - ``FAMILY=0`` any other sorted codebook (``SEARCH``): the midpoint search tree; bucket
    tables indexed by the value's bits (``_bucket_index``); or single-probe pair records
    (``SEARCH=4`` from global memory, ``5`` from a shared-memory copy): a bucket of a layout
    in which no bucket holds two midpoints stores its two candidate entries, and the kernel
    compares with their midpoint.

* **Output**: fake quantization writes ``cb[code] * s`` in fp32, cast to the output dtype
  (nearest even); packing writes an LSB-first bitstream: code ``i`` occupies bits
  ``[i*k, (i+1)*k)``, so every group of 8 codes is exactly ``k`` bytes.

Floating-point contraction: the compiler may fuse a multiply into a following add. Every
multiply whose result is added later is either an explicit ``tl.fma`` or one whose fusion
cannot change the result (noted where it happens).

Kernel shapes: the fused kernels view the tensor as rows of one block and do absmax, scale,
codes and output in a single read of ``x`` (``fused_pack_chunk_kernel``: with each thread
holding 16 or 32 consecutive values, so that its codes form whole int16/int32 words); the
flat kernel takes precomputed fp32 divisors (from ``absmax_partial_kernel``) for blocks
larger than one tile, per-tensor scaling and packing when the block size is not a multiple
of 8.

Inputs must be finite (the reference rejects NaN and inf; the kernels do not check, for speed).
"""

from __future__ import annotations

import triton
import triton.language as tl

# Block scale kinds (constexpr SCALE_DT): absmax rounded to a float dtype, E8M0, E4M3 * g.
SCALE_FP16 = 0
SCALE_BF16 = 1
SCALE_FP32 = 2
SCALE_E8M0 = 3
SCALE_E4M3 = 4

# Division modes (constexpr DIV).
DIV_EXACT = 0  # div_rn per value
DIV_RECIP = 1  # correctly rounded block reciprocal, one FMA correction per value
DIV_RECIP_PRESCALED = 2  # as 1, with x and s times 2^64 in blocks of a scale below 2^-30
DIV_POW2 = 3  # multiplication by the exact reciprocal of a power of two
DIV_RECIP_IF = 4  # DIV_RECIP where a device-side flag allows it (NVFP4), else div_rn

# Code families (constexpr FAMILY).
FAMILY_TABLE = 0
FAMILY_INT = 1
FAMILY_FLOAT = 2
FAMILY_ELEMENT = 3
FAMILY_POW2 = 4  # 0 and +-2^(1-N) .. +-1 (AM = N): float codebooks without mantissa bits


@triton.jit
def _bf16_rne(v):
    """fp32 -> nearest-even bf16 value, still as fp32 (bit arithmetic; no NaN inputs)."""
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _to_out(y, dtype: tl.constexpr):
    """Cast fp32 results to the output dtype with round-to-nearest-even on every backend.
    bf16 tensors are passed as int16 bit patterns (``launch._bits_view``): stored as the top
    half of the rounded fp32 bits (Triton's interpreter converts bf16 subnormals wrongly)."""
    if dtype == tl.int16:
        out = (_bf16_rne(y).to(tl.int32, bitcast=True) >> 16).to(tl.int16)
    elif dtype == tl.bfloat16:
        out = _bf16_rne(y).to(dtype)
    else:
        out = y.to(dtype)
    return out


@triton.jit
def _to_f32(v):
    """Loaded input values as fp32; int16 holds bf16 bit patterns (see ``_to_out``)."""
    if v.dtype == tl.int16:
        f = (v.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        f = v.to(tl.float32)
    return f


@triton.jit
def _element_round(u, VMAX: tl.constexpr, M: tl.constexpr, EMIN_BITS: tl.constexpr):
    """Non-negative fp32 ``u`` rounded to nearest even onto an element grid (M mantissa bits,
    smallest normal binade ``EMIN_BITS``), saturating at ``VMAX``.

    ``c = 2^(max(e_u, emin) + 23 - M)``: in ``[c, 2c)`` float32's unit in the last place is the
    grid's spacing at ``u``, so ``RN(u + c) - c`` is the nearest grid value (ties to even: an
    even last bit of the sum is an even grid mantissa), subnormals included. Returns the value
    and the sum and ``c`` (their bits give the rank, ``_element_rank``).
    """
    u = tl.minimum(u, VMAX)
    ec = tl.maximum(u.to(tl.int32, bitcast=True) & 0x7F800000, EMIN_BITS)
    cb = ec + ((23 - M) << 23)
    c = cb.to(tl.float32, bitcast=True)
    s = u + c
    return s - c, s, ec


@triton.jit
def _element_rank(s, ec, M: tl.constexpr, EMIN_BITS: tl.constexpr):
    """Rank of ``_element_round``'s value among the non-negative grid values (its bit
    pattern without the sign): whole binades above the smallest normal one, plus the units
    of the sum above ``c``."""
    return ((ec - EMIN_BITS) >> (23 - M)) + (s.to(tl.int32, bitcast=True) - (ec + ((23 - M) << 23)))


@triton.jit
def _block_scale(absmax, gd_ptr, SCALE_DT: tl.constexpr, EMAX: tl.constexpr):
    """absmax (fp32, >= 0) -> (s: the fp32 block scale, stored: what the scale tensor holds).

    ``stored`` is s itself for the float dtypes, the E8M0 biased exponent for MX and the
    E4M3 bit pattern for NVFP4 (``gd_ptr``: fp32 ``[g, RN(6 g), division flag]`` on the
    device, so that no host synchronisation is needed)."""
    if SCALE_DT == 0:
        s = tl.minimum(absmax, 65504.0).to(tl.float16).to(tl.float32)
        stored = s
    elif SCALE_DT == 1:
        # nearest-even bf16 on the bit pattern: the interpreter's cast is not guaranteed to round
        s = _bf16_rne(tl.minimum(absmax, 3.3895313892515355e38))
        stored = s
    elif SCALE_DT == 2:
        s = absmax
        stored = s
    elif SCALE_DT == 3:
        e = tl.maximum((absmax.to(tl.int32, bitcast=True) >> 23) - EMAX, 0)
        s = tl.where(e > 0, e << 23, 0x400000).to(tl.float32, bitcast=True)
        stored = e
    else:
        g = tl.load(gd_ptr)
        denom = tl.load(gd_ptr + 1)
        safe = tl.where(denom > 0.0, denom, 1.0)
        ratio = tl.where(denom > 0.0, tl.math.div_rn(absmax, safe), 0.0)
        t, sm, ec = _element_round(ratio, 448.0, 3, 121 << 23)
        s = t * g
        stored = _element_rank(sm, ec, 3, 121 << 23)
    return s, stored


@triton.jit
def _reciprocal(s, stored, DIV: tl.constexpr):
    """Per-block factors of ``_divide``: (s', r, k) with ``x / s = (k x) / s'``."""
    if DIV == 1 or DIV == 4:
        r = tl.where(s == 0.0, 0.0, tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s))
        k = s
        sd = s
    elif DIV == 2:
        k = tl.where(s < 9.313225746154785e-10, 18446744073709551616.0, 1.0)  # 2^-30, 2^64
        sd = s * k  # exact: a power of two
        r = tl.where(s == 0.0, 0.0, tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), sd))
    elif DIV == 3:
        e = stored
        r = tl.where(e < 254, (254 - e) << 23, 0x400000).to(tl.float32, bitcast=True)
        k = s
        sd = s
    else:
        r = s
        k = s
        sd = s
    return sd, r, k


@triton.jit
def _exact_div(x, s):
    s_b = tl.broadcast_to(s, x.shape)
    safe = tl.where(s_b == 0.0, 1.0, s_b)
    return tl.where(s_b == 0.0, 0.0, tl.math.div_rn(x, safe))


@triton.jit
def _recip_div(x, sd, r):
    q = x * r  # feeds the FMAs below as a product operand: no contraction possible
    return tl.fma(tl.fma(-sd, q, x), r, q)


@triton.jit
def _divide(x, sd, r, k, gd_ptr, DIV: tl.constexpr):
    """x / s with IEEE rounding (see the module docstring); 0 where s == 0. ``sd, r, k``
    from ``_reciprocal``, broadcastable to ``x``. DIV=4: the reciprocal division where the
    device-side flag ``gd_ptr[2]`` allows it, ``div_rn`` otherwise (one branch per program;
    NVFP4's fake quantization): ``gd_ptr[2]`` counts the pairs where the shortcut could
    change a code (``nv_scale_kernel``); 0 allows it. Packing takes the two paths in two
    launches instead (``fused_pack_kernel``, FLAG)."""
    if DIV == 0:
        xn = _exact_div(x, sd)
    elif DIV == 3:
        xn = x * r
    elif DIV == 4:
        if tl.load(gd_ptr + 2) == 0.0:  # noqa: SIM108 (a branch per program, not a select)
            xn = _recip_div(x, sd, r)
        else:
            xn = _exact_div(x, sd)
    else:
        if DIV == 2:
            x = x * k  # exact: a power of two
        xn = _recip_div(x, sd, r)
    return xn


# ----------------------------------------------------------------------------- arithmetic codes
@triton.jit
def _div_const(v, AHI: tl.constexpr, ALO: tl.constexpr):
    """``RN(v / d)`` for grid values ``v`` as ``fma(v, hi, v lo)`` (``hi + lo = 1/d``); one
    multiply where ``lo`` is 0 (``arith``: there a single product was checked exact)."""
    if ALO == 0.0:  # noqa: SIM108 (constexpr branch, resolved when compiling)
        q = v * AHI
    else:
        q = tl.fma(v, AHI, v * ALO)
    return q


@triton.jit
def _int_index(xn, AM: tl.constexpr):
    """``j + 2^23`` as fp32 (``_int_pair``): the answer is code j or j + 1, 0 <= j < m."""
    n2 = tl.fma(xn, AM * 1.0, AM + 8388608.0)
    n2 = tl.minimum(tl.maximum(n2, 8388608.0), 8388608.0 + (2 * AM - 1))
    return tl.fma(n2, 0.5, 4194303.75)  # 2^22 - 1/4 (N = 0 lands on a tie that rounds to 2^23)


@triton.jit
def _int_pair(xn, AM: tl.constexpr, AHI: tl.constexpr, ALO: tl.constexpr):
    """Int grid ``RN((2i - m) / m)``: (j + 2^23 as fp32, cb[j], cb[j+1], xn > midpoint).

    ``N = RN(xn m + m)`` (twice the position on the grid) and ``j = N >> 1`` (by a second
    magic FMA: ``RN(2^23 + N/2 - 1/4)``) put the answer in {j, j+1} wherever it is; both
    entries are ``fma(a, hi, a lo)``, checked exact for every ``a = 2i - m``.
    """
    jf = _int_index(xn, AM)
    a = tl.fma(jf, 2.0, -(16777216.0 + AM))
    b = a + 2.0
    lo = _div_const(a, AHI, ALO)
    hi = _div_const(b, AHI, ALO)
    up = xn > (lo + hi) * 0.5
    return jf, lo, hi, up


@triton.jit
def _float_pair(
    xn,
    AVM: tl.constexpr,
    AV2: tl.constexpr,
    AM: tl.constexpr,
    AEMIN: tl.constexpr,
    AHI: tl.constexpr,
    ALO: tl.constexpr,
):
    """Normalised float grid ``RN(v / vmax)``: (raw lower neighbour's code offset pieces,
    cb[lo], cb[hi], xn > midpoint).

    ``w = xn vmax`` is rounded onto the raw grid (``t``, signed, nearest even) with the
    element rounding's power of two carrying the sign of ``w``; the raw neighbour on the
    other side of ``w`` (one grid step of ``w``'s binade away) completes the pair that holds
    the answer. Returns also ``t``'s rank pieces for the code.
    """
    w = tl.fma(xn, AVM, 0.0)  # an fma so that the adds below cannot absorb the product
    # below -vmax the pair is (-vmax, next); at the top, clamping to the second largest value
    # makes the pair (that value, vmax), so saturation needs no clamp of the pair itself
    w = tl.minimum(tl.maximum(w, -AVM), AV2)
    wb = w.to(tl.int32, bitcast=True)
    ec = tl.maximum(wb & 0x7F800000, AEMIN)
    cb = ec + ((23 - AM) << 23)
    cs = (cb | (wb & -2147483648)).to(tl.float32, bitcast=True)
    ulp = (ec - (AM << 23)).to(tl.float32, bitcast=True)
    sm = w + cs
    t = sm - cs
    down = t > w
    lo = t - tl.where(down, ulp, 0.0)
    hi = lo + ulp
    clo = _div_const(lo, AHI, ALO)
    chi = _div_const(hi, AHI, ALO)
    up = xn > (clo + chi) * 0.5
    return sm, ec, cb, wb, down, clo, chi, up


@triton.jit
def _pow2_rank(xn, N: tl.constexpr):
    """(q, sign mask) of ``xn`` on the grid {0, +-2^(1-N), ..., +-2^-1, +-1}: q = 0 for 0, i
    for 2^(i-N). A binade [2^e, 2^(e+1)) holds one midpoint, 1.5 2^e, so adding half a
    binade's mantissa to the fp32 bits carries into the exponent exactly above it; the
    binade below the smallest entry (midpoint 2^-N, its lower end) is the comparison with
    2^-N's bits. Ties go to the lower code: for a positive value the smaller magnitude, for
    a negative one the larger (the sign mask, -1, moves the rounding point by one ulp)."""
    xb = xn.to(tl.int32, bitcast=True)
    sg = xb >> 31  # -1 for negative xn, else 0
    mb = xb & 0x7FFFFFFF
    q = ((mb + (0x3FFFFF - sg)) >> 23) - (127 - N)
    q = tl.maximum(q, (mb - sg > ((127 - N) << 23)).to(tl.int32))
    return tl.minimum(q, N), sg


# ----------------------------------------------------------------------------- table searches
@triton.jit
def _search(
    xn,
    tab_ptr,
    rec_ptr,
    LOGP: tl.constexpr,
    REG_LEVELS: tl.constexpr,
    STEP: tl.constexpr,
    AXIS: tl.constexpr,
):
    """Number of midpoints m_i with xn > m_i: a branchless descent of the implicit search tree.

    ``tab`` holds the 2**LOGP - 1 sorted midpoints (padded with +inf) in breadth-first order
    (node i at index i, children 2i and 2i+1, root 1), so level ``l`` reads one contiguous run of
    2**l values. That keeps each gather of a warp within few cache lines: levels up to 5 lie in
    the first 128 bytes, where a sorted layout spreads a level's candidates over the whole
    table. The leaf reached is ``2**LOGP + code``.

    The first ``REG_LEVELS`` levels pick their midpoint with selects among values loaded once
    per program instead of gathers. With ``STEP > 1`` the following levels go ``STEP`` at a
    time: ``rec`` holds, for node i, the 2**STEP - 1 midpoints of its STEP-level subtree in
    sorted order (plus one +inf), read as one vector; the number of them below xn is the
    subtree leaf's rank, so ``node = node * 2**STEP + count``: fewer, wider loads, but on an
    H100 with Triton 3.6 slower (layout conversions; see benchmarks/kernels_notes.md): off by
    default.
    ``AXIS`` is the rank of ``xn`` (the vector axis is appended after it).
    """
    node = tl.full(xn.shape, 1, tl.int32)
    # levels from TAIL on (all of them when STEP == 1) take one gather each
    if STEP == 1:  # noqa: SIM108 (constexpr branch, resolved when compiling)
        TAIL = REG_LEVELS
    else:
        TAIL = REG_LEVELS + ((LOGP - REG_LEVELS) // STEP) * STEP
    for lvl in tl.static_range(LOGP):
        if lvl < REG_LEVELS:
            m = tl.load(tab_ptr + (1 << lvl))
            for t in tl.static_range(1, 1 << lvl):
                m = tl.where(node == (1 << lvl) + t, tl.load(tab_ptr + ((1 << lvl) + t)), m)
            node = node * 2 + (xn > m).to(tl.int32)
        elif lvl >= TAIL:
            node = node * 2 + (xn > tl.load(tab_ptr + node)).to(tl.int32)
        elif (lvl - REG_LEVELS) % STEP == 0:
            lane = tl.arange(0, 1 << STEP)
            r = tl.load(rec_ptr + tl.expand_dims(node * (1 << STEP), AXIS) + lane)
            cnt = tl.sum((tl.expand_dims(xn, AXIS) > r).to(tl.int32), axis=AXIS)
            node = node * (1 << STEP) + cnt
    return node - (1 << LOGP)


@triton.jit
def _bucket_index(xn, BMLOW: tl.constexpr, BELOW: tl.constexpr, BNMAG: tl.constexpr):
    """Index of ``xn``'s bucket in a bucket table (``blockwise._Bucketing``; no table read).

    Magnitudes are cut into 2**BMLOW buckets per binade (the exponent and top BMLOW mantissa
    bits of ``|xn|``), from 2**-BELOW (smaller magnitudes join the first bucket: no midpoint
    but 0 lies there) up to BNMAG buckets (larger ones join the last). The table holds the
    negative buckets mirrored, then the positive ones, so it is sorted by value: bucket i of
    the sign of ``xn`` sits at ``BNMAG + i`` (positive) or ``BNMAG - 1 - i`` (negative).
    """
    xb = xn.to(tl.int32, bitcast=True)
    # |xn| clamped as a float to [2^-BELOW, the last bucket's largest value] (the absolute
    # value is an operand modifier of the min/max; a NaN becomes 2^-BELOW), then shifted and
    # offset in one instruction (LEA.HI): two instructions per value fewer than clamping the
    # bits as integers, the same bucket for every other value (on an H200 float8 packing +1
    # to +5 points of copy, dynamic4 +2 to +6, kernels_notes.md "v14")
    LOW: tl.constexpr = (127 - BELOW) << 23
    TOP: tl.constexpr = LOW + (BNMAG << (23 - BMLOW)) - 1
    lo_f = tl.full([], LOW, tl.int32).to(tl.float32, bitcast=True)
    if TOP < 0x7F800000:
        hi_f = tl.full([], TOP, tl.int32).to(tl.float32, bitcast=True)
        a = tl.minimum(tl.maximum(tl.abs(xn), lo_f), hi_f)
    else:  # the last bucket reaches the largest float
        a = tl.maximum(tl.abs(xn), lo_f)
    i = (a.to(tl.int32, bitcast=True) >> (23 - BMLOW)) - (LOW >> (23 - BMLOW))  # a >= 2^-BELOW
    return (i ^ (xb >> 31)) + BNMAG


@triton.jit
def _codes(
    xn,
    tab_ptr,
    rec_ptr,
    btab_ptr,
    mid_ptr,
    LOGP: tl.constexpr,
    REG_LEVELS: tl.constexpr,
    STEP: tl.constexpr,
    AXIS: tl.constexpr,
    SEARCH: tl.constexpr,
    BREF: tl.constexpr,
    BMLOW: tl.constexpr,
    BELOW: tl.constexpr,
    BNMAG: tl.constexpr,
    NTAB: tl.constexpr,
):
    """Codes of normalized values.

    SEARCH=0: the search tree. SEARCH=1 (every bucket holds at most one midpoint): one int64
    record per bucket, the bucket's midpoint (fp32 bits, +inf if none) in the low word and its
    first code ``lo`` (the number of midpoints below the bucket) in the high word; the code is
    ``lo + (xn > mid)``. SEARCH=2 (buckets of at most BREF midpoints): a uint8 ``lo`` per bucket,
    then BREF reads of the sorted midpoints from ``lo`` on (the table ends with BREF +inf).
    SEARCH=3: as 2, the midpoints read from a copy in shared memory (``_smem_codes``).
    """
    if SEARCH == 0:
        code = _search(xn, tab_ptr, rec_ptr, LOGP, REG_LEVELS, STEP, AXIS)
    elif SEARCH == 1:
        rec = tl.load(btab_ptr + _bucket_index(xn, BMLOW, BELOW, BNMAG))
        mid = rec.to(tl.int32).to(tl.float32, bitcast=True)
        code = (rec >> 32).to(tl.int32) + (xn > mid).to(tl.int32)
    elif SEARCH == 2:
        lo = tl.load(btab_ptr + _bucket_index(xn, BMLOW, BELOW, BNMAG)).to(tl.int32)
        code = lo
        for t in tl.static_range(BREF):
            code += (xn > tl.load(mid_ptr + lo + t)).to(tl.int32)
    else:
        code = _smem_codes(xn, btab_ptr, mid_ptr, BREF, BMLOW, BELOW, BNMAG, NTAB)
    return code


@triton.jit
def _smem_gather(tab, idx):
    """``tab[idx]`` through ``tl.gather`` (a copy of ``tab`` in shared memory): ``idx`` is
    flattened to 1-D and the result given ``idx``'s shape; for the row-major tiles here both
    reshapes keep every element in its thread, so no layout conversion is needed."""
    return tl.reshape(tl.gather(tab, tl.reshape(idx, [idx.numel]), 0), idx.shape)


@triton.jit
def _smem_codes(xn, btab_ptr, mid_ptr, BREF: tl.constexpr, BMLOW: tl.constexpr,
                BELOW: tl.constexpr, BNMAG: tl.constexpr, NTAB: tl.constexpr):  # fmt: skip
    """SEARCH=3: the uint8 bucket table from global memory, the midpoints (NTAB entries,
    padded with +inf) from shared memory."""
    lo = tl.load(btab_ptr + _bucket_index(xn, BMLOW, BELOW, BNMAG)).to(tl.int32)
    mids = tl.load(mid_ptr + tl.arange(0, NTAB))
    code = lo
    for t in tl.static_range(BREF):
        code += (xn > _smem_gather(mids, lo + t)).to(tl.int32)
    return code


@triton.jit
def _levels(
    xn,
    tab_ptr,
    rec_ptr,
    btab_ptr,
    bhi_ptr,
    mid_ptr,
    cb_ptr,
    LOGP: tl.constexpr,
    REG_LEVELS: tl.constexpr,
    STEP: tl.constexpr,
    AXIS: tl.constexpr,
    SEARCH: tl.constexpr,
    BREF: tl.constexpr,
    BMLOW: tl.constexpr,
    BELOW: tl.constexpr,
    BNMAG: tl.constexpr,
    NTAB: tl.constexpr,
):
    """Codebook values ``cb[code]`` of normalized values (fake quantization).

    SEARCH=1 reads them from the bucket without forming the code: the int64 record holds the
    midpoint (low word) and ``cb[lo]`` (high word, fp32 bits), ``bhi`` holds ``cb[lo + 1]``;
    the two reads are independent. Otherwise ``cb[_codes(...)]``.
    """
    if SEARCH == 1:
        idx = _bucket_index(xn, BMLOW, BELOW, BNMAG)
        rec = tl.load(btab_ptr + idx)
        hi = tl.load(bhi_ptr + idx)
        mid = rec.to(tl.int32).to(tl.float32, bitcast=True)
        lo = (rec >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        v = tl.where(xn > mid, hi, lo)
    elif SEARCH == 3:
        code = _smem_codes(xn, btab_ptr, mid_ptr, BREF, BMLOW, BELOW, BNMAG, NTAB)
        v = _smem_gather(tl.load(cb_ptr + tl.arange(0, NTAB)), code)
    else:
        code = _codes(
            xn, tab_ptr, rec_ptr, btab_ptr, mid_ptr, LOGP, REG_LEVELS, STEP, AXIS,
            SEARCH, BREF, BMLOW, BELOW, BNMAG, NTAB,
        )  # fmt: skip
        v = tl.load(cb_ptr + code)
    return v


@triton.jit
def _float_code(sm, ec, cb, wb, down, up, AM: tl.constexpr, AEMIN: tl.constexpr,
                AZERO: tl.constexpr, ALAST: tl.constexpr):  # fmt: skip
    """Code of ``_float_pair``'s answer: the rank of ``t`` (signed around the zero code),
    minus one if the pair lies below ``t``, plus one for the upper entry (at most the last
    code: ``w`` was clamped below the largest raw value)."""
    mag = ((ec - AEMIN) >> (23 - AM)) + ((sm.to(tl.int32, bitcast=True) & 0x7FFFFFFF) - cb)
    neg = wb >> 31  # -1 for negative w, else 0
    idx = AZERO + ((mag ^ neg) - neg)
    return idx - down.to(tl.int32) + up.to(tl.int32)


# ----------------------------------------------------------------------------- pair records
@triton.jit
def _pair_index(xn, lay_ptr, SMEM: tl.constexpr, PLAY: tl.constexpr, PK: tl.constexpr,
                PNB: tl.constexpr, PNE: tl.constexpr, PELO: tl.constexpr):  # fmt: skip
    """Bucket of ``xn`` in a pair-record table (``launch._pair_tables``) and the number of
    low bits of ``xn`` it leaves (its cell: ``pairs.cell_bits``; 23 - PNE for the uniform
    index, which has no cells and does not use it).

    PLAY=0 (uniform): ``RN(xn K + K)`` clamped to ``[0, 2K]``, by a magic-number FMA.
    PLAY=2 (log): ``_bucket_index`` with 2^PNE buckets per binade from 2^-PELO, PNB / 2 per
    sign (a float clamp and integer operations).
    PLAY=1 (per-binade): the exponent field of ``|xn|`` (clamped to the table's binades, one
    bucket below and above them) and the sign select a word of ``lay`` holding the binade's
    first bucket and how many mantissa bits it resolves (PNE is a power of two; ``lay`` is
    read from a shared-memory copy with SMEM).
    """
    if PLAY != 1:
        if PLAY == 0:
            f = tl.fma(xn, PK, PK + 8388608.0)
            f = tl.minimum(tl.maximum(f, 8388608.0), 8388608.0 + (PNB - 1))
            idx = f.to(tl.int32, bitcast=True) - 0x4B000000
        else:
            idx = _bucket_index(xn, PNE, PELO, PNB // 2)
        low = tl.zeros_like(idx) + (23 - PNE)
    else:
        xb = xn.to(tl.int32, bitcast=True)
        mag = xb & 0x7FFFFFFF
        e = tl.minimum(tl.maximum(mag >> 23, PELO - 1), PELO + PNE - 2)
        li = e - (PELO - 1) + ((xb >> 31) & PNE)
        if SMEM:
            p = _smem_gather(tl.load(lay_ptr + tl.arange(0, 2 * PNE)), li)
        else:
            p = tl.load(lay_ptr + li)
        low = p & 31
        idx = (p >> 5) + ((mag & 0x7FFFFF) >> low)
    return idx, low


@triton.jit
def _pair_record(xn, rec_ptr, lay_ptr, SMEM: tl.constexpr, NTAB: tl.constexpr,
                 PLAY: tl.constexpr, PK: tl.constexpr, PNB: tl.constexpr, PNE: tl.constexpr,
                 PELO: tl.constexpr):  # fmt: skip
    """The record of ``xn``'s bucket, from global memory or a shared-memory copy, and the
    low bits of its cell (``_pair_index``)."""
    idx, low = _pair_index(xn, lay_ptr, SMEM, PLAY, PK, PNB, PNE, PELO)
    if SMEM:
        rec = _smem_gather(tl.load(rec_ptr + tl.arange(0, NTAB)), idx)
    else:
        rec = tl.load(rec_ptr + idx)
    return rec, low


@triton.jit
def _value(xn, tab_ptr, rec_ptr, btab_ptr, bhi_ptr, mid_ptr, cb_ptr, lay_ptr,
           FAMILY: tl.constexpr, AM: tl.constexpr, AEMIN: tl.constexpr, AVM: tl.constexpr,
           AV2: tl.constexpr, AHI: tl.constexpr, ALO: tl.constexpr,
           LOGP: tl.constexpr, REG_LEVELS: tl.constexpr, STEP: tl.constexpr,
           AXIS: tl.constexpr, SEARCH: tl.constexpr, BREF: tl.constexpr,
           BMLOW: tl.constexpr, BELOW: tl.constexpr, BNMAG: tl.constexpr, NTAB: tl.constexpr,
           PLAY: tl.constexpr, PK: tl.constexpr, PNB: tl.constexpr, PNE: tl.constexpr,
           PELO: tl.constexpr):  # fmt: skip
    """``cb[code]`` of normalized values (fake quantization), fp32. For FAMILY=3 the sign
    is carried as a bit: multiply by the scale with ``_scaled_output``."""
    if FAMILY == 1:
        _, lo, hi, up = _int_pair(xn, AM, AHI, ALO)
        v = tl.where(up, hi, lo)
    elif FAMILY == 2:
        _, _, _, _, _, lo, hi, up = _float_pair(xn, AVM, AV2, AM, AEMIN, AHI, ALO)
        v = tl.where(up, hi, lo)
    elif FAMILY == 4:
        q, sg = _pow2_rank(xn, AM)
        bits = tl.where(q == 0, 0, ((q + (127 - AM)) << 23) | (sg & -2147483648))
        v = bits.to(tl.float32, bitcast=True)
    elif FAMILY == 3:
        t, _, _ = _element_round(tl.abs(xn), AVM, AM, AEMIN)
        v = (t.to(tl.int32, bitcast=True) | (xn.to(tl.int32, bitcast=True) & -2147483648)).to(
            tl.float32, bitcast=True
        )
    elif SEARCH >= 4:
        rec, _ = _pair_record(xn, rec_ptr, lay_ptr, SEARCH == 5, NTAB, PLAY, PK, PNB, PNE, PELO)
        lo = rec.to(tl.int32).to(tl.float32, bitcast=True)
        hi = (rec >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        v = tl.where(xn > (lo + hi) * 0.5, hi, lo)
    else:
        v = _levels(
            xn, tab_ptr, rec_ptr, btab_ptr, bhi_ptr, mid_ptr, cb_ptr, LOGP, REG_LEVELS, STEP,
            AXIS, SEARCH, BREF, BMLOW, BELOW, BNMAG, NTAB,
        )  # fmt: skip
    return v


@triton.jit
def _scaled_output(v, s, FAMILY: tl.constexpr):
    """``v * s`` in fp32; for FAMILY=3 as ``fma(v, s, +0)`` so that a negative value rounded to
    zero gives +0 like the reference's ``grid[zero] * s``."""
    if FAMILY == 3:  # noqa: SIM108 (constexpr branch, resolved when compiling)
        y = tl.fma(v, tl.broadcast_to(s, v.shape), 0.0)
    else:
        y = v * s
    return y


@triton.jit
def _code(xn, tab_ptr, rec_ptr, btab_ptr, mid_ptr, lay_ptr,
          FAMILY: tl.constexpr, AM: tl.constexpr, AEMIN: tl.constexpr, AVM: tl.constexpr,
          AV2: tl.constexpr, AHI: tl.constexpr, ALO: tl.constexpr, AZERO: tl.constexpr,
          ALAST: tl.constexpr,
          LOGP: tl.constexpr, REG_LEVELS: tl.constexpr, STEP: tl.constexpr,
          AXIS: tl.constexpr, SEARCH: tl.constexpr, BREF: tl.constexpr,
          BMLOW: tl.constexpr, BELOW: tl.constexpr, BNMAG: tl.constexpr, NTAB: tl.constexpr,
          PLAY: tl.constexpr, PK: tl.constexpr, PNB: tl.constexpr, PNE: tl.constexpr,
          PELO: tl.constexpr):  # fmt: skip
    """Integer codes (positions in the sorted codebook) of normalized values.

    FAMILY=1 with SEARCH=5: j from ``_int_index`` and the midpoint ``mid[j]`` read from a
    shared-memory copy of the NTAB-entry table at ``mid_ptr`` (one conflict-free read for
    k <= 5) instead of computed from both neighbours (8 instructions)."""
    if FAMILY == 1 and SEARCH == 5:
        j = _int_index(xn, AM).to(tl.int32, bitcast=True) - 0x4B000000
        mid = _smem_gather(tl.load(mid_ptr + tl.arange(0, NTAB)), j)
        code = j + (xn > mid).to(tl.int32)
    elif FAMILY == 1:
        jf, _, _, up = _int_pair(xn, AM, AHI, ALO)
        code = (jf.to(tl.int32, bitcast=True) - 0x4B000000) + up.to(tl.int32)
    elif FAMILY == 2:
        sm, ec, cb, wb, down, _, _, up = _float_pair(xn, AVM, AV2, AM, AEMIN, AHI, ALO)
        code = _float_code(sm, ec, cb, wb, down, up, AM, AEMIN, AZERO, ALAST)
    elif FAMILY == 4:
        q, sg = _pow2_rank(xn, AM)
        code = AM + ((q ^ sg) - sg)
    elif FAMILY == 3:
        _, sm, ec = _element_round(tl.abs(xn), AVM, AM, AEMIN)
        mag = _element_rank(sm, ec, AM, AEMIN)
        neg = xn.to(tl.int32, bitcast=True) >> 31
        code = AZERO + ((mag ^ neg) - neg)
    elif SEARCH >= 4:
        rec, low = _pair_record(xn, btab_ptr, lay_ptr, SEARCH == 5, NTAB, PLAY, PK, PNB, PNE,
                                PELO)  # fmt: skip
        if btab_ptr.dtype.element_ty == tl.int32:  # cell records (``pairs.PairTables.pack32``)
            xb = xn.to(tl.int32, bitcast=True)
            code = (rec + ((xb ^ (xb >> 31)) & ((1 << low) - 1))) >> low
        else:
            mid = rec.to(tl.int32).to(tl.float32, bitcast=True)
            code = (rec >> 32).to(tl.int32) + (xn > mid).to(tl.int32)
    else:
        code = _codes(
            xn, tab_ptr, rec_ptr, btab_ptr, mid_ptr, LOGP, REG_LEVELS, STEP, AXIS,
            SEARCH, BREF, BMLOW, BELOW, BNMAG, NTAB,
        )  # fmt: skip
    return code


@triton.jit
def _pack_groups(code, K: tl.constexpr, AXIS: tl.constexpr):
    """Integer codes with a last axis of 8 (index AXIS) -> words, code j at bits
    [j*K, (j+1)*K): int32 for K <= 4 (32-bit shifts and adds are single instructions), else
    int64 (K = 8 from two int32 halves). The bit fields are disjoint, so the sum is the
    bitwise or."""
    if K <= 4:
        word = tl.sum(code << (tl.arange(0, 8) * K), axis=AXIS)
    elif K == 8:  # two 32-bit halves: a shift-and-add per code (LEA), no 64-bit shifts or adds
        j = tl.arange(0, 8)
        part = code << ((j % 4) * 8)
        lo = tl.sum(tl.where(j < 4, part, 0), axis=AXIS)
        hi = tl.sum(tl.where(j >= 4, part, 0), axis=AXIS)
        word = (hi.to(tl.int64) << 32) | (lo.to(tl.int64) & 0xFFFFFFFF)
    else:
        shifts = (tl.arange(0, 8) * K).to(tl.int64)
        word = tl.sum(code.to(tl.int64) << shifts, axis=AXIS)
    return word


@triton.jit
def _chunk_part(g, D: tl.constexpr, GB: tl.constexpr, WB: tl.constexpr):
    """The bits of a GB-bit group that start D bits after a WB-bit word's first bit (D < 0:
    the group began in an earlier word), shifted to their place in that word; 0 if none."""
    if D >= 0 and D < WB:
        part = g << D
    elif D < 0 and D > -GB:
        part = g >> -D
    else:
        part = tl.zeros_like(g)
    return part


@triton.jit
def _chunk_out(g0, g1, g2, g3, W: tl.constexpr, K: tl.constexpr, WB: tl.constexpr):
    """Word ``W`` (WB bits; the caller's cast truncates) of the bitstream of four groups of 8
    K-bit codes, each given as one integer of 8 K bits (``_pack_groups``)."""
    GB: tl.constexpr = 8 * K
    word = _chunk_part(g0, -WB * W, GB, WB) | _chunk_part(g1, GB - WB * W, GB, WB)
    word |= _chunk_part(g2, 2 * GB - WB * W, GB, WB) | _chunk_part(g3, 3 * GB - WB * W, GB, WB)
    return word


@triton.jit
def fused_fake_kernel(
    x_ptr, out_ptr, tab_ptr, rec_ptr, btab_ptr, bhi_ptr, mid_ptr, cb_ptr, lay_ptr, gd_ptr, n,
    B: tl.constexpr, BP: tl.constexpr, ROWS: tl.constexpr,
    FAMILY: tl.constexpr, AM: tl.constexpr, AEMIN: tl.constexpr, AVM: tl.constexpr,
    AV2: tl.constexpr, AHI: tl.constexpr, ALO: tl.constexpr, AZERO: tl.constexpr,
    ALAST: tl.constexpr,
    LOGP: tl.constexpr, REG_LEVELS: tl.constexpr, STEP: tl.constexpr, SEARCH: tl.constexpr,
    BREF: tl.constexpr, BMLOW: tl.constexpr, BELOW: tl.constexpr, BNMAG: tl.constexpr,
    NTAB: tl.constexpr, PLAY: tl.constexpr, PK: tl.constexpr, PNB: tl.constexpr,
    PNE: tl.constexpr, PELO: tl.constexpr,
    SCALE_DT: tl.constexpr, EMAX: tl.constexpr, DIV: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """Fake quantization, one program = ROWS whole blocks of B values (padded to BP columns)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BP)
    offs = rows[:, None] * B + cols[None, :]
    if MASKED:
        mask = (cols[None, :] < B) & (offs < n)
        xin = tl.load(x_ptr + offs, mask=mask, other=0)
    else:
        xin = tl.load(x_ptr + offs)
    x = _to_f32(xin)
    if xin.dtype == tl.float16:  # exact in fp16, two values per instruction
        absmax = tl.max(tl.abs(xin), axis=1).to(tl.float32)
    else:
        absmax = tl.max(tl.abs(x), axis=1)
    s, stored = _block_scale(absmax, gd_ptr, SCALE_DT, EMAX)
    sd, r, k = _reciprocal(s, stored, DIV)
    xn = _divide(x, sd[:, None], r[:, None], k[:, None], gd_ptr, DIV)
    v = _value(
        xn, tab_ptr, rec_ptr, btab_ptr, bhi_ptr, mid_ptr, cb_ptr, lay_ptr,
        FAMILY, AM, AEMIN, AVM, AV2, AHI, ALO, LOGP, REG_LEVELS, STEP, 2, SEARCH, BREF, BMLOW,
        BELOW, BNMAG, NTAB, PLAY, PK, PNB, PNE, PELO,
    )  # fmt: skip
    y = _to_out(_scaled_output(v, s[:, None], FAMILY), out_ptr.dtype.element_ty)
    if MASKED:
        tl.store(out_ptr + offs, y, mask=mask)
    else:
        tl.store(out_ptr + offs, y)


@triton.jit
def fused_pack_kernel(
    x_ptr, out_ptr, scale_ptr, tab_ptr, rec_ptr, btab_ptr, mid_ptr, lay_ptr,
    gd_ptr, n, nblocks, nunits, ntiles,
    B: tl.constexpr, BP: tl.constexpr, ROWS: tl.constexpr,
    FAMILY: tl.constexpr, AM: tl.constexpr, AEMIN: tl.constexpr, AVM: tl.constexpr,
    AV2: tl.constexpr, AHI: tl.constexpr, ALO: tl.constexpr, AZERO: tl.constexpr,
    ALAST: tl.constexpr,
    LOGP: tl.constexpr, REG_LEVELS: tl.constexpr, STEP: tl.constexpr, SEARCH: tl.constexpr,
    BREF: tl.constexpr, BMLOW: tl.constexpr, BELOW: tl.constexpr, BNMAG: tl.constexpr,
    NTAB: tl.constexpr, PLAY: tl.constexpr, PK: tl.constexpr, PNB: tl.constexpr,
    PNE: tl.constexpr, PELO: tl.constexpr,
    SCALE_DT: tl.constexpr, EMAX: tl.constexpr, DIV: tl.constexpr,
    K: tl.constexpr, KP: tl.constexpr, WORDS: tl.constexpr, MASKED: tl.constexpr,
    SUB: tl.constexpr, LANES: tl.constexpr, FLAT: tl.constexpr, CHUNK: tl.constexpr,
    SPLIT: tl.constexpr, FLAG: tl.constexpr,
):  # fmt: skip
    """Block scales and packed codes; the tile is [ROWS, BP // 8, 8] (B % 8 == 0), so each
    group of 8 codes is packed without moving data between threads.

    FLAG (NVFP4, whose division shortcut a device-side check allows per tensor: ``gd[2]``,
    ``nv_scale_kernel``): 1, the program returns at once where the check refuses the
    shortcut (DIV=1); 2, the launch is the fallback (DIV=0): a small grid whose programs
    return at once where the check allows it and otherwise loop over all ``ntiles`` tiles.
    Two launches keep the per-value div_rn out of the fast kernel, whose registers would
    otherwise be the maximum over both paths (``KernelConfig.nv_pack_split``).

    WORDS=True (k = 2, 4, 8): ``out_ptr`` is the byte buffer viewed as int{2k}, one element per
    group, so a group is one store. CHUNK=1 (other k, B % 32 == 0): the four groups of 32
    consecutive codes are stored as k int32 words (k = 6: three int64; ``out_ptr`` viewed so,
    ``nunits`` its length; ``KernelConfig.pack_word_chunks``). Otherwise the k bytes of a
    group are stored as pieces of SUB bits (``out_ptr`` viewed as int16 for k = 6, as bytes
    for odd k; KP: their number per group, padded to a power of two); ``nunits`` is the
    length of that view that holds the packed bytes.
    LANES=1: each packed word is stored by the thread that packed it, 4 bytes wide, instead
    of being moved to a 16-byte store layout (``KernelConfig.pack_lanes``). FLAT=1: the tile
    is loaded as [ROWS, BP] and viewed as [ROWS, BP // 8, 8] (``KernelConfig.pack_flat``).
    SPLIT > 1: a block spans SPLIT consecutive rows of B values (``KernelConfig.pack_split``):
    the rows' absmax is combined over each block's rows and its scale stored from the first.
    The default packing kernel: ``fused_pack_chunk_kernel`` (``KernelConfig.pack_chunks``)
    issues fewer instructions but measured slower on an H200 (its loads are not coalesced).
    """
    if FLAG == 2:
        if tl.load(gd_ptr + 2) != 0.0:
            for t in range(tl.program_id(0), ntiles, tl.num_programs(0)):
                _pack_tile(
                    tl.cast(t, tl.int64), x_ptr, out_ptr, scale_ptr, tab_ptr, rec_ptr, btab_ptr,
                    mid_ptr, lay_ptr, gd_ptr, n, nblocks, nunits, B, BP, ROWS, FAMILY, AM,
                    AEMIN, AVM, AV2, AHI, ALO, AZERO, ALAST, LOGP, REG_LEVELS, STEP, SEARCH,
                    BREF, BMLOW, BELOW, BNMAG, NTAB, PLAY, PK, PNB, PNE, PELO, SCALE_DT, EMAX,
                    DIV, K, KP, WORDS, MASKED, SUB, LANES, FLAT, CHUNK, SPLIT,
                )  # fmt: skip
    else:
        go = True
        if FLAG == 1:
            go = tl.load(gd_ptr + 2) == 0.0
        if go:
            _pack_tile(
                tl.program_id(0).to(tl.int64), x_ptr, out_ptr, scale_ptr, tab_ptr, rec_ptr,
                btab_ptr, mid_ptr, lay_ptr, gd_ptr, n, nblocks, nunits, B, BP, ROWS, FAMILY, AM,
                AEMIN, AVM, AV2, AHI, ALO, AZERO, ALAST, LOGP, REG_LEVELS, STEP, SEARCH, BREF,
                BMLOW, BELOW, BNMAG, NTAB, PLAY, PK, PNB, PNE, PELO, SCALE_DT, EMAX, DIV, K, KP,
                WORDS, MASKED, SUB, LANES, FLAT, CHUNK, SPLIT,
            )  # fmt: skip


@triton.jit
def _pack_tile(
    pid, x_ptr, out_ptr, scale_ptr, tab_ptr, rec_ptr, btab_ptr, mid_ptr, lay_ptr,
    gd_ptr, n, nblocks, nunits,
    B: tl.constexpr, BP: tl.constexpr, ROWS: tl.constexpr,
    FAMILY: tl.constexpr, AM: tl.constexpr, AEMIN: tl.constexpr, AVM: tl.constexpr,
    AV2: tl.constexpr, AHI: tl.constexpr, ALO: tl.constexpr, AZERO: tl.constexpr,
    ALAST: tl.constexpr,
    LOGP: tl.constexpr, REG_LEVELS: tl.constexpr, STEP: tl.constexpr, SEARCH: tl.constexpr,
    BREF: tl.constexpr, BMLOW: tl.constexpr, BELOW: tl.constexpr, BNMAG: tl.constexpr,
    NTAB: tl.constexpr, PLAY: tl.constexpr, PK: tl.constexpr, PNB: tl.constexpr,
    PNE: tl.constexpr, PELO: tl.constexpr,
    SCALE_DT: tl.constexpr, EMAX: tl.constexpr, DIV: tl.constexpr,
    K: tl.constexpr, KP: tl.constexpr, WORDS: tl.constexpr, MASKED: tl.constexpr,
    SUB: tl.constexpr, LANES: tl.constexpr, FLAT: tl.constexpr, CHUNK: tl.constexpr,
    SPLIT: tl.constexpr,
):  # fmt: skip
    """Tile ``pid`` of ``fused_pack_kernel``."""
    rows = pid * ROWS + tl.arange(0, ROWS)
    grp = tl.arange(0, BP // 8)
    col = grp[None, :, None] * 8 + tl.arange(0, 8)[None, None, :]
    offs = rows[:, None, None] * B + col
    if MASKED:
        mask = (col < B) & (offs < n)
    if FLAT:  # a 2-D load: the only contiguous axis orders the threads along the row
        offs2 = rows[:, None] * B + tl.arange(0, BP)[None, :]
        if MASKED:
            mask2 = (tl.arange(0, BP)[None, :] < B) & (offs2 < n)
            xin = tl.reshape(tl.load(x_ptr + offs2, mask=mask2, other=0), [ROWS, BP // 8, 8])
        else:
            xin = tl.reshape(tl.load(x_ptr + offs2), [ROWS, BP // 8, 8])
    elif MASKED:
        xin = tl.load(x_ptr + offs, mask=mask, other=0)
    else:
        xin = tl.load(x_ptr + offs)
    x = _to_f32(xin)
    if xin.dtype == tl.float16:  # exact in fp16, two values per instruction
        absmax = tl.max(tl.max(tl.abs(xin), axis=2), axis=1).to(tl.float32)
    else:
        absmax = tl.max(tl.max(tl.abs(x), axis=2), axis=1)
    if SPLIT > 1:  # every row of a block gets the block's absmax
        blk = tl.max(tl.reshape(absmax, [ROWS // SPLIT, SPLIT]), axis=1)
        absmax = tl.reshape(tl.broadcast_to(blk[:, None], [ROWS // SPLIT, SPLIT]), [ROWS])
    s, stored = _block_scale(absmax, gd_ptr, SCALE_DT, EMAX)
    sd, r, k = _reciprocal(s, stored, DIV)
    xn = _divide(x, sd[:, None, None], r[:, None, None], k[:, None, None], gd_ptr, DIV)
    code = _code(
        xn, tab_ptr, rec_ptr, btab_ptr, mid_ptr, lay_ptr,
        FAMILY, AM, AEMIN, AVM, AV2, AHI, ALO, AZERO, ALAST, LOGP, REG_LEVELS, STEP, 3, SEARCH,
        BREF, BMLOW, BELOW, BNMAG, NTAB, PLAY, PK, PNB, PNE, PELO,
    )  # fmt: skip
    st = _to_out(stored, scale_ptr.dtype.element_ty)
    first = rows % SPLIT == 0  # the row that stores its block's scale
    if MASKED:
        code = tl.where(mask, code, 0)
        tl.store(scale_ptr + rows // SPLIT, st, mask=first & (rows // SPLIT < nblocks))
    elif SPLIT > 1:
        tl.store(scale_ptr + rows // SPLIT, st, mask=first)
    else:
        tl.store(scale_ptr + rows, st)
    words = _pack_groups(code, K, 2)
    gidx = rows[:, None] * (B // 8) + grp[None, :]
    if LANES:  # contiguity 1: each word stays with the thread that packed it
        gidx = tl.max_contiguous(gidx, [1, 1])
    if WORDS:
        w = words.to(out_ptr.dtype.element_ty)
        if MASKED:
            tl.store(out_ptr + gidx, w, mask=(grp[None, :] * 8 < B) & (gidx * 8 < n))
        else:
            tl.store(out_ptr + gidx, w)
    elif CHUNK:  # four groups (32 codes, 4 K bytes) as K int32 words, or K / 2 int64
        ev, od = tl.split(tl.reshape(words, [ROWS, BP // 32, 2, 2]))
        g0, g2 = tl.split(ev)
        g1, g3 = tl.split(od)
        WB: tl.constexpr = 32 if K % 2 else 64
        NW: tl.constexpr = 4 * K * 8 // WB
        ch = tl.arange(0, BP // 32)
        cidx = (rows[:, None] * (B // 32) + ch[None, :]) * NW
        for w in tl.static_range(NW):
            word = _chunk_out(g0, g1, g2, g3, w, K, WB).to(out_ptr.dtype.element_ty)
            if MASKED:
                ok = (ch[None, :] * 32 < B) & (cidx + w < nunits)
                tl.store(out_ptr + cidx + w, word, mask=ok)
            else:
                tl.store(out_ptr + cidx + w, word)
    else:  # a group's K bytes as K * 8 / SUB pieces of SUB bits (16 where K is even)
        b = tl.arange(0, KP)
        piece = (words[:, :, None] >> (b * SUB).to(words.dtype)[None, None, :]) & (2**SUB - 1)
        pos = gidx[:, :, None] * (K * 8 // SUB) + b[None, None, :]
        ok = (b[None, None, :] * SUB < K * 8) & (grp[None, :, None] * 8 < B) & (pos < nunits)
        tl.store(out_ptr + pos, piece.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _chunk_word(code, pos, W: tl.constexpr, WB: tl.constexpr, K: tl.constexpr):
    """Word ``W`` of a chunk's bitstream, as int32 (its low ``WB`` bits; the caller's store
    truncates): bits [WB W, WB (W + 1)) of the codes at bit positions ``pos`` (a code that
    straddles the word's start contributes its high bits). The shift amounts and selects are
    constants per register, so what remains per code is a shift and an add (or one LEA)."""
    d = pos - WB * W
    inside = (d >= 0) & (d < WB)
    left = code << tl.where(inside, d, 0)
    tail = (d < 0) & (d > -K)
    right = code >> tl.where(tail, -d, 0)
    part = tl.where(inside, left, tl.where(tail, right, 0))
    return tl.sum(tl.sum(part, axis=3), axis=0)


@triton.jit
def fused_pack_chunk_kernel(
    x_ptr, out_ptr, scale_ptr, tab_ptr, rec_ptr, btab_ptr, mid_ptr, lay_ptr,
    gd_ptr, n, nblocks, nbytes,
    B: tl.constexpr, BP: tl.constexpr, ROWS: tl.constexpr,
    FAMILY: tl.constexpr, AM: tl.constexpr, AEMIN: tl.constexpr, AVM: tl.constexpr,
    AV2: tl.constexpr, AHI: tl.constexpr, ALO: tl.constexpr, AZERO: tl.constexpr,
    ALAST: tl.constexpr,
    LOGP: tl.constexpr, REG_LEVELS: tl.constexpr, STEP: tl.constexpr, SEARCH: tl.constexpr,
    BREF: tl.constexpr, BMLOW: tl.constexpr, BELOW: tl.constexpr, BNMAG: tl.constexpr,
    NTAB: tl.constexpr, PLAY: tl.constexpr, PK: tl.constexpr, PNB: tl.constexpr,
    PNE: tl.constexpr, PELO: tl.constexpr,
    SCALE_DT: tl.constexpr, EMAX: tl.constexpr, DIV: tl.constexpr,
    K: tl.constexpr, CG: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """``fused_pack_kernel`` with each thread holding chunks of ``CG`` consecutive groups
    (B % (8 CG) == 0; CG = 4 or 2): the tile is [CG, ROWS, BP // (8 CG), 8] (group within the
    chunk, block, chunk, value) and Triton keeps the short leading axis in registers, so a
    chunk's 8 CG codes are K whole words of 8 CG bits (``out_ptr``: the byte buffer viewed as
    int32 or int16), stored without byte stores or layout conversions. The block scale is
    stored from the words' layout (by the thread of the row's first chunk) for the same
    reason. Every thread reads 16 CG contiguous bytes (CG vector loads), not one vector of a
    fully coalesced warp-wide run as in ``fused_pack_kernel``: the same bytes from DRAM, more
    L1 wavefronts per load."""
    pid = tl.program_id(0).to(tl.int64)
    WB: tl.constexpr = 8 * CG  # bits per word: 8 CG codes of K bits are K words
    NC: tl.constexpr = BP // WB  # chunks per (padded) row
    rows = pid * ROWS + tl.arange(0, ROWS)
    grp = tl.arange(0, CG)[:, None, None, None]
    ch = tl.arange(0, NC)
    j = tl.arange(0, 8)[None, None, None, :]
    col = ch[None, None, :, None] * WB + grp * 8 + j
    offs = rows[None, :, None, None] * B + col
    if MASKED:
        mask = (col < B) & (offs < n)
        xin = tl.load(x_ptr + offs, mask=mask, other=0)
    else:
        xin = tl.load(x_ptr + offs)
    x = _to_f32(xin)
    if xin.dtype == tl.float16:  # exact in fp16, two values per instruction
        absmax = tl.max(tl.max(tl.max(tl.abs(xin), axis=3), axis=0), axis=1).to(tl.float32)
    else:
        absmax = tl.max(tl.max(tl.max(tl.abs(x), axis=3), axis=0), axis=1)
    s, stored = _block_scale(absmax, gd_ptr, SCALE_DT, EMAX)
    sd, r, k = _reciprocal(s, stored, DIV)
    xn = _divide(
        x, sd[None, :, None, None], r[None, :, None, None], k[None, :, None, None], gd_ptr, DIV
    )
    code = _code(
        xn, tab_ptr, rec_ptr, btab_ptr, mid_ptr, lay_ptr,
        FAMILY, AM, AEMIN, AVM, AV2, AHI, ALO, AZERO, ALAST, LOGP, REG_LEVELS, STEP, 4, SEARCH,
        BREF, BMLOW, BELOW, BNMAG, NTAB, PLAY, PK, PNB, PNE, PELO,
    )  # fmt: skip
    widx = (rows[:, None] * (B // WB) + ch[None, :]) * K  # the chunk's first word
    # the scale pointer as a function of widx (row = widx // (K B / WB) where ch == 0): a
    # pointer in rows alone is contiguous along them, and Triton would store it from another
    # layout (a shared-memory round trip and a barrier)
    st = tl.broadcast_to(_to_out(stored, scale_ptr.dtype.element_ty)[:, None], (ROWS, NC))
    sptr = scale_ptr + widx // (K * (B // WB))
    if MASKED:
        code = tl.where(mask, code, 0)
        tl.store(sptr, st, mask=(ch[None, :] == 0) & (rows[:, None] < nblocks))
    else:
        tl.store(sptr, st, mask=ch[None, :] == 0)
    pos = (grp * 8 + j) * K
    for w in tl.static_range(K):
        word = _chunk_word(code, pos, w, WB, K).to(out_ptr.dtype.element_ty)
        if MASKED:
            ok = (ch[None, :] * WB < B) & ((widx + w) * CG < nbytes)
            tl.store(out_ptr + widx + w, word, mask=ok)
        else:
            tl.store(out_ptr + widx + w, word)


@triton.jit
def absmax_partial_kernel(x_ptr, part_ptr, n, block, nchunks, C: tl.constexpr):
    """Absmax of chunk ``pid % nchunks`` of block ``pid // nchunks`` (first pass, large blocks)."""
    pid = tl.program_id(0).to(tl.int64)
    blk = pid // nchunks
    col = (pid % nchunks) * C + tl.arange(0, C)
    offs = blk * block + col
    x = _to_f32(tl.load(x_ptr + offs, mask=(col < block) & (offs < n), other=0))
    tl.store(part_ptr + pid, tl.max(tl.abs(x), axis=0))


@triton.jit
def _block_index(offs, block, BLOG: tl.constexpr):
    if BLOG >= 0:
        return offs >> BLOG
    else:
        return offs // block


@triton.jit
def flat_kernel(
    x_ptr, out_ptr, s_ptr, tab_ptr, rec_ptr, btab_ptr, bhi_ptr, mid_ptr, cb_ptr, lay_ptr,
    n, block, nbytes,
    G: tl.constexpr, BLOG: tl.constexpr,
    FAMILY: tl.constexpr, AM: tl.constexpr, AEMIN: tl.constexpr, AVM: tl.constexpr,
    AV2: tl.constexpr, AHI: tl.constexpr, ALO: tl.constexpr, AZERO: tl.constexpr,
    ALAST: tl.constexpr,
    LOGP: tl.constexpr, REG_LEVELS: tl.constexpr, STEP: tl.constexpr, SEARCH: tl.constexpr,
    BREF: tl.constexpr, BMLOW: tl.constexpr, BELOW: tl.constexpr, BNMAG: tl.constexpr,
    NTAB: tl.constexpr, PLAY: tl.constexpr, PK: tl.constexpr, PNB: tl.constexpr,
    PNE: tl.constexpr, PELO: tl.constexpr,
    PACK: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
):  # fmt: skip
    """Second pass with precomputed fp32 scales: G groups of 8 consecutive values per program.
    The division is ``div_rn`` (exact for every scale, MX powers of two included)."""
    pid = tl.program_id(0).to(tl.int64)
    g = pid * G + tl.arange(0, G)
    j = tl.arange(0, 8)
    offs = g[:, None] * 8 + j[None, :]
    mask = offs < n
    x = _to_f32(tl.load(x_ptr + offs, mask=mask, other=0))
    s = tl.load(s_ptr + _block_index(offs, block, BLOG), mask=mask, other=0.0)
    xn = _divide(x, s, s, s, s_ptr, 0)
    if not PACK:
        v = _value(
            xn, tab_ptr, rec_ptr, btab_ptr, bhi_ptr, mid_ptr, cb_ptr, lay_ptr,
            FAMILY, AM, AEMIN, AVM, AV2, AHI, ALO, LOGP, REG_LEVELS, STEP, 2, SEARCH, BREF, BMLOW,
            BELOW, BNMAG, NTAB, PLAY, PK, PNB, PNE, PELO,
        )  # fmt: skip
        y = _to_out(_scaled_output(v, s, FAMILY), out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs, y, mask=mask)
    else:
        code = _code(
            xn, tab_ptr, rec_ptr, btab_ptr, mid_ptr, lay_ptr,
            FAMILY, AM, AEMIN, AVM, AV2, AHI, ALO, AZERO, ALAST, LOGP, REG_LEVELS, STEP, 2, SEARCH,
            BREF, BMLOW, BELOW, BNMAG, NTAB, PLAY, PK, PNB, PNE, PELO,
        )  # fmt: skip
        words = _pack_groups(tl.where(mask, code, 0), K, 1)
        b = tl.arange(0, KP)
        byte = ((words[:, None] >> (b * 8).to(words.dtype)[None, :]) & 255).to(tl.uint8)
        pos = g[:, None] * K + b[None, :]
        tl.store(out_ptr + pos, byte, mask=(b[None, :] < K) & (pos < nbytes))


@triton.jit
def nv_absmax_kernel(x_ptr, gd_ptr, n, C: tl.constexpr):
    """NVFP4's tensor absmax, first pass: the absmax of C values per program (one load, so
    that all of a program's reads are in flight at once) raised into ``gd[3]`` by an atomic
    max (non-negative fp32), NaNs counted into ``gd[4]`` (``gd`` zeroed before)."""
    offs = tl.program_id(0).to(tl.int64) * C + tl.arange(0, C)
    a = tl.abs(_to_f32(tl.load(x_ptr + offs, mask=offs < n, other=0)))
    tl.atomic_max(gd_ptr + 3, tl.max(tl.where(a != a, 0.0, a), axis=0))
    bad = tl.sum((a != a).to(tl.int32), axis=0)
    if bad > 0:
        tl.atomic_add(gd_ptr + 4, bad.to(tl.float32))


@triton.jit
def nv_scale_kernel(x_ptr, e_ptr, gd_ptr, min_mid, NX: tl.constexpr, CHECK: tl.constexpr):
    """NVFP4's global scale and division check, second pass (grid (126, values / NX), or
    (1, 1) without CHECK): ``g = amax / 2688`` and ``RN(6 g)`` into ``gd[0:2]`` (every
    program writes the same values), and into ``gd[2]`` the number of pairs (every
    non-negative value ``x`` of the input dtype, ascending in ``x_ptr``, up to the tensor's
    absmax, against the block scale ``e[pid0] * g``) where the block-reciprocal division
    differs from ``div_rn`` by a quotient that reaches the element grid's smallest midpoint
    ``min_mid``: 0 allows the shortcut (``_divide``, DIV=4). Both divisions are odd in x
    (every step rounds to nearest even), so the negative values give the same verdict; a
    program whose first (smallest) value exceeds the bound checks nothing."""
    amax = tl.load(gd_ptr + 3 + tl.zeros([1], tl.int32))
    amax = tl.where(tl.load(gd_ptr + 4 + tl.zeros([1], tl.int32)) > 0, float("nan"), amax)
    g = tl.math.div_rn(amax, tl.full([1], 2688.0, tl.float32))
    denom = g * 6.0
    first = tl.zeros([1], tl.int32) + tl.program_id(0) + tl.program_id(1) == 0
    tl.store(gd_ptr + tl.arange(0, 1), g, mask=first)
    tl.store(gd_ptr + 1 + tl.arange(0, 1), denom, mask=first)
    lim = g * 2688.0025634765625  # 448 * 6 * (1 + 2^-20): no block holds larger |x|
    if CHECK and _to_f32(tl.load(x_ptr + tl.program_id(1) * NX)) <= tl.max(lim, axis=0):
        s = tl.load(e_ptr + tl.program_id(0) + tl.zeros([1], tl.int32)) * g
        x = _to_f32(tl.load(x_ptr + tl.program_id(1) * NX + tl.arange(0, NX)))
        sd, r, k = _reciprocal(s, s, 1)
        fast = _divide(x, sd, r, k, gd_ptr, 1)  # DIV_RECIP
        ref = _divide(x, s, s, s, gd_ptr, 0)  # DIV_EXACT
        diff = fast.to(tl.int32, bitcast=True) != ref.to(tl.int32, bitcast=True)
        diff = diff & ((fast != 0.0) | (ref != 0.0)) & (tl.abs(x) <= lim)
        diff = diff & (tl.maximum(tl.abs(fast), tl.abs(ref)) >= min_mid)
        tl.atomic_add(gd_ptr + 2, tl.sum(diff.to(tl.float32), axis=0))


@triton.jit
def division_check_kernel(x_ptr, s_ptr, lim_ptr, out_ptr, NX: tl.constexpr, DIV: tl.constexpr):
    """Division mode DIV against div_rn for scale ``s[pid0]`` and NX values of ``x``:
    adds the number of differing quotients (+0 and -0 count as equal) to ``out[0]`` and
    raises ``out[1]`` to the largest |quotient| among them; only ``|x| <= lim[pid0]`` count."""
    i = tl.program_id(0)
    s = tl.load(s_ptr + i + tl.zeros([1], tl.int32))
    lim = tl.load(lim_ptr + i + tl.zeros([1], tl.int32))
    x = _to_f32(tl.load(x_ptr + tl.program_id(1) * NX + tl.arange(0, NX)))
    sd, r, k = _reciprocal(s, s, DIV)
    fast = _divide(x, sd, r, k, s_ptr, DIV)
    ref = _divide(x, s, s, s, s_ptr, 0)
    diff = fast.to(tl.int32, bitcast=True) != ref.to(tl.int32, bitcast=True)
    diff = diff & ((fast != 0.0) | (ref != 0.0)) & (tl.abs(x) <= lim)
    big = tl.where(diff, tl.maximum(tl.abs(fast), tl.abs(ref)), 0.0)
    tl.atomic_add(out_ptr, tl.sum(diff.to(tl.float32), axis=0))
    tl.atomic_max(out_ptr + 1, tl.max(big, axis=0))


@triton.jit
def dequant_kernel(
    p_ptr,
    scale_ptr,
    cb_ptr,
    out_ptr,
    n,
    block,
    nbytes,
    G: tl.constexpr,
    BLOG: tl.constexpr,
    K: tl.constexpr,
    KP: tl.constexpr,
):
    """Unpack G groups of 8 codes (K bytes each) and write codebook[code] * scale."""
    pid = tl.program_id(0).to(tl.int64)
    g = pid * G + tl.arange(0, G)
    b = tl.arange(0, KP)
    pos = g[:, None] * K + b[None, :]
    raw = tl.load(p_ptr + pos, mask=(b[None, :] < K) & (pos < nbytes), other=0)
    words = tl.sum(raw.to(tl.int64) << (b * 8).to(tl.int64)[None, :], axis=1)
    j = tl.arange(0, 8)
    code = ((words[:, None] >> (j * K).to(tl.int64)[None, :]) & ((1 << K) - 1)).to(tl.int32)
    offs = g[:, None] * 8 + j[None, :]
    mask = offs < n
    s = tl.load(scale_ptr + _block_index(offs, block, BLOG), mask=mask, other=0.0)
    y = tl.load(cb_ptr + code) * s.to(tl.float32)
    tl.store(out_ptr + offs, _to_out(y, out_ptr.dtype.element_ty), mask=mask)
