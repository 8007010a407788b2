"""Curves, the three fits and optimal precision on data with a known generating law."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from synthetic import FOUR_BIT_OPTIMAL, analysed

from kbit.analysis.curves import ACCURACY_TARGET, interp, main_sweep_quants, variation_groups
from kbit.analysis.fits import fit_base_offset, fit_power_law, loo_interpolation


def _fit(laws, fit, target=ACCURACY_TARGET):
    f = laws["fits"]
    return f[(f.fit == fit) & (f.target == target)].set_index("term")


def test_interp_is_piecewise_linear_and_nan_outside():
    x = np.array([2.0, 0.0, 1.0])
    y = np.array([[4.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    got = interp(x, y, np.array([-0.5, 0.0, 0.5, 1.5, 2.0, 2.5]))
    assert np.isnan(got[:, [0, 5]]).all()
    assert got[0, 1:5] == pytest.approx([0.0, 0.5, 2.5, 4.0])
    assert got[1, 1:5] == pytest.approx([1.0] * 4)


def test_main_sweep_is_found_from_spec_fields():
    a = analysed()
    quants = main_sweep_quants(a.laws["curves"])
    assert quants == [*(f"float{b}-e{2 if b == 3 else 3}-b64" for b in range(3, 9)), "fp16"]
    groups = variation_groups(a.laws["curves"], "block_size", {"bits": 4})
    assert set(groups[0].block_size) == {64, 256, 1024}


def test_base_offset_recovers_exact_offsets():
    rng = np.random.default_rng(0)
    x = rng.uniform(28, 36, 40)
    prec = rng.choice([3, 4, 8, 16], 40)
    true = {3: -0.05, 4: 0.02, 8: 0.01, 16: 0.0}
    y = 0.5 + 0.07 * (x - 32) - 0.003 * (x - 32) ** 2 + np.array([true[p] for p in prec])
    f = fit_base_offset(x, y, prec, degree=2, x0=32.0)
    est = dict(zip(f["names"], f["estimate"], strict=True))
    assert est["c0"] == pytest.approx(0.5, abs=1e-9)
    assert est["c1"] == pytest.approx(0.07, abs=1e-9)
    for p in (3, 4, 8):
        assert est[f"offset_{p}"] == pytest.approx(true[p], abs=1e-9)
    assert f["reference"] == 16


def test_base_offset_offsets_within_their_intervals():
    fit = _fit(analysed().laws, "base_offset")
    ref = FOUR_BIT_OPTIMAL[16]
    covered_jac = covered_boot = 0
    for p in (3, 4, 5, 6, 7, 8):
        row = fit.loc[f"offset_{p}"]
        truth = FOUR_BIT_OPTIMAL[p] - ref
        covered_jac += row.ci_low <= truth <= row.ci_high
        covered_boot += row.boot_ci_low <= truth <= row.boot_ci_high
        assert abs(row.estimate - truth) < 0.015
    assert covered_jac >= 5 and covered_boot >= 5
    assert fit.loc["r2", "estimate"] > 0.99


def test_power_law_recovers_noiseless_parameters():
    n = np.repeat([1e8, 3e8, 1e9, 3e9, 1e10], 4)
    k = np.tile([3, 4, 8, 16], 5).astype(float)
    y = 0.8 - 0.12 * (n / 1e9) ** -0.3 - 0.5 * k**-1.5
    f = fit_power_law(n, k, y, sign=-1.0)
    assert f["estimate"] == pytest.approx([0.8, 0.12, 0.3, 0.5, 1.5], rel=1e-3)


def test_every_fit_reports_goodness_of_fit():
    fits = analysed().laws["fits"]
    for fit in ("interpolation", "base_offset", "power_law"):
        terms = set(fits[(fits.fit == fit) & (fits.target == ACCURACY_TARGET)].term)
        assert {"r2", "rmse", "aic", "loo_rmse", "n_points"} <= terms, fit
    # parallel curves: the shared-base model predicts held-out models better than the power law
    loo = {
        f: _fit(analysed().laws, f).loc["loo_rmse", "estimate"]
        for f in ("base_offset", "power_law", "interpolation")
    }
    assert loo["base_offset"] < loo["power_law"]


def test_loo_interpolation_is_exact_on_lines():
    df = pd.DataFrame(
        {
            "quant": ["a"] * 4,
            "model": list("wxyz"),
            "x": [1.0, 2.0, 3.0, 4.0],
            "y": [2.0, 4.0, 6.0, 8.0],
        }
    )
    assert loo_interpolation(df) == pytest.approx([2.0, 4.0, 6.0, 8.0])


def test_four_bit_optimal_at_most_budgets():
    o = analysed().laws["optimal"]
    o = o[(o.target == ACCURACY_TARGET) & (o.n_curves >= 2)]
    assert (o.best_precision == 4).mean() >= 0.75
    assert o.loc[o.best_precision == 4, "freq_best"].median() > 0.8


def test_flipped_data_flips_the_optimum():
    o = analysed("eight").laws["optimal"]
    o = o[(o.target == ACCURACY_TARGET) & (o.n_curves >= 2)]
    assert (o.best_precision == 4).mean() <= 0.1
    # wherever the 8-bit curve is available, the most bits available win
    assert (o.best_precision >= 7).mean() >= 0.5


def test_perplexity_curves_are_fitted_in_log_space():
    fits = analysed().laws["fits"]
    ppl = fits[(fits.target == "wikitext:word_perplexity") & (fits.fit == "base_offset")]
    assert ppl.set_index("term").loc["r2", "estimate"] > 0.9


def test_main_sweep_follows_the_study_sweep_names_then_prefers_float():
    from synthetic import make_study

    from kbit.analysis.tables import aggregate

    offsets = {4: 0.0, 8: 0.0, 16: 0.0}
    study = make_study(offsets, n_docs=10, extras=False, tasks=("piqa",))
    ints = study.docs.assign(
        quant=study.docs.quant.str.replace("float", "int").str.replace("-e3", ""),
        dtype=study.docs.dtype.replace("float", "int"),
        exponent_bits=np.nan,
    )
    docs = pd.concat([study.docs, ints[ints.quant != "fp16"]], ignore_index=True)
    scores, _ = aggregate([docs])
    assert main_sweep_quants(scores) == ["float4-e3-b64", "float8-e3-b64", "fp16"]
    scores, _ = aggregate([docs], sweeps={"precision": ["int4-b64", "int8-b64"]})
    assert main_sweep_quants(scores) == ["int4-b64", "int8-b64", "fp16"]
    assert set(scores.loc[scores.quant == "int4-b64", "sweeps"]) == {"precision"}
