"""Triton kernels for blockwise absmax k-bit quantization.

This module imports Triton at import time; ``kbit.kernels`` imports it lazily so that the rest
of the library works on machines without Triton. Every kernel reproduces the CPU reference bit
for bit:

* the block's absmax is rounded to the scale dtype (round-to-nearest-even after clamping to the
  largest finite value) and used as fp32 ``s``;
* ``xn = x / s`` is the IEEE round-to-nearest quotient: ``div_rn`` (Triton's plain fp32 ``/``
  lowers to an approximate division that can move a value across a midpoint), or, for fp16
  inputs with fp16 scales (``FASTDIV``), the same Newton/FMA sequence as the hardware's
  division fast path with the reciprocal computed once per block, checked against ``div_rn``
  on every fp16 value with every fp16 scale (``tests/test_kernels.py``);
* the code is the number of codebook midpoints strictly below ``xn`` (ties go to the lower
  code), found either by a branchless descent of the midpoints stored as a breadth-first search
  tree (``SEARCH=0``) or through a bucket table indexed by the bit pattern of ``xn``
  (``SEARCH=1, 2, 3``, see ``_bucket_index`` and ``_codes``);
* dequantization is ``codebook[code] * s`` in fp32, cast to the output dtype;
* packing is an LSB-first bitstream: code ``i`` occupies bits ``[i*k, (i+1)*k)``, so every group
  of 8 codes is exactly ``k`` bytes.

Kernels come in two shapes. The fused kernels view the tensor as rows of one block each and do
absmax, scale, search and output in a single read of ``x``: this is what makes fake quantization
memory-bound. The flat kernel takes precomputed fp32 scales (from ``absmax_partial_kernel``) and
handles what the fused tile cannot: blocks larger than one tile (per-tensor scaling) and packing
when the block size is not a multiple of 8.

Inputs must be finite (the reference rejects NaN and inf; the kernels do not check, for speed).
"""

from __future__ import annotations

import triton
import triton.language as tl

# Scale dtype selectors (constexpr): the rounding applied to a block's absmax.
SCALE_FP16 = 0
SCALE_BF16 = 1
SCALE_FP32 = 2


@triton.jit
def _round_scale(absmax, SCALE_DT: tl.constexpr):
    """absmax (fp32, >= 0) -> block scale rounded to the scale dtype, returned as fp32."""
    if SCALE_DT == 0:
        s = tl.minimum(absmax, 65504.0).to(tl.float16).to(tl.float32)
    elif SCALE_DT == 1:
        # Round-to-nearest-even to bf16 on the bit pattern: identical on every backend (the
        # interpreter's bf16 cast is not guaranteed to round), exact for finite inputs >= 0.
        s = _bf16_rne(tl.minimum(absmax, 3.3895313892515355e38))
    else:
        s = absmax
    return s


@triton.jit
def _bf16_rne(v):
    """fp32 -> nearest-even bf16 value, still as fp32 (bit arithmetic; no NaN inputs)."""
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _to_out(y, dtype: tl.constexpr):
    """Cast fp32 results to the output dtype with round-to-nearest-even on every backend."""
    if dtype == tl.bfloat16:
        y = _bf16_rne(y)
    return y.to(dtype)


@triton.jit
def _normalize(x, s):
    """x / s with IEEE rounding; 0 where the block scale is 0 (an all-zero block)."""
    s_b = tl.broadcast_to(s, x.shape)
    safe = tl.where(s_b == 0.0, 1.0, s_b)
    return tl.where(s_b == 0.0, 0.0, tl.math.div_rn(x, safe))


@triton.jit
def _recip(s):
    """Reciprocal of the block scales for ``_fast_div``: approximate, then one Newton step."""
    r0 = 1.0 / s
    return tl.fma(tl.fma(-s, r0, 1.0), r0, r0)


@triton.jit
def _fast_div(x, s, r):
    """x / s from r = _recip(s): q = x*r, then one FMA correction. Correctly rounded on the
    domain where it is used (fp16 x, fp16 s: checked exhaustively); 0 where s == 0."""
    q = x * r
    q = tl.fma(tl.fma(-s, q, x), r, q)
    return tl.where(s == 0.0, 0.0, q)


