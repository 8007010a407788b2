"""`kbit advise`: budget parsing, the best configuration for a budget, the fewest bits."""

from __future__ import annotations

import pytest
from synthetic import analysed

from kbit.analysis.advise import best_for_budget, candidates, fewest_bits, parse_budget
from kbit.cli import main
from kbit.io import write_parquet


@pytest.mark.parametrize(
    ("text", "bits"),
    [
        ("8GB", 8e9 * 8),
        ("8 GiB", 8 * 2**30 * 8),
        ("500MB", 500e6 * 8),
        ("1.5e3 kB", 1.5e6 * 8),
        ("6.4e10bits", 6.4e10),
        ("1000", 1000.0),
        (2048, 2048.0),
        ("3 bytes", 24.0),
    ],
)
def test_parse_budget(text, bits):
    assert parse_budget(text) == pytest.approx(bits)


@pytest.mark.parametrize("text", ["8 parsecs", "GB", "-1GB", "0", "8XB"])
def test_parse_budget_rejects_bad_input(text):
    with pytest.raises(ValueError, match="budget"):
        parse_budget(text)


@pytest.fixture(scope="module")
def cands():
    a = analysed()
    return a, candidates(a.laws["curves"], a.laws["bootstrap"], family="pythia")


def test_budget_picks_the_known_best_configuration(cands):
    a, c = cands
    truth = a.study.truth
    # a budget just above the largest model at 4 bits: by construction its 4-bit float or
    # quantile configuration (offset 0 / +0.005) beats every other configuration that fits
    budget = truth[(truth.model == "pythia-3") & (truth.quant == "float4-e3-b64")].total_bits
    best = best_for_budget(c, float(budget.iloc[0]) * 1.001)[0]
    assert best.model == "pythia-3" and best.bits == 4
    assert best.ci_low <= best.value <= best.ci_high
    # ... and the truth agrees
    fits = truth[truth.total_bits <= float(budget.iloc[0]) * 1.001]
    assert fits.loc[fits.acc.idxmax(), "model"] == "pythia-3"


def test_target_accuracy_gives_the_fewest_bits(cands):
    _, c = cands
    recs = fewest_bits(c, 0.55)
    assert all(r.value >= 0.55 for r in recs)
    assert [r.total_bits for r in recs] == sorted(r.total_bits for r in recs)
    assert recs[0].total_bits == c[c.value >= 0.55].total_bits.min()
    with pytest.raises(ValueError, match="reaches"):
        fewest_bits(c, 0.99)


def test_errors_name_what_is_wrong(cands):
    a, c = cands
    with pytest.raises(ValueError, match="no evaluated configuration fits"):
        best_for_budget(c, 1e3)
    with pytest.raises(ValueError, match="family 'opt' not in the results"):
        candidates(a.laws["curves"], None, family="opt")


def test_cli(cands, tmp_path, capsys):
    a, _ = cands
    laws = tmp_path / "laws"
    for name, df in a.laws.items():
        write_parquet(df, laws / f"{name}.parquet")
    assert main(["advise", "--budget", "1GB", "--family", "pythia", "--laws", str(laws)]) == 0
    out = capsys.readouterr().out
    assert "Best evaluated configurations within 1.00 GB" in out and "1. pythia-" in out
    assert "interpolated: pythia: the interpolated curves favour 4-bit" in out
    assert main(["advise", "--target-acc", "0.5", "--laws", str(laws)]) == 0
    assert "Fewest bits" in capsys.readouterr().out
    assert main(["advise", "--budget", "8 parsecs", "--laws", str(laws)]) == 2
    assert "unknown budget unit" in capsys.readouterr().err
    missing = tmp_path / "nowhere"
    assert (
        main(
            [
                "advise",
                "--budget",
                "1GB",
                "--laws",
                str(missing),
                "--scores",
                str(missing / "s.parquet"),
            ]
        )
        == 2
    )
    assert "run the workflow" in capsys.readouterr().err
