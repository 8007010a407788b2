"""Launchers for the blockwise quantization kernels: input checks, table setup, path choice.

Two execution paths give identical results:

* fused (one read of ``x``): block sizes up to ``KernelConfig.max_fused_block``; packing also
  needs ``block_size % 8 == 0``. This covers every block size of the paper, and is the fast path.
* two-pass: a chunked absmax kernel, scale rounding in torch, then a flat kernel that reads the
  per-block scale. Used for per-tensor scaling (``block_size=None``) and very large blocks,
  where one block does not fit in one program's registers, and for packing when
  ``block_size % 8 != 0``.

How a value finds its code (``KernelConfig.search``, resolved by ``_resolve_search``):

* ``arith``: int and float codebooks (``kbit.kernels.arith.detect``) and every microscaling
  element grid: computed in registers, no table;
* ``pair`` / ``pair-smem``: one read of an 8-byte bucket record (``kbit.kernels.pairs``) from
  global memory or from a shared-memory copy of the table;
* ``tree``, ``bucket``, ``bucket-mid``, ``bucket-smem``: the earlier table searches (midpoint
  search tree; bucket tables of ``_bucket_tables``), kept as options and fallbacks.

The division is exact everywhere; ``FAST_DIVISION`` lists the input/scale dtype pairs on
which the block-reciprocal division was checked against the IEEE quotient on every pair of
values a block can hold (``kbit.kernels.exact.check_fast_division``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from kbit.kernels import arith, pairs
from kbit.kernels import triton_kernels as tk

_SCALE_DTYPES = {
    torch.float16: tk.SCALE_FP16,
    torch.bfloat16: tk.SCALE_BF16,
    torch.float32: tk.SCALE_FP32,
}
_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_CODEBOOK = 256

#: (input dtype, scale dtype) -> (division mode, bound): ``check_fast_division`` compared the
#: block-reciprocal division with the IEEE quotient on every pair of values a block can hold;
#: the only differing pairs have quotients of magnitude <= bound, so codes (and outputs) are
#: identical for every codebook without a midpoint within ``bound`` of 0 (the others use
#: div_rn). Measured bounds: benchmarks/kernels_notes.md ("v6", Division).
FAST_DIVISION = {
    (torch.float16, torch.float16): (tk.DIV_RECIP, 0.0),  # no pair differs
    (torch.bfloat16, torch.float16): (tk.DIV_RECIP, 2.0**-100),  # measured 1.96e-31
    (torch.float16, torch.bfloat16): (tk.DIV_RECIP, 0.0),  # no pair differs
    (torch.bfloat16, torch.bfloat16): (tk.DIV_RECIP_PRESCALED, 2.0**-88),  # measured 1.56e-27
}

#: Triton compile options of every launch: contraction of a separate multiply and add into
#: an FMA stays on, as in the Triton releases the kernels were checked and timed with (3.6
#: on the GPU, 3.9 in the compile tests); Triton 3.10 changes that default. Where rounding
#: matters the kernels call ``tl.fma`` or keep products out of additions.
_COMPILE = dict(enable_fp_fusion=True)


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters. They change speed only, never results.

    ``tile`` / ``pack_tile``: values per program in the fused fake-quantize / pack kernels
    (whole blocks; at least one block). ``per_thread`` / ``pack_per_thread``: values per
    thread, which sets the warps per program.

    ``search``: how a normalized value finds its code (module docstring). ``"auto"``:
    ``arith`` for int codebooks, and for packing a float grid of powers of two (no mantissa
    bits: float4) whose pair table would be log-indexed (``arith.pow2_magnitudes``: the code
    from the exponent and first mantissa bit; on an H200 77-84% against 74-78% of copy for
    float4, "v10"); otherwise pair records (float codebooks too: on an H200 the
    log-layout table beat the float arithmetic, 85% against 74% of copy at 8 bits), from
    global memory up to ``pair_global_max`` buckets and from shared memory above (the H200
    measurements favour shared memory at every size); the tree where no pair layout separates
    the midpoints. ``pair_layout``: ``auto``, ``uniform``, ``log`` or ``binade``
    (``kbit.kernels.pairs``). ``bucket_min_entries``, ``record_max_entries``: the older
    searches' own choice when ``search`` names one of them (``bucket`` up to
    ``record_max_entries`` entries, ``bucket-mid`` beyond; the tree up to
    ``bucket_min_entries``).

    ``fast_div``: divide by the block reciprocal on the dtype pairs of ``FAST_DIVISION``.
    ``reg_levels``: search-tree levels resolved by selects instead of table gathers;
    ``search_step``: tree levels resolved per vector load after those (1 = one gather per
    level). ``flat_groups`` / ``dequant_groups``: groups of 8 values per program in the
    two-pass and dequantize kernels.

    ``pack_chunks``: fused packing through ``fused_pack_chunk_kernel`` where the block is a
    multiple of 16 values (each thread packs 32 or 16 consecutive codes into k int32 or int16
    words). It issues 10-30% fewer instructions per value than ``fused_pack_kernel`` (one group
    of 8 codes per thread), but each thread reads its own 64 bytes, so a warp's loads are not
    coalesced: on an H200 it packed at 19-63% of copy against 34-97% for the group kernel
    (every codebook, B = 32..4096, benchmarks/kernels_notes.md, "v7"). Off by default; kept,
    tested, for GPUs or compilers where the trade-off differs.

    ``mid_launch``: (smallest block, largest block, tile, values per thread) overriding
    ``tile`` / ``per_thread`` for fused fake quantization through ``bucket-mid`` (measured on
    an H100, benchmarks/kernels_notes.md, "v5"). ``pair_wide``: (smallest table, tile, values
    per thread) for fused fake quantization through ``pair-smem`` with a uniform or log index
    of at least that many entries: each program copies the table into shared memory once, so
    a larger tile halves that cost: on an H200, with 32 values per thread (4 warps), float8 /
    nf8 (512 entries) 80-88 -> 85-92% of copy and quantile8 (1024) 79-84 -> 80-84% ("v11";
    with 16 values per thread (8 warps) the 512-entry tables gained nothing, "v8"); the
    per-binade index, whose word table is a second dependent read, lost 3-5 points.

    ``pack_warp``: (tile, largest table): fused packing runs one-warp programs of that many
    values (``pack_per_thread`` each) where a padded block fits and the code needs no
    shared-memory table or one of at most that many entries. Inside one warp Triton moves
    the packed words to their store layout, and gathers from a small table, with warp
    shuffles instead of shared memory and barriers (on an H200: int4 at B = 256 61 -> 83%,
    nf4 58 -> 78%, mxfp6 34 -> 64%; larger tables lose: a gather from 128 entries through
    shuffles cost dynamic4 20 points; "v8").
    ``pack_flat``: (smallest block for table codes in 4-warp programs, smallest block
    otherwise, largest block in one-warp programs) for which fused packing loads its tile as
    [rows, B] and views it as [rows, B / 8, 8]. Loaded as [rows, B / 8, 8] directly, Triton
    3.6 orders the threads along the rows (its coalescing pass breaks the tie between the two
    non-contiguous axes that way), so a warp's 16-byte loads are strided by the row; a 2-D
    tile has one contiguous axis. On an H200: int8 at B = 64 / 256 66 / 63 -> 82 / 80%, nf4
    at 64 65 -> 78%, nf8 51 -> 69%, quantile8 48 -> 64% (at 32 59 -> 66%), dynamic4 52 ->
    69%, mxfp6 49 -> 55%. Not used where it measured slower: at B = 32 outside 4-warp table
    programs (a thread then holds a whole block: int4 90 -> 80%, int8 86 -> 81%), in one-warp
    programs above 128 (int4 at 256 85 -> 80%), and for the MX / NV element codes whose group
    is one word (mxfp8 at 64 88 -> 82%, mxfp4 91 -> 88%, nvfp4 72 -> 68%) ("v9").
    ``pack_lanes``: one-warp packing programs of blocks of at least this many values (0:
    none; not with ``pack_flat``) store each packed word, 4 bytes wide, from the thread that
    packed it instead of moving the words across lanes to 16-byte stores (on an H200 +2 to
    +3 points of copy for int4 at B = 256..1024; in 4-warp programs it lost up to 15 points;
    "v9").
    ``pack_word_chunks``: codes whose group of 8 is not one int16/32/64 word (k = 3, 5, 6, 7;
    k = 1) and blocks that are a multiple of 32 values: each 32 codes (four groups, 4 k
    bytes) are stored as k int32 words (k = 6: three int64) built from the four group
    integers, instead of each group's k bytes one at a time (k = 6: three int16). 17 byte
    stores per thread become 4 word stores; on an H200 int3 at B = 32 / 1024 packed at
    70 / 68 -> 87 / 85% of copy, mxfp6 at 32 / 64 64 / 55 -> 88 / 77% ("v10").
    ``pack_split``: (smallest block, largest block in one-warp programs, largest block in
    4-warp programs of arithmetic codes, i.e. not table codebooks) that fused packing
    splits into rows of 32 values: the tile is laid out as for B = 32 (a thread per row,
    whole groups per thread, no shuffles of codes or barriers) and the rows' absmax is
    combined over each block's rows. On an H200 int4 at B = 64 / 128 77 / 75 -> 89 / 88%,
    int3 71 / 72 -> 85 / 83%, float4 65 -> 75%, int8 (4-warp) at 256 78 -> 83%; it lost at
    B = 1024 in one-warp programs (nf4 88 -> 83%), at 4096 (int8 88 -> 81%) and for table
    codes in 4-warp programs (dynamic4 at 256 68 -> 64%) ("v10").
    ``pair_cell_records``: packing through pair records of tables of at least this many
    entries (0: none) reads 4-byte cell records (``pairs.PairTables.pack32``: the code's
    first position and the midpoint's low bits, compared as integers) where the layout has
    them (log and per-binade indexes) instead of 8-byte ``(lo, midpoint)`` records: half the
    bytes of the shared-memory gather. On an H200 float8 (448 entries) packed at 61-69 ->
    68-77% of copy; dynamic4 (88 entries, its gather not the limit) lost 1-5 points ("v11").
    ``int_mid_table``: int codebooks of at most this many steps pack with the midpoint read
    from a shared-memory table indexed by the arithmetic position (``_code``), 8 fewer
    instructions per value than computing it from both neighbours.
    ``nv_pack_split``: NVFP4 packs in two launches (``fused_pack_kernel``, FLAG), the
    division shortcut and its div_rn fallback on a grid of at most this many programs that
    loop over the tiles, each returning at once unless the device-side check chose it (0:
    one kernel holding both paths, whose registers are the maximum over both).
    ``nv_absmax``: (values per program, warps) of NVFP4's global absmax pass
    (``nv_absmax_kernel``): 8 warps measured 0.5-5 points of copy faster than 16 for NVFP4's
    fake quantization and packing on an H200 ("v12").
    """

    tile: int = 2048
    per_thread: int = 16
    pack_tile: int = 4096
    pack_per_thread: int = 32
    search: str = "auto"
    pair_layout: str = "auto"
    pair_global_max: int = 0
    bucket_min_entries: int = 8
    record_max_entries: int = 16
    fast_div: bool = True
    reg_levels: int = 2
    search_step: int = 1
    flat_groups: int = 256
    dequant_groups: int = 256
    dequant_warps: int = 4
    max_fused_block: int = 4096
    pack_chunks: bool = False
    int_mid_table: int = 255
    absmax_chunk: int = 4096
    mid_launch: tuple[tuple[int, int, int, int], ...] = (
        (128, 256, 4096, 32),
        (512, 2048, 2048, 32),
    )
    pair_wide: tuple[int, int, int] = (512, 4096, 32)
    pack_warp: tuple[int, int] = (1024, 32)
    pack_lanes: int = 256
    pack_flat: tuple[int, int, int] = (32, 64, 128)
    pack_word_chunks: bool = True
    pack_split: tuple[int, int, int] = (64, 256, 1024)
    pair_cell_records: int = 256
    nv_absmax: tuple[int, int] = (16384, 8)
    nv_pack_split: int = 1024


