"""Launchers for the blockwise quantization kernels: input checks, table setup, path choice.

Two execution paths give identical results:

* fused (one read of ``x``): block sizes up to ``KernelConfig.max_fused_block``; packing also
  needs ``block_size % 8 == 0``. This covers every block size of the paper, and is the fast path.
* two-pass: a chunked absmax kernel, scale rounding in torch, then a flat kernel that reads the
  per-block scale. Used for per-tensor scaling (``block_size=None``) and very large blocks,
  where one block does not fit in one program's registers, and for packing when
  ``block_size % 8 != 0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from kbit.kernels import triton_kernels as tk

_SCALE_DTYPES = {
    torch.float16: tk.SCALE_FP16,
    torch.bfloat16: tk.SCALE_BF16,
    torch.float32: tk.SCALE_FP32,
}
_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_CODEBOOK = 256


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters. They change speed only, never results.

    ``tile`` / ``pack_tile``: values per program in the fused fake-quantize / pack kernels
    (whole blocks; at least one block). ``per_thread`` / ``pack_per_thread``: values per
    thread, which sets the warps per program.

    ``search``: how a normalized value finds its code. ``"tree"``: descent of the midpoint
    search tree, one table read per level. ``"bucket"``: one read of a record of the bucket
    that the value's bit pattern selects (for fake quantization a second, independent read and
    no codebook read). ``"bucket-mid"``: a 1-byte table of the bucket's first code, then a
    midpoint read and a codebook read. ``"bucket-smem"``: as ``bucket-mid``, the midpoints and
    the codebook read from a copy in shared memory. ``"auto"``: the tree for codebooks of at
    most ``bucket_min_entries`` entries; above, ``bucket`` for packing and, for fake
    quantization, ``bucket`` up to ``record_max_entries`` entries and ``bucket-mid`` beyond
    (the fastest of each on an H100; benchmarks/kernels_notes.md). A codebook without a bucket
    layout of one midpoint per bucket reads several midpoints (``bucket`` becomes
    ``bucket-mid``); one without any layout uses the tree.

    ``fast_div``: for fp16 inputs with fp16 scales, divide by the block scale with a reciprocal
    computed once per block and one FMA correction (correctly rounded there: checked on every
    fp16 value and scale) instead of ``div_rn``. ``reg_levels``: search-tree levels resolved by
    selects instead of table gathers; ``search_step``: tree levels resolved per vector load
    after those (1 = one gather per level). ``flat_groups`` / ``dequant_groups``: groups of 8
    values per program in the two-pass and dequantize kernels.

    ``mid_launch``: (smallest block, largest block, tile, values per thread) overriding
    ``tile`` / ``per_thread`` for fused fake quantization through ``bucket-mid`` (the 8-bit
    default). Its three dependent table reads per value keep more of them in flight with 32
    values per thread (and 2-4 warps per program); on an H100 that lifts nf8 at B = 1024 from
    69% to 74% of copy and every 8-bit type at B = 128..2048 to >= 71%, and loses at B = 64
    (benchmarks/kernels_notes.md, "v5").
    """

    tile: int = 2048
    per_thread: int = 16
    pack_tile: int = 4096
    pack_per_thread: int = 32
    search: str = "auto"
    bucket_min_entries: int = 8
    record_max_entries: int = 16
    fast_div: bool = True
    reg_levels: int = 2
    search_step: int = 1
    flat_groups: int = 256
    dequant_groups: int = 256
    dequant_warps: int = 4
    max_fused_block: int = 4096
    absmax_chunk: int = 4096
    mid_launch: tuple[tuple[int, int, int, int], ...] = (
        (128, 256, 4096, 32),
        (512, 2048, 2048, 32),
    )


DEFAULT_CONFIG = KernelConfig()

_SEARCH_MODES = {"tree": 0, "bucket": 1, "bucket-mid": 2, "bucket-smem": 3}
_table_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = {}
_bucket_cache: dict[tuple, _BucketTables | None] = {}


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


