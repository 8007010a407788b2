"""Host model of the shared-memory gathers of the 8-bit table codes, and of a 4-byte record
for the uniform layout (kernels_notes.md, "v12", last paragraph). CPU only, seconds.

    python benchmarks/uniform_record_model.py

1. Wavefronts per warp of one gather of pair records (8 or 4 bytes) from a shared-memory copy
   of the table, for the bucket indices that randn blocks of B values give (``pairs.bucket_of``
   on ``x / absmax``), 32 lanes taking values at random: a half warp (8-byte records) or a
   warp (4-byte records) needs as many wavefronts as the most distinct addresses falling into
   one bank (pair). ``R`` copies of the table with lane ``l`` reading copy ``l % R`` at
   ``index * R + l % R`` model table replication. The profiler measured 6.0 load wavefronts
   per 32 values for quantile8 (kernels_notes.md, "v8").
2. The share of values whose comparison with their bucket's midpoint a 4-byte record holding
   the top 24 bits of the midpoint's order-preserving integer (and the 8-bit code) leaves
   undecided: those in the midpoint's own cell of 256 integers.
3. The same in the bucket's own frame (kernels_notes.md, "v13"): ``r = fma(xn, K, K - idx)``
   is ``xn``'s offset from the bucket's centre rounded once, ``T = fma(mid, K, K - idx)`` the
   midpoint's, and rounding to nearest is monotone, so a record holding ``T``'s top 24 bits
   decides ``xn > mid`` as ``r > record`` wherever ``r`` lies outside ``T``'s run of 256
   float32 patterns; the share of values inside, and of 4096-value tiles with one (a tile
   would take the 8-byte path).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kbit.codebooks import codebook, quantile_codebook
from kbit.kernels import exact, pairs


def wavefronts(idx: np.ndarray, copies: int, record_bytes: int, rng, warps: int = 2000) -> float:
    """Mean wavefronts per warp-wide gather of ``record_bytes`` records (8 or 4)."""
    total = 0
    for _ in range(warps):
        lanes = idx[rng.choice(idx.size, 32, replace=False)]
        words = (lanes * copies + np.arange(32) % copies) * (record_bytes // 4)
        if record_bytes == 8:  # two half warps, 16 bank pairs each
            for half in (words[:16] // 2, words[16:] // 2):
                bank = half % 16
                total += max(len(set(half[bank == b])) for b in set(bank))
        else:
            bank = words % 32
            total += max(len(set(words[bank == b])) for b in set(bank))
    return total / warps


def order_key(v: np.ndarray) -> np.ndarray:
    """The order-preserving integer of float32 values (negative ones reversed)."""
    b = v.view(np.int32).astype(np.int64)
    return np.where(b < 0, b ^ 0x7FFFFFFF, b)


def frame_records(
    xn: np.ndarray, idx: np.ndarray, t: pairs.PairTables
) -> tuple[np.ndarray, np.ndarray]:
    """(r, record) per value of a uniform table in bucket ``idx`` (module docstring, 3): ``r``
    as float32, the record as int32 (``T``'s bits with the low byte replaced by the bucket's
    first code; a bucket without a midpoint gets +inf's bits, which no finite ``r`` exceeds)."""
    k = np.full(xn.shape, t.k, np.float32)
    off = (t.k - idx).astype(np.float32)
    r = exact.fma32(xn, k, off)
    mbits = (t.pack & 0xFFFFFFFF)[idx]
    mid = mbits.astype(np.uint32).view(np.float32)
    inside = np.isfinite(mid)
    tb = exact.fma32(np.where(inside, mid, 0), k, off).view(np.int32).astype(np.int64)
    tb = np.where(inside, tb, 0x7F800000)
    rec = (tb & ~np.int64(255)) | (t.pack >> 32)[idx]
    return r, rec.astype(np.uint32).view(np.int32)


def frame_undecided(r: np.ndarray, rec: np.ndarray) -> np.ndarray:
    """Values whose ``r`` shares the record's top 24 bits (the comparison needs the exact
    record)."""
    return ((r.view(np.int32).astype(np.int64) ^ rec.astype(np.int64)) & -256) == 0


def main() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(1 << 22).astype(np.float32)
    books = {
        "nf8": codebook("nf", 8).numpy(),
        "quantile8": quantile_codebook(torch.from_numpy(x[: 1 << 17]), 8).numpy(),
        "dynamic8": codebook("dynamic", 8).numpy(),
    }
    for block in (64, 1024):
        xb = x.reshape(-1, block)
        xn = (xb / np.abs(xb).max(axis=1, keepdims=True)).astype(np.float32).ravel()
        for name, cb in books.items():
            t = pairs.build(cb.astype(np.float32))
            idx = pairs.bucket_of(xn, t)
            cells = ", ".join(
                f"R={r} {nb}B {wavefronts(idx, r, nb, rng):.2f}" for r in (1, 8) for nb in (8, 4)
            )
            line = f"B={block} {name} (layout {t.layout}, {t.nb} buckets): wavefronts {cells}"
            if t.layout == pairs.LAYOUT_UNIFORM:
                mid = (t.pack & 0xFFFFFFFF).astype(np.uint32).view(np.float32)[idx]
                open_ = np.isfinite(mid) & (order_key(xn) >> 8 == order_key(mid) >> 8)
                share = open_.mean()
                line += (
                    f"; undecided by a 24-bit prefix: {100 * share:.3f}% of values, "
                    f"{100 * (1 - (1 - share) ** 32):.1f}% of warps"
                )
                und = frame_undecided(*frame_records(xn, idx, t))
                tiles = und[: und.size // 4096 * 4096].reshape(-1, 4096).any(axis=1)
                line += (
                    f"; in the bucket's frame: {100 * und.mean():.5f}% of values, "
                    f"{100 * tiles.mean():.2f}% of 4096-value tiles"
                )
            print(line, flush=True)


if __name__ == "__main__":
    main()