DEFAULT_CONFIG = KernelConfig()

_SEARCH_MODES = {
    "tree": 0,
    "bucket": 1,
    "bucket-mid": 2,
    "bucket-smem": 3,
    "pair": 4,
    "pair-smem": 5,
}
SEARCHES = ("auto", "arith", *_SEARCH_MODES)
_table_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = {}
_bucket_cache: dict[tuple, _BucketTables | None] = {}
_pair_host_cache: dict[tuple, pairs.PairTables | None] = {}
_pair_cache: dict[tuple, dict] = {}


def _check_block_size(block_size: int | None) -> None:
    if block_size is None:
        return
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(
            f"block_size must be a positive int or None (one block per tensor), got {block_size!r}"
        )


def _check_scale_dtype(scale_dtype: torch.dtype) -> int:
    if scale_dtype not in _SCALE_DTYPES:
        allowed = ", ".join(str(d) for d in _SCALE_DTYPES)
        raise ValueError(f"scale_dtype {scale_dtype} is not supported; allowed: {allowed}")
    return _SCALE_DTYPES[scale_dtype]


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")


def _check_input(x: torch.Tensor, name: str = "x") -> None:
    if x.dtype not in _INPUT_DTYPES:
        allowed = ", ".join(str(d) for d in _INPUT_DTYPES)
        raise ValueError(f"{name} has dtype {x.dtype}; allowed: {allowed}")


def _subtree_records(mids: torch.Tensor, logp: int, step: int) -> torch.Tensor:
    """For every node i with ``step`` levels below it: the sorted midpoints of that subtree,
    at ``[i * 2**step, (i + 1) * 2**step)`` with a final +inf (see ``_search``)."""
    width = 2**step
    rec = torch.full((max(2, 2**logp) * width,), math.inf, dtype=torch.float32)
    if step <= 1:
        return rec
    for i in range(1, 2**logp):
        depth = i.bit_length() - 1
        if depth + step > logp:
            continue
        idx = []
        for dd in range(step):
            for t in range(2**dd):
                pos = i * 2**dd + t - 2 ** (depth + dd)  # position within its level
                idx.append((2 * pos + 1) * 2 ** (logp - 1 - depth - dd) - 1)
        rec[i * width : i * width + width - 1] = mids[sorted(idx)]
    return rec