def _two_pass_scales(
    x: torch.Tensor, block: int, scale_dtype: torch.dtype, cfg: KernelConfig
) -> torch.Tensor:
    """Block scales (in ``scale_dtype``) from a chunked absmax pass and torch rounding."""
    n = x.numel()
    nblocks = -(-n // block)
    chunk = min(cfg.absmax_chunk, _pow2(block))
    nchunks = -(-block // chunk)
    part = torch.empty(nblocks * nchunks, dtype=torch.float32, device=x.device)
    tk.absmax_partial_kernel[(nblocks * nchunks,)](x, part, n, block, nchunks, C=chunk)
    absmax = part.view(nblocks, nchunks).amax(dim=1)
    return absmax.clamp(max=torch.finfo(scale_dtype).max).to(scale_dtype)


def _warps(values: int, per_thread: int) -> int:
    return max(1, min(16, values // (32 * per_thread)))


_WORD_DTYPES = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _resolve_search(cb: torch.Tensor, cfg: KernelConfig, pack: bool) -> str:
    """The search ``cfg.search`` names; ``auto``: see ``KernelConfig``."""
    if cfg.search not in (*_SEARCH_MODES, "auto"):
        allowed = ", ".join([*_SEARCH_MODES, "auto"])
        raise ValueError(f"search={cfg.search!r}: allowed are {allowed}")
    if cfg.search != "auto":
        return cfg.search
    if cb.numel() <= max(1, cfg.bucket_min_entries):
        return "tree"
    if pack or cb.numel() <= cfg.record_max_entries:
        return "bucket"
    return "bucket-mid"


def _search_args(cb: torch.Tensor, device: torch.device, cfg: KernelConfig, pack: bool) -> dict:
    """Tables and constexprs of the configured search (pointer arguments unused by a search
    get any tensor)."""
    name = _resolve_search(cb, cfg, pack)
    mode = _SEARCH_MODES[name]
    bt = None
    if mode:
        bt = _bucket_tables(cb.detach().to("cpu", torch.float32).contiguous(), device, mode)
    if bt is None:
        dummy = torch.zeros(1, dtype=torch.float32, device=device)
        kw = dict(SEARCH=0, BREF=1, BMLOW=0, BELOW=0, BNMAG=1, NTAB=1)
        return dict(fake=dummy, hi=dummy, pack=dummy, mids=dummy, cb=None, kw=kw)
    lay = bt.layout
    kw = dict(
        SEARCH=bt.mode, BREF=bt.refine, BMLOW=lay.mlow, BELOW=lay.elow, BNMAG=lay.nmag,
        NTAB=bt.ntab,
    )  # fmt: skip
    return dict(fake=bt.fake, hi=bt.hi, pack=bt.pack, mids=bt.mids, cb=bt.cb, kw=kw)


def _fake_launch(cfg: KernelConfig, block: int, search: int | None) -> tuple[int, int]:
    """Tile and values per thread of the fused fake-quantize kernel (see ``mid_launch``)."""
    if search == _SEARCH_MODES["bucket-mid"]:
        for lo, hi, tile, per_thread in cfg.mid_launch:
            if lo <= block <= hi:
                return tile, per_thread
    return cfg.tile, cfg.per_thread


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
    step = max(1, min(cfg.search_step, 4))
    tree, rec, cb, logp = _tables(codebook, bits, x.device, step)
    sa = _search_args(codebook, x.device, cfg, pack)
    skw = sa["kw"]
    if sa["cb"] is not None:
        cb = sa["cb"]
    fast_div = cfg.fast_div and x.is_cuda and x.dtype == torch.float16 and sdt == tk.SCALE_FP16
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
        return out, torch.empty(0, dtype=scale_dtype, device=x.device) if pack else None
    reg_levels = min(cfg.reg_levels, logp)
    kp = _pow2(k)
    if _use_fused(block_size, pack, cfg):
        bp = _pow2(block)
        tile, per_thread = _fake_launch(cfg, block, skw.get("SEARCH"))
        rows = max(1, (cfg.pack_tile if pack else tile) // bp)
        masked = bp != block or n % (rows * block) != 0
        grid = (-(-nblocks // rows),)
        if not pack:
            tk.fused_fake_kernel[grid](
                x, out, tree, rec, sa["fake"], sa["hi"], sa["mids"], cb, n,
                B=block, BP=bp, ROWS=rows, LOGP=logp, REG_LEVELS=reg_levels, STEP=step, **skw,
                SCALE_DT=sdt, FASTDIV=fast_div,
                MASKED=masked, num_warps=_warps(rows * bp, per_thread),
            )  # fmt: skip
            return out, None
        scales = torch.empty(nblocks, dtype=scale_dtype, device=x.device)
        words = k in _WORD_DTYPES
        dst = buf.view(_WORD_DTYPES[k]) if words else buf
        tk.fused_pack_kernel[grid](
            x, dst, scales, tree, rec, sa["pack"], sa["mids"], n, nblocks, nbytes,
            B=block, BP=bp, ROWS=rows, LOGP=logp, REG_LEVELS=reg_levels, STEP=step, **skw,
            SCALE_DT=sdt, FASTDIV=fast_div,
            K=k, KP=kp, WORDS=words, MASKED=masked,
            num_warps=_warps(rows * bp, cfg.pack_per_thread),
        )  # fmt: skip
        return out, scales
    scales = _two_pass_scales(x, block, scale_dtype, cfg)
    groups = cfg.flat_groups
    grid = (-(-n // (8 * groups)),)
    tk.flat_kernel[grid](
        x, out, scales.float(), tree, rec, sa["pack"] if pack else sa["fake"], sa["hi"],
        sa["mids"], cb, n, block, nbytes,
        G=groups, BLOG=_block_shift(block, nblocks), LOGP=logp, REG_LEVELS=reg_levels,
        STEP=step, **skw,
        PACK=pack, K=k, KP=kp, num_warps=_warps(8 * groups, cfg.per_thread),
    )  # fmt: skip
    return out, scales if pack else None


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
        packed.contiguous(), scales.contiguous(), cb, out, numel, block, nbytes,
        G=groups, BLOG=_block_shift(block, nblocks), K=bits, KP=_pow2(bits),
        num_warps=config.dequant_warps,
    )  # fmt: skip
    return out
