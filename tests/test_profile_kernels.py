"""benchmarks/profile_kernels.py: variant parsing and the calls it times (Triton's interpreter
on the CPU when available)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import profile_kernels


def test_parse_variants() -> None:
    v = profile_kernels.parse_variants("base=;w=pack_warp:4096/8,int_mid_table:0,search:arith")
    assert list(v) == ["base", "w"]
    assert v["w"].pack_warp == (4096, 8) and v["w"].int_mid_table == 0
    assert v["w"].search == "arith" and v["base"] == profile_kernels.DEFAULT_CONFIG
    with pytest.raises(ValueError, match="no KernelConfig field 'tile_size'"):
        profile_kernels.parse_variants("x=tile_size:4")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_calls_and_bytes() -> None:
    """Each case runs, moves the bytes it should count, and two configs agree bit for bit
    (in Triton's interpreter: a child pytest with TRITON_INTERPRET=1 unless already so)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        env = dict(os.environ, TRITON_INTERPRET="1")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               f"{__file__}::test_calls_and_bytes"]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-4000:]
        return
    x = torch.randn(4096, dtype=torch.float16)
    cfgs = profile_kernels.parse_variants("a=;b=int_mid_table:0,pack_warp:64/0")
    n = x.numel()
    want = {"pack:int4:64": 2 * n + n // 2 + 2 * (n // 64), "fake:nf4:64": 4 * n,
            "fake:nvfp4:16": 6 * n, "pack:mxfp4:32": 2 * n + n // 2 + n // 32}  # fmt: skip
    for case, nbytes in want.items():
        (fa, ba), (fb, bb) = (profile_kernels.make_call(case, x, c) for c in cfgs.values())
        assert ba == bb == nbytes, case
        assert profile_kernels.same_outputs(fa(), fb()), case


def test_median_rows() -> None:
    """bench_quant's rounds: per row each timing is the median over the rounds that measured
    it (a slow round does not move it), percentages within their round; a row that failed in
    one round keeps the others, one that failed in all keeps its error."""
    import bench_quant

    def row(case: str, ms: float, copy_gbs: float) -> dict:
        gbs = 4.0 / ms
        return dict(case=case, block=64, search="pair-smem", fake_ms=ms, fake_gbs=gbs,
                    fake_pct=100 * gbs / copy_gbs)  # fmt: skip

    err = dict(case="b", block=64, error="RuntimeError()")
    runs = [
        [row("a", 1.0, 4.0), dict(err)],
        [row("a", 1.3, 4.0), row("b", 2.0, 4.0)],  # a slow round
        [row("a", 1.1, 5.0), dict(err)],
        [dict(err, case="c")],
    ]
    got = {r["case"]: r for r in bench_quant.median_rows(runs)}
    assert got["a"]["fake_ms"] == 1.1 and got["a"]["fake_gbs"] == 4.0 / 1.1
    assert got["a"]["fake_pct_rounds"] == [100.0, 100 * (4 / 1.3) / 4, 100 * (4 / 1.1) / 5]
    assert got["a"]["fake_pct"] == 100 * (4 / 1.3) / 4  # the median percentage, not the 1.1 ms
    assert got["a"]["search"] == "pair-smem"
    assert got["b"]["fake_ms"] == 2.0 and "error" not in got["b"]
    assert got["c"]["error"] == "RuntimeError()"


def test_unsettled_rows_are_timed_again(monkeypatch) -> None:
    """Rows whose rounds differ by more than the spread in any operation are the only ones a
    settle round times again; their medians then take every round."""
    import bench_quant

    rounds = [[99.0, 98.0, 99.5], [82.1, 63.4, 61.1], [70.0, 60.0, 77.0]]
    rows = [
        dict(case=c, block=64, fake_pct_rounds=[90.0, 90.0, 90.0], quant_pct_rounds=r)
        for c, r in zip("abc", rounds, strict=True)
    ]
    rows.append(dict(case="d", block=32, error="RuntimeError()"))
    assert bench_quant.unsettled(rows, 5.0) == {("b", 64), ("c", 64)}
    assert bench_quant.unsettled(rows, 25.0) == set()

    timed = []

    def fake_time(x, case, block, copy_gbs, reps, dequant, pack_compare=False):
        timed.append((case.label, block))
        return dict(case=case.label, block=block, fake_ms=1.0, fake_pct=90.0)

    monkeypatch.setattr(bench_quant, "time_case", fake_time)
    monkeypatch.setattr(bench_quant, "_fmt_row", lambda row: "")
    case_list = bench_quant.cases(("int",), (4,)) + bench_quant.cases(("mx",), ())
    nv = [c for c in case_list if c.spec == "nvfp4"]
    got = bench_quant.bench_rows(None, case_list, (32, 64), 4000.0, (1, 1), False,
                                 only={("int4", 64), ("nvfp4", 16)})  # fmt: skip
    assert timed == [("int4", 64), ("nvfp4", 16)] and len(got) == 2 and nv
    timed.clear()
    bench_quant.bench_rows(None, case_list, (32, 64), 4000.0, (1, 1), False)
    assert len(timed) == 2 * len(case_list) + 1  # nvfp4 also at B = 16