@triton.jit
def _scaled(x, s, FASTDIV: tl.constexpr):
    """x / s (s broadcast from fewer dims, same rank), by ``_fast_div`` or ``_normalize``."""
    if FASTDIV:  # noqa: SIM108 (constexpr branch, resolved when compiling)
        xn = _fast_div(x, s, _recip(s))
    else:
        xn = _normalize(x, s)
    return xn


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
    """Index of ``xn``'s bucket in a bucket table (``blockwise._Bucketing``; integer ops only).

    Magnitudes are cut into 2**BMLOW buckets per binade (the exponent and top BMLOW mantissa
    bits of ``|xn|``), from 2**-BELOW (smaller magnitudes join the first bucket: no midpoint
    but 0 lies there) up to BNMAG buckets (larger ones join the last). The table holds the
    negative buckets mirrored, then the positive ones, so it is sorted by value: bucket i of
    the sign of ``xn`` sits at ``BNMAG + i`` (positive) or ``BNMAG - 1 - i`` (negative).
    """
    xb = xn.to(tl.int32, bitcast=True)
    i = tl.maximum((xb & 0x7FFFFFFF) - ((127 - BELOW) << 23), 0) >> (23 - BMLOW)
    i = tl.minimum(i, BNMAG - 1)
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
def _pack_groups(code, K: tl.constexpr, AXIS: tl.constexpr):
    """Integer codes with a last axis of 8 (index AXIS) -> int64 words, code j at bits
    [j*K, (j+1)*K). The bit fields are disjoint, so the sum is the bitwise or."""
    shifts = (tl.arange(0, 8) * K).to(tl.int64)
    return tl.sum(code.to(tl.int64) << shifts, axis=AXIS)


