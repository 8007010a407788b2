"""benchmarks/summarize_quant.py: the README's kernel figures from one or more grid runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from summarize_quant import merged, summary


def _row(case: str, block: int, fake: float, quant: float) -> dict:
    fam = "".join(c for c in case if c.isalpha())
    return dict(case=case, family=fam, bits=int(case[-1]), block=block, fake_pct=fake,
                quant_pct=quant, dequant_pct=90.0)  # fmt: skip


def _result(rows: list[dict], device: str = "GPU A") -> dict:
    return dict(device=device, copy_gbs=4000.0, numel=1 << 20, rows=rows)


def test_later_rows_replace_earlier_ones_of_the_same_case_and_block() -> None:
    full = _result([_row("int4", 64, 90.0, 80.0), _row("nf8", 64, 84.0, 60.0),
                    _row("mxfp4", 32, 99.0, 50.0)])  # fmt: skip
    again = _result([_row("mxfp4", 32, 99.0, 91.0), _row("mxfp4", 64, 98.0, 92.0)])
    rows = merged([full, again])["rows"]
    got = {(r["case"], r["block"]): r["quant_pct"] for r in rows}
    assert got == {("int4", 64): 80.0, ("nf8", 64): 60.0, ("mxfp4", 32): 91.0,
                   ("mxfp4", 64): 92.0}  # fmt: skip
    text = summary(merged([full, again]))
    assert "packing >= 75% on 3 of 4" in text and "fake >= 85% on 3 of 4" in text
    assert "packing >= 75% on 1 of 3" in summary(full)


def test_tables_of_two_gpus_are_not_merged() -> None:
    with pytest.raises(SystemExit, match="one GPU per table"):
        merged([_result([]), _result([], device="GPU B")])