def _tables(
    codebook: torch.Tensor, bits: int | None, device: torch.device, step: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(search tree, subtree records, codebook padded to 2**bits, logp) on ``device``.

    The tree holds the sorted midpoints ``(cb[i] + cb[i+1]) / 2`` (fp32, as the reference
    computes them), padded with +inf to 2**logp - 1 entries, in breadth-first order from index 1.

    The padded codebook makes dequantization of any k-bit code read inside the table even if
    the codebook has fewer than 2**k entries (int has 2**k - 1). Tables are cached per codebook
    value and device, since building them costs host-device copies on every call otherwise.
    """
    cb = codebook.detach().to("cpu", torch.float32).contiguous()
    key = (cb.numpy().tobytes(), bits, str(device), step)
    hit = _table_cache.get(key)
    if hit is not None:
        return hit
    if cb.ndim != 1 or not 1 <= cb.numel() <= _MAX_CODEBOOK:
        raise ValueError(
            f"codebook must be 1-D with 1..{_MAX_CODEBOOK} entries, got shape {tuple(cb.shape)}"
        )
    if not torch.isfinite(cb).all():
        raise ValueError("codebook contains inf or NaN; entries must be finite")
    if cb.numel() > 1 and not bool((cb[1:] > cb[:-1]).all()):
        raise ValueError("codebook must be sorted in strictly increasing order")
    if bits is not None and cb.numel() > 2**bits:
        raise ValueError(f"codebook has {cb.numel()} entries, more than 2**bits = {2**bits}")
    ncb = cb.numel()
    logp = max(0, math.ceil(math.log2(ncb))) if ncb > 1 else 0
    mids = torch.full((max(1, 2**logp - 1),), math.inf, dtype=torch.float32)
    mids[: ncb - 1] = (cb[:-1] + cb[1:]) / 2
    tree = torch.zeros(max(2, 2**logp), dtype=torch.float32)
    for level in range(logp):
        stride = 2 ** (logp - 1 - level)  # node j of this level is sorted index (2j+1)*stride-1
        tree[2**level : 2 ** (level + 1)] = mids[stride - 1 :: 2 * stride]
    size = max(ncb, 2**bits if bits is not None else ncb)
    cb_pad = torch.full((size,), float(cb[-1]), dtype=torch.float32)
    cb_pad[:ncb] = cb
    rec = _subtree_records(mids, logp, step)
    out = (tree.to(device), rec.to(device), cb_pad.to(device), logp)
    if len(_table_cache) > 256:
        _table_cache.clear()
    _table_cache[key] = out
    return out


# ----------------------------------------------------------------------------- bucket tables
#: buckets per sign at most: one-read records (mode 1, 12 bytes a bucket) / uint8 tables
_MAX_BUCKETS = {1: 2048, 2: 16384}
#: midpoints one bucket may hold at most (mode 2); a codebook that needs more uses the tree
_MAX_REFINE = 4


@dataclass(frozen=True)
class _Bucketing:
    """Layout of a bucket table (see ``triton_kernels._bucket_index``): magnitudes from
    ``2**-elow`` to ``2**etop`` in ``2**mlow`` buckets per binade (smaller magnitudes in the
    first bucket, larger in the last), ``nmag`` buckets per sign."""

    mlow: int
    elow: int
    etop: int

    @property
    def nmag(self) -> int:
        return (self.elow + self.etop) << self.mlow


@dataclass(frozen=True)
class _BucketTables:
    layout: _Bucketing
    mode: int  # 1: one-read records (one midpoint per bucket); 2, 3: lo table + midpoint reads
    refine: int  # midpoints a bucket may hold: reads of the midpoint table (mode 2)
    fake: torch.Tensor  # mode 1: int64 ``bits(cb[lo]) << 32 | bits(mid)``; mode 2: uint8 lo
    hi: torch.Tensor  # mode 1: fp32 ``cb[lo + 1]`` (mode 2: unused)
    pack: torch.Tensor  # mode 1: int64 ``lo << 32 | bits(mid)``; mode 2: uint8 lo
    mids: torch.Tensor  # fp32 sorted midpoints, then +inf (at least ``refine``; mode 3: ntab)
    cb: torch.Tensor | None = None  # mode 3: the codebook padded to ntab entries
    ntab: int = 1  # mode 3: entries of the midpoint and codebook tables (a power of two)


def _bucket_index(x: np.ndarray, lay: _Bucketing) -> np.ndarray:
    """Table index of fp32 values: ``triton_kernels._bucket_index`` in numpy."""
    xb = np.ascontiguousarray(x, dtype=np.float32).view(np.int32).astype(np.int64)
    i = np.maximum((xb & 0x7FFFFFFF) - ((127 - lay.elow) << 23), 0) >> (23 - lay.mlow)
    i = np.minimum(i, lay.nmag - 1)
    return np.where(xb < 0, lay.nmag - 1 - i, lay.nmag + i)


def _bucket_lows(mids: np.ndarray, lay: _Bucketing) -> np.ndarray:
    """For every table entry, the number of midpoints below the smallest value of its bucket."""
    i = np.arange(lay.nmag, dtype=np.int64)
    start = ((127 - lay.elow) << 23) + (i << (23 - lay.mlow))
    end = np.append(start[1:] - 1, 0x7F7FFFFF)  # largest magnitude of each bucket
    pos_min = start.astype(np.int32).view(np.float32).astype(np.float64)
    pos_min[0] = 0.0  # the first positive bucket starts at +0 (-0 is in the negative one)
    neg_min = -end.astype(np.int32).view(np.float32).astype(np.float64)
    bounds = np.concatenate([neg_min[::-1], pos_min])
    return np.searchsorted(mids.astype(np.float64), bounds, side="left")


def _choose_layout(mids: np.ndarray, refine: int, max_buckets: int) -> _Bucketing | None:
    """The layout with the fewest buckets in which no bucket holds more than ``refine``
    midpoints (counted by where the kernel's index puts each midpoint)."""
    mags = np.abs(mids.astype(np.float64))
    nonzero = mags[mags > 0]
    if nonzero.size == 0:
        elow, etop = 0, 1
    else:
        elow = math.ceil(-math.log2(nonzero.min()))
        etop = max(1, math.floor(math.log2(nonzero.max())) + 1)
    if elow >= 126 or etop >= 127:
        return None
    for mlow in range(0, 15):
        lay = _Bucketing(mlow, elow, etop)
        if lay.nmag > max_buckets:
            return None
        idx = _bucket_index(mids, lay)
        if mids.size == 0 or int(np.bincount(idx).max()) <= refine:
            return lay
    return None


def _bucket_tables(cb: torch.Tensor, device: torch.device, mode: int) -> _BucketTables | None:
    """Bucket tables of a (validated, fp32, CPU) codebook, cached per value, device and mode.

    Mode 1 needs a layout of at most ``_MAX_BUCKETS[1]`` buckets per sign, each with at most
    one midpoint; without one (a codebook with a few midpoints much closer together than the
    rest) it becomes mode 2 with the fewest midpoint reads, up to ``_MAX_REFINE``, that a
    layout allows (modes 2 and 3 take that many reads directly). Mode 3 also pads the
    midpoints and the codebook to one power-of-two size for the shared-memory copies. None: no
    layout fits, and the caller uses the tree.
    """
    key = (cb.numpy().tobytes(), str(device), mode)
    if key in _bucket_cache:
        return _bucket_cache[key]
    c = cb.numpy().astype(np.float32)
    mids = ((cb[:-1] + cb[1:]) / 2).numpy().astype(np.float32)
    lay, refine = None, 1
    if mode == 1:
        lay = _choose_layout(mids, 1, _MAX_BUCKETS[1])
    if lay is None:
        mode = 3 if mode == 3 else 2
        for refine in range(1, _MAX_REFINE + 1):
            lay = _choose_layout(mids, refine, _MAX_BUCKETS[2])
            if lay is not None:
                break
    out = None
    if lay is not None:
        lows = _bucket_lows(mids, lay)
        ntab = _pow2(max(c.size, mids.size + refine)) if mode == 3 else 1
        npad = max(refine, ntab - mids.size)
        mids_pad = np.append(mids, np.full(npad, np.inf, dtype=np.float32)).astype(np.float32)
        cbpad = None
        if mode == 3:
            cbpad = torch.from_numpy(np.append(c, np.full(ntab - c.size, c[-1], np.float32)))

        def bits(v: np.ndarray) -> np.ndarray:
            return v.astype(np.float32).view(np.uint32).astype(np.int64)

        if mode == 1:
            mid_bits = bits(mids_pad[lows])
            fake = (bits(c[lows]) << 32) | mid_bits
            hi = c[np.minimum(lows + 1, c.size - 1)]
            pack = (lows.astype(np.int64) << 32) | mid_bits
        else:
            fake = pack = lows.astype(np.uint8)
            hi = np.zeros(1, dtype=np.float32)
        out = _BucketTables(
            lay, mode, refine,
            torch.from_numpy(fake).to(device),
            torch.from_numpy(np.ascontiguousarray(hi, dtype=np.float32)).to(device),
            torch.from_numpy(pack).to(device),
            torch.from_numpy(mids_pad).to(device),
            None if cbpad is None else cbpad.to(device),
            ntab,
        )  # fmt: skip
    if len(_bucket_cache) > 256:
        _bucket_cache.clear()
    _bucket_cache[key] = out
    return out


def _pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


# ----------------------------------------------------------------------------- code arguments
#: constexprs of the code families; a family leaves the others at these values
_NEUTRAL = dict(
    FAMILY=tk.FAMILY_TABLE, AM=0, AEMIN=0, AVM=0.0, AV2=0.0, AHI=0.0, ALO=0.0, AZERO=0, ALAST=0,
    LOGP=0, REG_LEVELS=0, STEP=1, SEARCH=0, BREF=1, BMLOW=0, BELOW=0, BNMAG=1, NTAB=1,
    PLAY=0, PK=0.0, PNB=1, PNE=1, PELO=0,
)  # fmt: skip


def _pair_host(cb: torch.Tensor, layout: str) -> pairs.PairTables | None:
    """``pairs.build`` of a validated CPU codebook, cached per value and layout."""
    key = (cb.numpy().tobytes(), layout)
    if key not in _pair_host_cache:
        if len(_pair_host_cache) > 256:
            _pair_host_cache.clear()
        _pair_host_cache[key] = pairs.build(cb.numpy(), layout)
    return _pair_host_cache[key]


def _pair_tables(cb: torch.Tensor, device: torch.device, layout: str) -> tuple | None:
    """(host tables, device tensors padded to a power of two) of a codebook, cached."""
    t = _pair_host(cb, layout)
    if t is None:
        return None
    key = (cb.numpy().tobytes(), str(device), layout)
    dev = _pair_cache.get(key)
    if dev is None:
        ntab = _pow2(t.nb)

        def pad(a: np.ndarray | None) -> torch.Tensor | None:
            if a is None:
                return None
            full = np.full(ntab, a[-1], a.dtype)
            full[: a.size] = a
            return torch.from_numpy(full).to(device)

        dev = dict(fake=pad(t.fake), pack=pad(t.pack), pack32=pad(t.pack32),
                   lay=torch.from_numpy(t.lay).to(device), ntab=ntab)  # fmt: skip
        if len(_pair_cache) > 256:
            _pair_cache.clear()
        _pair_cache[key] = dev
    return t, dev


def _resolve_search(cb: torch.Tensor, cfg: KernelConfig, pack: bool) -> str:
    """The search that runs for this codebook (``KernelConfig.search``; module docstring)."""
    if cfg.search not in SEARCHES:
        raise ValueError(f"search={cfg.search!r}: allowed are {', '.join(SEARCHES)}")
    cpu = cb.detach().to("cpu", torch.float32).contiguous()
    if cfg.search == "arith":
        if arith.detect(cpu) is None:
            raise ValueError("search='arith' needs an int or float codebook")
        return "arith"
    if cfg.search != "auto":
        return cfg.search
    fam = arith.detect(cpu)
    if isinstance(fam, arith.IntCode):
        return "arith"
    t = _pair_host(cpu, cfg.pair_layout)
    # packing a float grid of powers of two: its exponent bits beat a log-indexed table
    # (float4 on an H200: 74-78 -> 77-84% of copy), not a uniform one (float3: 80-82 ->
    # 74-77%); fake quantization keeps the table (float4 90-91 -> 86-90% from the bits)
    uniform = t is not None and t.layout == pairs.LAYOUT_UNIFORM
    if pack and not uniform and arith.pow2_magnitudes(cpu) is not None:
        return "arith"
    if t is None and fam is not None:
        return "arith"
    if t is not None:
        return "pair" if t.nb <= cfg.pair_global_max else "pair-smem"
    return "tree"


def _pair_args(
    cb: torch.Tensor, device: torch.device, cfg: KernelConfig, search: str
) -> dict | None:
    hit = _pair_tables(cb, device, cfg.pair_layout)
    if hit is None:
        return None
    t, dev = hit
    kw = dict(SEARCH=_SEARCH_MODES[search], NTAB=dev["ntab"], PLAY=t.layout, PK=t.k, PNB=t.nb,
              PNE=t.ne, PELO=t.elo)  # fmt: skip
    cells = 0 < cfg.pair_cell_records <= dev["ntab"] and dev["pack32"] is not None
    return dict(fake=dev["fake"], pack=dev["pack32"] if cells else dev["pack"], lay=dev["lay"],
                kw=kw)  # fmt: skip


def _bucket_args(cb: torch.Tensor, device: torch.device, search: str) -> dict | None:
    mode = _SEARCH_MODES[search]
    bt = _bucket_tables(cb, device, mode) if mode else None
    if bt is None:
        return None
    lay = bt.layout
    kw = dict(SEARCH=bt.mode, BREF=bt.refine, BMLOW=lay.mlow, BELOW=lay.elow, BNMAG=lay.nmag,
              NTAB=bt.ntab)  # fmt: skip
    return dict(fake=bt.fake, hi=bt.hi, pack=bt.pack, mids=bt.mids, cb=bt.cb, kw=kw)


_args_cache: dict[tuple, tuple[dict[str, torch.Tensor], dict]] = {}


def _code_args(
    codebook: torch.Tensor, bits: int | None, device: torch.device, cfg: KernelConfig, pack: bool
) -> tuple[dict[str, torch.Tensor], dict]:
    """(table tensors by kernel argument name, constexprs) of the code search for a codebook,
    cached per codebook value, bits, device, config and direction (the host work would
    otherwise be paid on every call)."""
    cpu = codebook.detach().to("cpu", torch.float32).contiguous()
    key = (cpu.numpy().tobytes(), cpu.numel(), bits, str(device), cfg, pack)
    hit = _args_cache.get(key)
    if hit is None:
        if len(_args_cache) > 256:
            _args_cache.clear()
        hit = _args_cache[key] = _build_code_args(cpu, bits, device, cfg, pack)
    return hit


def _build_code_args(
    codebook: torch.Tensor, bits: int | None, device: torch.device, cfg: KernelConfig, pack: bool
) -> tuple[dict[str, torch.Tensor], dict]:
    """Pointer arguments a search does not read get a one-element dummy."""
    step = max(1, min(cfg.search_step, 4))
    tree, rec, cb, logp = _tables(codebook, bits, device, step)
    dummy = torch.zeros(1, dtype=torch.float32, device=device)
    ptrs = dict(tab=tree, rec=rec, btab=dummy, bhi=dummy, mid=dummy, cb=cb, lay=dummy)
    kw = dict(_NEUTRAL, LOGP=logp, REG_LEVELS=min(cfg.reg_levels, logp), STEP=step)
    cpu = codebook.detach().to("cpu", torch.float32).contiguous()
    search = _resolve_search(cpu, cfg, pack)
    if search == "arith":
        fam = arith.detect(cpu)
        if isinstance(fam, arith.IntCode):
            kw.update(FAMILY=tk.FAMILY_INT, AM=fam.m, AHI=fam.rhi, ALO=fam.rlo, ALAST=fam.m)
            if pack and fam.m <= cfg.int_mid_table:
                ptrs["mid"] = _int_midpoints(cpu, device)
                kw.update(SEARCH=_SEARCH_MODES["pair-smem"], NTAB=ptrs["mid"].numel())
        elif (n := arith.pow2_magnitudes(cpu)) is not None:  # no mantissa bits: exponent bits
            kw.update(FAMILY=tk.FAMILY_POW2, AM=n, AZERO=n, ALAST=2 * n)
        else:
            kw.update(FAMILY=tk.FAMILY_FLOAT, AM=fam.mantissa_bits, AEMIN=fam.emin_bits,
                      AVM=fam.vmax, AV2=fam.vmax2, AHI=fam.rhi, ALO=fam.rlo,
                      AZERO=(fam.entries - 1) // 2, ALAST=fam.entries - 1)  # fmt: skip
        return ptrs, kw
    if search in ("pair", "pair-smem"):
        pa = _pair_args(cpu, device, cfg, search)
        if pa is not None:
            kw.update(pa["kw"])
            ptrs.update(rec=pa["fake"], btab=pa["pack"], lay=pa["lay"])
            return ptrs, kw
        search = "tree"
    ba = _bucket_args(cpu, device, search) if search != "tree" else None
    if ba is not None:
        kw.update(ba["kw"])
        ptrs.update(btab=ba["pack"] if pack else ba["fake"], bhi=ba["hi"], mid=ba["mids"])
        if ba["cb"] is not None:
            ptrs["cb"] = ba["cb"]
    return ptrs, kw


def _int_midpoints(cb: torch.Tensor, device: torch.device) -> torch.Tensor:
    """fp32 midpoints ``(cb[j] + cb[j + 1]) * 0.5`` of an int codebook (the kernel's own
    operations, IEEE on the CPU), padded with +inf to a power of two."""
    mids = (cb[:-1] + cb[1:]) * 0.5
    pad = torch.full((_pow2(mids.numel()),), math.inf, dtype=torch.float32)
    pad[: mids.numel()] = mids
    return pad.to(device)


def _element_args(fmt: arith.ElementCode, device: torch.device) -> tuple[dict, dict]:
    """Pointers (dummies) and constexprs of a microscaling element grid (FAMILY=3)."""
    dummy = torch.zeros(1, dtype=torch.float32, device=device)
    ptrs = dict(tab=dummy, rec=dummy, btab=dummy, bhi=dummy, mid=dummy, cb=dummy, lay=dummy)
    kw = dict(_NEUTRAL, FAMILY=tk.FAMILY_ELEMENT, AM=fmt.mantissa_bits, AEMIN=fmt.emin_bits,
              AVM=fmt.vmax, AZERO=fmt.zero, ALAST=2 * fmt.zero)  # fmt: skip
    return ptrs, kw


def _use_fused(block_size: int | None, pack: bool, cfg: KernelConfig) -> bool:
    if block_size is None or block_size > cfg.max_fused_block:
        return False
    return not (pack and block_size % 8)


def _block_shift(block: int, nblocks: int) -> int:
    """Shift for offset -> block index when possible (power of two, or a single block)."""
    if nblocks == 1:
        return 62
    if block & (block - 1) == 0:
        return block.bit_length() - 1
    return -1


def _block_absmax(x: torch.Tensor, block: int, cfg: KernelConfig) -> torch.Tensor:
    """fp32 absmax of every block (chunked kernel, then a torch max over the chunks)."""
    n = x.numel()
    nblocks = -(-n // block)
    chunk = min(cfg.absmax_chunk, _pow2(block))
    nchunks = -(-block // chunk)
    part = torch.empty(nblocks * nchunks, dtype=torch.float32, device=x.device)
    tk.absmax_partial_kernel[(nblocks * nchunks,)](
        _bits_view(x), part, n, block, nchunks, C=chunk, **_COMPILE
    )
    return part.view(nblocks, nchunks).amax(dim=1)


_dummies: dict[str, torch.Tensor] = {}


def _dummy(device: torch.device) -> torch.Tensor:
    """A 3-element fp32 tensor for kernel pointer arguments that a path does not read."""
    key = str(device)
    if key not in _dummies:
        _dummies[key] = torch.zeros(3, dtype=torch.float32, device=device)
    return _dummies[key]


def _bits_view(t: torch.Tensor) -> torch.Tensor:
    """bf16 tensors go to the kernels as int16 bit patterns (``triton_kernels._to_f32``)."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def _warps(values: int, per_thread: int) -> int:
    return max(1, min(16, values // (32 * per_thread)))


_WORD_DTYPES = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _pack_chunk(bits: int, block: int, cfg: KernelConfig) -> int:
    """Groups of 8 codes per thread chunk of ``fused_pack_chunk_kernel`` (4 or 2: the chunk's
    codes are ``bits`` int32 or int16 words), or 0 for ``fused_pack_kernel``."""
    if not cfg.pack_chunks or not 1 <= bits <= 8:
        return 0
    return 4 if block % 32 == 0 else 2 if block % 16 == 0 else 0


def _pack_tile(cfg: KernelConfig, bp: int, kw: dict) -> int:
    """Values per program of the fused packing kernel (see ``pack_warp``)."""
    warp_tile, warp_table = cfg.pack_warp
    table = kw["SEARCH"] in (_SEARCH_MODES["pair-smem"], _SEARCH_MODES["bucket-smem"])
    if bp <= warp_tile and (not table or kw["NTAB"] <= warp_table):
        return warp_tile
    return cfg.pack_tile


def _pack_split(cfg: KernelConfig, block: int, kw: dict) -> int:
    """Rows of 32 values that each block is split into in fused packing programs
    (``pack_split``), else 1."""
    lo, one_warp_upto, upto = cfg.pack_split
    if _pack_tile(cfg, block, kw) == cfg.pack_warp[0]:
        upto = one_warp_upto
    elif kw["FAMILY"] == tk.FAMILY_TABLE:
        upto = 0
    ok = 0 < lo <= block <= upto and block % 32 == 0 and block == _pow2(block)
    return block // 32 if ok else 1


def _pack_forms(cfg: KernelConfig, row: int, kw: dict, bits: int, chunk: bool) -> tuple[bool, bool]:
    """(FLAT, LANES) of the fused packing kernel for tile rows of ``row`` values: whether it
    loads its tile as [rows, B] (``pack_flat``) and whether each word is stored by the
    thread that packed it (``pack_lanes``: one-warp programs without the [rows, B] load)."""
    table_from, other_from, one_warp_upto = cfg.pack_flat
    if _pack_tile(cfg, _pow2(row), kw) != cfg.pack_warp[0]:  # 4-warp programs
        table = kw["FAMILY"] == tk.FAMILY_TABLE
        return 0 < (table_from if table else other_from) <= row, False
    # MX / NV element codes whose groups are stored as whole words measured slower with it
    word_element = kw["FAMILY"] == tk.FAMILY_ELEMENT and (bits in _WORD_DTYPES or chunk)
    flat = 0 < other_from <= row <= one_warp_upto and not word_element
    return flat, not flat and 0 < cfg.pack_lanes <= row


def _pack_layout(
    cfg: KernelConfig, block: int, kw: dict, bits: int
) -> tuple[int, bool, bool, bool]:
    """(SPLIT, CHUNK, FLAT, LANES) of ``fused_pack_kernel`` for a block size: the 32-value
    rows a block is split into (``pack_split``), whether 32 codes are stored as whole words
    (``pack_word_chunks``), and the load and store forms of its tile rows (``_pack_forms``)."""
    split = _pack_split(cfg, block, kw)
    chunk = bits not in _WORD_DTYPES and cfg.pack_word_chunks and block % 32 == 0
    return split, chunk, *_pack_forms(cfg, block // split, kw, bits, chunk)


def _fake_launch(cfg: KernelConfig, block: int, kw: dict) -> tuple[int, int]:
    """Tile and values per thread of the fused fake-quantize kernel (see ``mid_launch`` and
    ``pair_wide``)."""
    if kw["FAMILY"] != tk.FAMILY_TABLE:
        return cfg.tile, cfg.per_thread
    if kw["SEARCH"] == _SEARCH_MODES["bucket-mid"]:
        for lo, hi, tile, per_thread in cfg.mid_launch:
            if lo <= block <= hi:
                return tile, per_thread
    wide_ntab, tile, per_thread = cfg.pair_wide
    smem_pairs = kw["SEARCH"] == _SEARCH_MODES["pair-smem"]
    if smem_pairs and kw["PLAY"] != pairs.LAYOUT_BINADE and kw["NTAB"] >= wide_ntab:
        return tile, per_thread
    return cfg.tile, cfg.per_thread


_mid_cache: dict[bytes, float] = {}


def _min_abs_mid(grid: torch.Tensor) -> float:
    """Smallest |midpoint| of a sorted codebook (0 if a midpoint is 0; inf if none)."""
    g = grid.detach().to("cpu", torch.float32).contiguous()
    key = g.numpy().tobytes()
    if key not in _mid_cache:
        if len(_mid_cache) > 256:
            _mid_cache.clear()
        _mid_cache[key] = math.inf if g.numel() < 2 else float(((g[:-1] + g[1:]) / 2).abs().min())
    return _mid_cache[key]


def _division(
    x: torch.Tensor, scale_dtype: torch.dtype, cfg: KernelConfig, grid: torch.Tensor
) -> int:
    """The division mode for a block scale dtype and codebook (``FAST_DIVISION``)."""
    mode, bound = FAST_DIVISION.get((x.dtype, scale_dtype), (tk.DIV_EXACT, 0.0))
    if not cfg.fast_div or (bound > 0 and _min_abs_mid(grid) <= bound):
        return tk.DIV_EXACT
    return mode


@dataclass(frozen=True)
class _Scaling:
    """How blocks are scaled: kernel constexprs plus the scalars and stored dtype."""

    scale_dt: int
    emax: int
    div: int
    store_dtype: torch.dtype
    gd: torch.Tensor | None = None  # NVFP4: device fp32 [g, RN(6 g), division flag]


def _launch(
    x: torch.Tensor,
    block_size: int | None,
    sc: _Scaling,
    ptrs: dict,
    kw: dict,
    bits: int | None,
    pack: bool,
    cfg: KernelConfig,
    two_pass_divisors,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the fused or the two-pass kernels; returns (output, stored scales or None).

    ``two_pass_divisors(absmax) -> (stored scales, fp32 divisors)`` is the torch form of the
    block scale for the two-pass path."""
    x = x.contiguous().view(-1)
    n = x.numel()
    block = block_size if block_size is not None else max(n, 1)
    nblocks = -(-n // block)
    k = bits if bits is not None else 8
    nbytes = -(-n * k // 8)
    # packed buffers are allocated in whole 8-byte words so that the word-store path may view
    # them as int16/int32/int64; the caller gets exactly nbytes
    buf = torch.empty(-(-nbytes // 8) * 8, dtype=torch.uint8, device=x.device) if pack else None
    out = buf[:nbytes] if pack else torch.empty_like(x)
    if n == 0:
        return out, torch.empty(0, dtype=sc.store_dtype, device=x.device) if pack else None
    kp = _pow2(k)
    common = dict(SCALE_DT=sc.scale_dt, EMAX=sc.emax, DIV=sc.div)
    gd = sc.gd if sc.gd is not None else _dummy(x.device)
    if _use_fused(block_size, pack, cfg):
        bp = _pow2(block)
        tile, per_thread = _fake_launch(cfg, block, kw)
        rows = max(1, (_pack_tile(cfg, bp, kw) if pack else tile) // bp)
        masked = bp != block or n % (rows * block) != 0
        grid = (-(-nblocks // rows),)
        if not pack:
            tk.fused_fake_kernel[grid](
                _bits_view(x), _bits_view(out), ptrs["tab"], ptrs["rec"], ptrs["btab"],
                ptrs["bhi"], ptrs["mid"], ptrs["cb"], ptrs["lay"], gd, n,
                B=block, BP=bp, ROWS=rows, **kw, **common, MASKED=masked,
                num_warps=_warps(rows * bp, per_thread), **_COMPILE,
            )  # fmt: skip
            return out, None
        scales = torch.empty(nblocks, dtype=sc.store_dtype, device=x.device)
        shape = dict(B=block, BP=bp, ROWS=rows)
        cg = _pack_chunk(k, block, cfg)
        if cg:  # chunks of cg groups: k int32 (cg = 4) or int16 words each
            dst = buf.view(torch.int32 if cg == 4 else torch.int16)
            kernel, extra = tk.fused_pack_chunk_kernel, dict(CG=cg)
            units = nbytes
        else:
            split, chunk, flat, lanes = _pack_layout(cfg, block, kw, k)
            row = block // split  # values per tile row: a block, or a 32-value part of one
            words = k in _WORD_DTYPES
            sub = 16 if not words and k % 2 == 0 else 8  # k = 6: a group is 3 int16
            if words:
                dst = buf.view(_WORD_DTYPES[k])
            elif chunk:  # 32 codes are k int32 words (k = 6: 3 int64)
                dst = buf.view(torch.int32 if k % 2 else torch.int64)
            else:
                dst = buf.view(torch.int16 if sub == 16 else torch.uint8)
            units = dst.numel() if chunk else -(-nbytes // (sub // 8))
            kernel = tk.fused_pack_kernel
            extra = dict(
                KP=_pow2(k * 8 // sub), WORDS=words, SUB=sub, LANES=lanes, FLAT=flat,
                CHUNK=chunk, SPLIT=split,
            )  # fmt: skip
            shape = dict(B=row, BP=_pow2(row), ROWS=rows * split)
        args = (_bits_view(x), dst, _bits_view(scales), ptrs["tab"], ptrs["rec"], ptrs["btab"],
                ptrs["mid"], ptrs["lay"], gd, n, nblocks, units)  # fmt: skip
        shape |= dict(K=k, MASKED=masked, num_warps=_warps(rows * bp, cfg.pack_per_thread),
                      **_COMPILE)  # fmt: skip
        if kernel is tk.fused_pack_chunk_kernel:
            kernel[grid](*args, **shape, **kw, **common, **extra)
        elif sc.div == tk.DIV_RECIP_IF and cfg.nv_pack_split > 0:
            # NVFP4: the shortcut, then its div_rn fallback on a small grid; each returns at
            # once unless the device-side division check chose it
            fast, exact = common | dict(DIV=tk.DIV_RECIP), common | dict(DIV=tk.DIV_EXACT)
            kernel[grid](*args, grid[0], **shape, **kw, **fast, **extra, FLAG=1)
            small = (min(grid[0], cfg.nv_pack_split),)
            kernel[small](*args, grid[0], **shape, **kw, **exact, **extra, FLAG=2)
        else:
            kernel[grid](*args, grid[0], **shape, **kw, **common, **extra, FLAG=0)
        return out, scales
    scales, divisors = two_pass_divisors(_block_absmax(x, block, cfg))
    groups = cfg.flat_groups
    grid = (-(-n // (8 * groups)),)
    tk.flat_kernel[grid](
        _bits_view(x), _bits_view(out), divisors, ptrs["tab"], ptrs["rec"], ptrs["btab"],
        ptrs["bhi"], ptrs["mid"], ptrs["cb"], ptrs["lay"], n, block, nbytes,
        G=groups, BLOG=_block_shift(block, nblocks), **kw, PACK=pack, K=k, KP=kp,
        num_warps=_warps(8 * groups, cfg.per_thread), **_COMPILE,
    )  # fmt: skip
    return out, scales if pack else None


def _run(
    x: torch.Tensor,
    codebook: torch.Tensor,
    block_size: int | None,
    scale_dtype: torch.dtype,
    bits: int | None,
    pack: bool,
    cfg: KernelConfig,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    _check_input(x)
    _check_block_size(block_size)
    sdt = _check_scale_dtype(scale_dtype)
    ptrs, kw = _code_args(codebook, bits, x.device, cfg, pack)
    sc = _Scaling(sdt, 0, _division(x, scale_dtype, cfg, codebook), scale_dtype)

    def two_pass(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = absmax.clamp(max=torch.finfo(scale_dtype).max).to(scale_dtype)
        return s, s.float()

    return _launch(x, block_size, sc, ptrs, kw, bits, pack, cfg, two_pass)


def fake_quantize_blockwise(
    x: torch.Tensor,
    codebook: torch.Tensor,
    block_size: int | None,
    scale_dtype: torch.dtype = torch.float16,
    *,
    config: KernelConfig = DEFAULT_CONFIG,
) -> torch.Tensor:
    """Quantize and dequantize ``x`` in one pass; same shape and dtype as ``x``."""
    y, _ = _run(x, codebook, block_size, scale_dtype, None, pack=False, cfg=config)
    return y.view(x.shape)


def quantize_blockwise(
    x: torch.Tensor,
    codebook: torch.Tensor,
    block_size: int | None,
    scale_dtype: torch.dtype,
    bits: int,
    *,
    config: KernelConfig = DEFAULT_CONFIG,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 codes of ``ceil(numel*bits/8)`` bytes, 1-D block scales in scale_dtype).

    The codes are a view of a buffer rounded up to whole 8-byte words (so that the kernel can
    store a group of 8 codes as one integer); ``.clone()`` it to drop the few padding bytes.
    """
    _check_bits(bits)
    packed, scales = _run(x, codebook, block_size, scale_dtype, bits, pack=True, cfg=config)
    assert scales is not None
    return packed, scales


def dequantize_blockwise(
    packed: torch.Tensor,
    scales: torch.Tensor,
    codebook: torch.Tensor,
    block_size: int | None,
    bits: int,
    numel: int,
    out_dtype: torch.dtype = torch.float16,
    *,
    config: KernelConfig = DEFAULT_CONFIG,
) -> torch.Tensor:
    """1-D tensor of ``numel`` values ``codebook[code] * scale`` in ``out_dtype``."""
    _check_bits(bits)
    _check_block_size(block_size)
    if out_dtype not in _INPUT_DTYPES:
        allowed = ", ".join(str(d) for d in _INPUT_DTYPES)
        raise ValueError(f"out_dtype {out_dtype} is not supported; allowed: {allowed}")
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must be uint8, got {packed.dtype}")
    nbytes = -(-numel * bits // 8)
    if packed.numel() < nbytes:
        raise ValueError(
            f"packed has {packed.numel()} bytes; {numel} codes of {bits} bits need {nbytes}"
        )
    block = block_size if block_size is not None else max(numel, 1)
    nblocks = -(-numel // block)
    if scales.numel() != nblocks:
        raise ValueError(
            f"scales has {scales.numel()} entries; {numel} values in blocks of {block} "
            f"need {nblocks}"
        )
    if scales.device != packed.device:
        raise ValueError(f"scales are on {scales.device} but packed is on {packed.device}")
    _, _, cb, _ = _tables(codebook, bits, packed.device)
    out = torch.empty(numel, dtype=out_dtype, device=packed.device)
    if numel == 0:
        return out
    groups = config.dequant_groups
    grid = (-(-numel // (8 * groups)),)
    tk.dequant_kernel[grid](
        packed.contiguous(), scales.contiguous(), cb, _bits_view(out), numel, block, nbytes,
        G=groups, BLOG=_block_shift(block, nblocks), K=bits, KP=_pow2(bits),
        num_warps=config.dequant_warps, **_COMPILE,
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------- microscaling
_E4M3_MAX = 448.0
_E8M0_BIAS = 127


@dataclass(frozen=True)
class Microscaling:
    """A microscaling format: element grid, block size and scale kind (``e8m0``/``e4m3``)."""

    element: arith.ElementCode
    block_size: int
    scale: str
    bits: int
    grid: torch.Tensor  # raw element values, sorted (for dequantization)


@functools.lru_cache(maxsize=64)
def microscaling(dtype: str, bits: int, exponent_bits: int | None, block_size: int) -> Microscaling:
    """The format of an ``mxfp``/``mxint``/``nvfp`` spec with the given block size (cached:
    it is built on every call's host path)."""
    from kbit.codebooks import element_grid
    from kbit.spec import QuantSpec

    spec = QuantSpec(dtype=dtype, bits=bits, exponent_bits=exponent_bits, block_size=block_size)
    scale = "e4m3" if dtype == "nvfp" else "e8m0"
    fmt = arith.element_code(dtype, bits, spec.exponent_bits)
    return Microscaling(fmt, int(spec.block_size), scale, bits, element_grid(spec).values)


_x_values: dict[tuple, torch.Tensor] = {}


def _all_values(
    dtype: torch.dtype, device: torch.device, nonnegative: bool = False
) -> torch.Tensor:
    """Every finite value of a 16-bit float dtype (with ``nonnegative``, the non-negative ones
    in ascending order: ``nv_scale_kernel``), padded by repeats of the first ones to a
    multiple of 4096."""
    key = (dtype, str(device), nonnegative)
    if key not in _x_values:
        v = torch.arange(0 if nonnegative else -32768, 32768, dtype=torch.int32)
        v = v.to(torch.int16).view(dtype)
        v = v[torch.isfinite(v)]
        _x_values[key] = torch.cat([v, v[: (-v.numel()) % 4096]]).to(device)
    return _x_values[key]


def division_mismatches_async(
    x_dtype: torch.dtype, scales: torch.Tensor, div: int, limits: torch.Tensor | None = None
) -> torch.Tensor:
    """Device tensor ``[pairs that differ, largest |quotient| among them]`` of division mode
    ``div`` against ``div_rn`` over every finite value of ``x_dtype`` (fp16/bf16) and every
    fp32 scale in ``scales``; with ``limits``, only values ``|x| <= limits[i]`` count for
    scale i. Nothing is read back to the host."""
    xs = _all_values(x_dtype, scales.device)
    if limits is None:
        limits = torch.full_like(scales, math.inf)
    out = torch.zeros(2, dtype=torch.float32, device=scales.device)
    s = scales.float().contiguous()
    tk.division_check_kernel[(s.numel(), xs.numel() // 4096)](
        _bits_view(xs), s, limits.float().contiguous(), out, NX=4096, DIV=div, num_warps=4,
        **_COMPILE,
    )  # fmt: skip
    return out


def division_mismatches(
    x_dtype: torch.dtype, scales: torch.Tensor, div: int, limits: torch.Tensor | None = None
) -> tuple[int, float]:
    """:func:`division_mismatches_async` read back: (pairs that differ, largest |quotient|)."""
    out = division_mismatches_async(x_dtype, scales, div, limits).cpu()
    return int(out[0]), float(out[1])


_E4M3_POSITIVE: dict[str, torch.Tensor] = {}


def _nv_gd(x: torch.Tensor, fmt: Microscaling, cfg: KernelConfig) -> tuple[torch.Tensor, int]:
    """(device ``[g, RN(6 g), pairs that forbid the shortcut, amax, NaNs]``, division mode)
    for NVFP4, in three launches and no host synchronisation: a zeroed buffer, the absmax
    pass (``nv_absmax_kernel``) and ``nv_scale_kernel``, which derives g as
    ``kbit.blockwise`` does (``amax / (448 * 6)``, IEEE) and checks the block-reciprocal
    division against div_rn on every non-negative value of x's dtype up to the tensor's
    absmax (no block holds larger ones; both divisions are odd in x) and every block scale
    the format can produce here (the 126 positive E4M3 values times g); a difference counts
    only where it could change a code (a quotient at or above the element grid's smallest
    midpoint). fp32 inputs always divide with div_rn."""
    gd = torch.zeros(5, dtype=torch.float32, device=x.device)
    n = x.numel()
    xb = _bits_view(x.contiguous().view(-1))
    if n:
        chunk, warps = cfg.nv_absmax
        tk.nv_absmax_kernel[(-(-n // chunk),)](xb, gd, n, C=chunk, num_warps=warps,
                                                       **_COMPILE)  # fmt: skip
    fast = cfg.fast_div and x.dtype in (torch.float16, torch.bfloat16)
    if not fast:
        tk.nv_scale_kernel[(1, 1)](gd, gd, gd, 0.0, NX=16, CHECK=False, num_warps=1,
                                   **_COMPILE)  # fmt: skip
        return gd, tk.DIV_EXACT
    key = str(x.device)
    if key not in _E4M3_POSITIVE:
        e = torch.arange(1, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
        _E4M3_POSITIVE[key] = e.to(x.device)
    xs = _all_values(x.dtype, x.device, nonnegative=True)
    e = _E4M3_POSITIVE[key]
    tk.nv_scale_kernel[(e.numel(), xs.numel() // 4096)](
        _bits_view(xs), e, gd, _min_abs_mid(fmt.grid), NX=4096, CHECK=True, num_warps=4,
        **_COMPILE,
    )  # fmt: skip
    return gd, tk.DIV_RECIP_IF


def _mx_scaling(x: torch.Tensor, fmt: Microscaling, cfg: KernelConfig):
    """(_Scaling, torch two-pass scales, global scale or None) of a microscaling format."""
    if fmt.scale == "e8m0":
        sc = _Scaling(tk.SCALE_E8M0, fmt.element.emax, tk.DIV_POW2, torch.uint8)

        def two_pass(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            _, e = torch.frexp(absmax)
            shared = torch.where(absmax > 0, e.to(torch.int32) - 1 - fmt.element.emax, -127)
            stored = (shared.clamp(-127, 127) + _E8M0_BIAS).to(torch.uint8)
            d = stored.to(torch.float32) - _E8M0_BIAS
            return stored, torch.ldexp(torch.ones_like(d), d)

        return sc, two_pass, None
    gd, div = _nv_gd(x, fmt, cfg)
    sc = _Scaling(tk.SCALE_E4M3, 0, div, torch.uint8, gd)

    def two_pass_nv(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        den = gd[1:2].expand_as(absmax)
        ratio = torch.where(den > 0, absmax / den, torch.zeros_like(absmax))
        s8 = ratio.clamp(max=_E4M3_MAX).to(torch.float8_e4m3fn)
        return s8.view(torch.uint8), s8.float() * gd[0:1]

    return sc, two_pass_nv, gd[0].clone()


def _run_mx(
    x: torch.Tensor, fmt: Microscaling, pack: bool, cfg: KernelConfig
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    _check_input(x)
    _check_block_size(fmt.block_size)
    sc, two_pass, g = _mx_scaling(x, fmt, cfg)
    ptrs, kw = _element_args(fmt.element, x.device)
    bits = fmt.bits if pack else None
    out, scales = _launch(x, fmt.block_size, sc, ptrs, kw, bits, pack, cfg, two_pass)
    if scales is not None and fmt.scale == "e4m3":
        scales = scales.view(torch.float8_e4m3fn)
    return out, scales, g


def fake_quantize_microscaling(
    x: torch.Tensor, fmt: Microscaling, *, config: KernelConfig = DEFAULT_CONFIG
) -> torch.Tensor:
    """``kbit.blockwise.fake_quantize`` of an mxfp/mxint/nvfp spec in one pass (same shape and
    dtype as ``x``)."""
    y, _, _ = _run_mx(x, fmt, False, config)
    return y.view(x.shape)


def quantize_microscaling(
    x: torch.Tensor, fmt: Microscaling, *, config: KernelConfig = DEFAULT_CONFIG
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(packed codes, block scales as stored: uint8 E8M0 or float8_e4m3fn, NVFP4's fp32
    global scale or None), as ``kbit.blockwise.quantize`` stores them."""
    packed, scales, g = _run_mx(x, fmt, True, config)
    assert scales is not None
    return packed, scales, g


def microscaling_divisors(
    scales: torch.Tensor, fmt: Microscaling, global_scale: torch.Tensor | None
) -> torch.Tensor:
    """fp32 block scales from stored E8M0 / E4M3 scales (``kbit.blockwise`` decoding)."""
    if fmt.scale == "e8m0":
        d = scales.to(torch.float32) - _E8M0_BIAS
        return torch.ldexp(torch.ones_like(d), d)
    if global_scale is None:
        raise ValueError("nvfp4 needs its global scale to dequantize")
    return scales.view(torch.float8_e4m3fn).float() * global_scale.to(scales.device)


def dequantize_microscaling(
    packed: torch.Tensor,
    scales: torch.Tensor,
    fmt: Microscaling,
    numel: int,
    global_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
    *,
    config: KernelConfig = DEFAULT_CONFIG,
) -> torch.Tensor:
    """Inverse of :func:`quantize_microscaling`: 1-D ``numel`` values in ``out_dtype``."""
    divisors = microscaling_divisors(scales, fmt, global_scale)
    return dequantize_blockwise(
        packed, divisors, fmt.grid, fmt.block_size, fmt.bits, numel, out_dtype, config=config
    )