@triton.jit
def fused_fake_kernel(
    x_ptr,
    out_ptr,
    tab_ptr,
    rec_ptr,
    btab_ptr,
    bhi_ptr,
    mid_ptr,
    cb_ptr,
    n,
    B: tl.constexpr,
    BP: tl.constexpr,
    ROWS: tl.constexpr,
    LOGP: tl.constexpr,
    REG_LEVELS: tl.constexpr,
    STEP: tl.constexpr,
    SEARCH: tl.constexpr,
    BREF: tl.constexpr,
    BMLOW: tl.constexpr,
    BELOW: tl.constexpr,
    BNMAG: tl.constexpr,
    NTAB: tl.constexpr,
    SCALE_DT: tl.constexpr,
    FASTDIV: tl.constexpr,
    MASKED: tl.constexpr,
):
    """Fake quantization, one program = ROWS whole blocks of B values (padded to BP columns)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BP)
    offs = rows[:, None] * B + cols[None, :]
    if MASKED:
        mask = (cols[None, :] < B) & (offs < n)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        x = tl.load(x_ptr + offs).to(tl.float32)
    s = _round_scale(tl.max(tl.abs(x), axis=1), SCALE_DT)
    xn = _scaled(x, s[:, None], FASTDIV)
    v = _levels(
        xn, tab_ptr, rec_ptr, btab_ptr, bhi_ptr, mid_ptr, cb_ptr, LOGP, REG_LEVELS, STEP, 2,
        SEARCH, BREF, BMLOW, BELOW, BNMAG, NTAB,
    )  # fmt: skip
    y = _to_out(v * s[:, None], out_ptr.dtype.element_ty)
    if MASKED:
        tl.store(out_ptr + offs, y, mask=mask)
    else:
        tl.store(out_ptr + offs, y)


@triton.jit
def fused_pack_kernel(
    x_ptr,
    out_ptr,
    scale_ptr,
    tab_ptr,
    rec_ptr,
    btab_ptr,
    mid_ptr,
    n,
    nblocks,
    nbytes,
    B: tl.constexpr,
    BP: tl.constexpr,
    ROWS: tl.constexpr,
    LOGP: tl.constexpr,
    REG_LEVELS: tl.constexpr,
    STEP: tl.constexpr,
    SEARCH: tl.constexpr,
    BREF: tl.constexpr,
    BMLOW: tl.constexpr,
    BELOW: tl.constexpr,
    BNMAG: tl.constexpr,
    NTAB: tl.constexpr,
    SCALE_DT: tl.constexpr,
    FASTDIV: tl.constexpr,
    K: tl.constexpr,
    KP: tl.constexpr,
    WORDS: tl.constexpr,
    MASKED: tl.constexpr,
):
    """Block scales and packed codes; the tile is [ROWS, BP // 8, 8] (B % 8 == 0), so each
    group of 8 codes is packed without moving data between threads.

    WORDS=True (k = 2, 4, 8): ``out_ptr`` is the byte buffer viewed as int{2k}, one element per
    group, so a group is one store. Otherwise the k bytes of a group are stored one by one.
    """
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    grp = tl.arange(0, BP // 8)
    col = grp[None, :, None] * 8 + tl.arange(0, 8)[None, None, :]
    offs = rows[:, None, None] * B + col
    if MASKED:
        mask = (col < B) & (offs < n)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        x = tl.load(x_ptr + offs).to(tl.float32)
    s = _round_scale(tl.max(tl.max(tl.abs(x), axis=2), axis=1), SCALE_DT)
    xn = _scaled(x, s[:, None, None], FASTDIV)
    code = _codes(
        xn, tab_ptr, rec_ptr, btab_ptr, mid_ptr, LOGP, REG_LEVELS, STEP, 3,
        SEARCH, BREF, BMLOW, BELOW, BNMAG, NTAB,
    )  # fmt: skip
    if MASKED:
        code = tl.where(mask, code, 0)
        tl.store(scale_ptr + rows, s.to(scale_ptr.dtype.element_ty), mask=rows < nblocks)
    else:
        tl.store(scale_ptr + rows, s.to(scale_ptr.dtype.element_ty))
    words = _pack_groups(code, K, 2)
    gidx = rows[:, None] * (B // 8) + grp[None, :]
    if WORDS:
        w = words.to(out_ptr.dtype.element_ty)
        if MASKED:
            tl.store(out_ptr + gidx, w, mask=(grp[None, :] * 8 < B) & (gidx * 8 < n))
        else:
            tl.store(out_ptr + gidx, w)
    else:
        b = tl.arange(0, KP)
        byte = ((words[:, :, None] >> (b * 8).to(tl.int64)[None, None, :]) & 255).to(tl.uint8)
        pos = gidx[:, :, None] * K + b[None, None, :]
        ok = (b[None, None, :] < K) & (grp[None, :, None] * 8 < B) & (pos < nbytes)
        tl.store(out_ptr + pos, byte, mask=ok)


@triton.jit
def absmax_partial_kernel(x_ptr, part_ptr, n, block, nchunks, C: tl.constexpr):
    """Absmax of chunk ``pid % nchunks`` of block ``pid // nchunks`` (first pass, large blocks)."""
    pid = tl.program_id(0).to(tl.int64)
    blk = pid // nchunks
    col = (pid % nchunks) * C + tl.arange(0, C)
    offs = blk * block + col
    x = tl.load(x_ptr + offs, mask=(col < block) & (offs < n), other=0.0).to(tl.float32)
    tl.store(part_ptr + pid, tl.max(tl.abs(x), axis=0))


@triton.jit
def _block_index(offs, block, BLOG: tl.constexpr):
    if BLOG >= 0:
        return offs >> BLOG
    else:
        return offs // block


@triton.jit
def flat_kernel(
    x_ptr,
    out_ptr,
    s_ptr,
    tab_ptr,
    rec_ptr,
    btab_ptr,
    bhi_ptr,
    mid_ptr,
    cb_ptr,
    n,
    block,
    nbytes,
    G: tl.constexpr,
    BLOG: tl.constexpr,
    LOGP: tl.constexpr,
    REG_LEVELS: tl.constexpr,
    STEP: tl.constexpr,
    SEARCH: tl.constexpr,
    BREF: tl.constexpr,
    BMLOW: tl.constexpr,
    BELOW: tl.constexpr,
    BNMAG: tl.constexpr,
    NTAB: tl.constexpr,
    PACK: tl.constexpr,
    K: tl.constexpr,
    KP: tl.constexpr,
):
    """Second pass with precomputed fp32 scales: G groups of 8 consecutive values per program."""
    pid = tl.program_id(0).to(tl.int64)
    g = pid * G + tl.arange(0, G)
    j = tl.arange(0, 8)
    offs = g[:, None] * 8 + j[None, :]
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + _block_index(offs, block, BLOG), mask=mask, other=0.0)
    xn = _normalize(x, s)
    if not PACK:
        v = _levels(
            xn, tab_ptr, rec_ptr, btab_ptr, bhi_ptr, mid_ptr, cb_ptr, LOGP, REG_LEVELS, STEP, 2,
            SEARCH, BREF, BMLOW, BELOW, BNMAG, NTAB,
        )  # fmt: skip
        y = _to_out(v * s, out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs, y, mask=mask)
    else:
        code = _codes(
            xn, tab_ptr, rec_ptr, btab_ptr, mid_ptr, LOGP, REG_LEVELS, STEP, 2,
            SEARCH, BREF, BMLOW, BELOW, BNMAG, NTAB,
        )  # fmt: skip
        words = _pack_groups(tl.where(mask, code, 0), K, 1)
        b = tl.arange(0, KP)
        byte = ((words[:, None] >> (b * 8).to(tl.int64)[None, :]) & 255).to(tl.uint8)
        pos = g[:, None] * K + b[None, :]
        tl.store(out_ptr + pos, byte, mask=(b[None, :] < K) & (pos < nbytes))


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
