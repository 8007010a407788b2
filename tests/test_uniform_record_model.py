"""benchmarks/uniform_record_model.py: the bank model counts the wavefronts shared memory
needs on gathers whose answer is known, and the order key sorts floats as numbers."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import uniform_record_model as model


def test_wavefronts_of_known_gathers() -> None:
    rng = np.random.default_rng(0)
    same = np.zeros(64, np.int64)  # every lane one address: a broadcast
    assert model.wavefronts(same, 1, 4, rng, warps=20) == 1
    assert model.wavefronts(same, 1, 8, rng, warps=20) == 2  # two half warps
    one_bank = np.arange(32, dtype=np.int64) * 32  # 4-byte records, all in bank 0
    assert model.wavefronts(one_bank, 1, 4, rng, warps=20) == 32
    # eight copies, lane l reading copy l % 8: the 32 lanes reach 8 banks, 4 addresses each
    assert model.wavefronts(one_bank, 8, 4, rng, warps=20) == 4
    distinct = np.arange(32, dtype=np.int64)  # consecutive 4-byte records: conflict-free
    assert model.wavefronts(distinct, 1, 4, rng, warps=20) == 1


def test_order_key_sorts_floats() -> None:
    v = np.array([-3.0, -1.0, -1e-30, -0.0, 0.0, 1e-30, 2.0, np.inf], np.float32)
    k = model.order_key(v)
    assert np.all(np.diff(k) >= 0) and k[3] < k[4]


def test_bucket_frame_records_decide_exactly() -> None:
    """Outside the record's run the bucket-frame comparison ``r > record`` equals
    ``xn > mid`` for every value (random blocks, every midpoint and its float neighbours);
    few random values are undecided, and a midpoint itself always is (``r`` equals ``T``)."""
    import torch

    from kbit.codebooks import codebook, quantile_codebook
    from kbit.kernels import pairs

    rng = np.random.default_rng(1)
    x = rng.standard_normal(1 << 16).astype(np.float32).reshape(-1, 64)
    xn = (x / np.abs(x).max(axis=1, keepdims=True)).astype(np.float32).ravel()
    data = torch.from_numpy(rng.standard_normal(1 << 14).astype(np.float32))
    for cb in (codebook("nf", 8).numpy(), quantile_codebook(data, 8).numpy()):
        t = pairs.build(cb.astype(np.float32), "uniform")
        mids = ((cb[:-1] + cb[1:]) / np.float32(2)).astype(np.float32)
        near = np.concatenate([mids, np.nextafter(mids, np.float32(2)),
                               np.nextafter(mids, np.float32(-2))])  # fmt: skip
        v = np.concatenate([xn, near]).astype(np.float32)
        idx = pairs.bucket_of(v, t)
        r, rec = model.frame_records(v, idx, t)
        und = model.frame_undecided(r, rec)
        mid = (t.pack[idx] & 0xFFFFFFFF).astype(np.uint32).view(np.float32)
        want = (t.pack[idx] >> 32) + (v > mid)
        got = (rec.astype(np.int64) & 255) + (r > rec.view(np.float32))
        assert np.array_equal(got[~und], want[~und])
        assert und[: xn.size].mean() < 1e-3  # random values: almost all decided
        assert und[xn.size : xn.size + mids.size].all()  # a midpoint itself never is
