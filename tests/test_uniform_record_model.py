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
