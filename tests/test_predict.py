"""Prediction of post-quantization quality: laws recovered from synthetic data, held-out skill
of the forest (and none on noise), ranking of never-evaluated formats, report outputs."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from kbit.analysis.predict import (
    KUMAR_PUBLISHED,
    build_feature_table,
    candidate_specs,
    cross_validate,
    estimate_total_bits,
    evaluate_published,
    feature_columns,
    feature_importance,
    fit_law,
    fit_predictor,
    iso_sqnr_delta,
    law_comparison,
    law_delta,
    plot_predicted_vs_measured,
    prediction_study,
    rank_formats,
    ranking_hit_rate,
    summary_markdown,
)
from kbit.features import spec_features
from kbit.spec import QuantSpec

OUYANG_TRUE = {"k": 0.05, "alpha": 0.25, "beta": 0.5, "gamma": 5.0}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small fits gain nothing from BLAS threads; on a loaded machine they only wait."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


# ----------------------------------------------------------------------------- laws
def _grid(n, d, p) -> pd.DataFrame:
    return pd.DataFrame(
        list(itertools.product(n, d, p)), columns=["n_params", "train_tokens", "bits"]
    )


def _kumar_table(params, noise=0.002, seed=0) -> pd.DataFrame:
    g = _grid(np.geomspace(3e7, 2.2e8, 5), np.geomspace(1.5e9, 2.6e10, 5), range(3, 9))
    true = law_delta("kumar", params, g.n_params, g.train_tokens, g.bits)
    rng = np.random.default_rng(seed)
    return g.assign(delta_nll=true + rng.normal(0, noise, len(g)), true=true)


def _ouyang_table(seed=0) -> pd.DataFrame:
    g = _grid(np.geomspace(1.6e8, 1.2e10, 5), np.geomspace(1e9, 2e11, 6), range(2, 9))
    return g.assign(true=law_delta("ouyang", OUYANG_TRUE, g.n_params, g.train_tokens, g.bits))


def _close(fit, truth, rel):
    for k, v in truth.items():
        assert fit.params[k] == pytest.approx(v, rel=rel), (k, fit.params, fit.se)


def test_kumar_fit_recovers_the_published_constants_from_noisy_data():
    table = _kumar_table(KUMAR_PUBLISHED)
    fit = fit_law(table, "kumar")
    assert fit.status == "ok" and fit.n_points == len(table)
    _close(fit, {k: v for k, v in KUMAR_PUBLISHED.items() if k != "C_T"}, rel=0.05)
    assert fit.params["C_T"] == pytest.approx(KUMAR_PUBLISHED["C_T"], rel=0.3)
    for k, v in KUMAR_PUBLISHED.items():  # and the standard errors are honest
        assert abs(fit.params[k] - v) < 4 * fit.se[k], k
    assert fit.r2 > 0.99
    # the published constants describe this data as well as the fit does
    assert evaluate_published(table, "kumar").r2 == pytest.approx(fit.r2, abs=0.01)


def test_kumar_fit_follows_the_data_not_the_published_constants():
    other = {**KUMAR_PUBLISHED, "gamma_N": 0.1, "gamma_post": 0.8}
    table = _kumar_table(other)
    fit = fit_law(table, "kumar")
    assert fit.params["gamma_N"] == pytest.approx(0.1, abs=0.03)
    assert fit.params["gamma_post"] == pytest.approx(0.8, rel=0.05)
    assert evaluate_published(table, "kumar").r2 < fit.r2 - 0.2


def test_ouyang_fit_recovers_its_constants_in_both_noise_models():
    t = _ouyang_table()
    rng = np.random.default_rng(1)
    additive = fit_law(t.assign(delta_nll=t.true + rng.normal(0, 0.01, len(t))), "ouyang")
    multiplicative = fit_law(
        t.assign(delta_nll=t.true * np.exp(rng.normal(0, 0.05, len(t)))), "ouyang", space="log"
    )
    for fit in (additive, multiplicative):
        assert fit.status == "ok"
        _close(fit, {k: v for k, v in OUYANG_TRUE.items() if k != "k"}, rel=0.03)
        assert fit.params["k"] == pytest.approx(OUYANG_TRUE["k"], rel=0.15)
    assert evaluate_published(t.assign(delta_nll=t.true), "ouyang").status.startswith(
        "no published"
    )


def test_log_space_fit_drops_and_counts_non_positive_degradations():
    t = _ouyang_table()
    y = t.true.to_numpy().copy()
    y[:5] = -1e-4
    fit = fit_law(t.assign(delta_nll=y), "ouyang", space="log")
    assert fit.n_dropped == 5 and fit.n_points == len(t)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda t: t.drop(columns="train_tokens"), "no train_tokens column"),
        (lambda t: t.assign(train_tokens=3e11), "a single value of D"),
        (lambda t: t.assign(train_tokens=20 * t.n_params), "collinear"),
        (lambda t: t.head(4), "a single value of"),
    ],
)
def test_laws_say_not_enough_data(change, reason):
    t = _ouyang_table().assign(delta_nll=lambda d: d.true)
    for law in ("kumar", "ouyang"):
        fit = fit_law(change(t), law)
        assert fit.status.startswith("not enough data") and reason in fit.status
        assert math.isnan(fit.r2)


# ----------------------------------------------------------------------------- synthetic study
SPECS = [
    "int3-b64",
    "int4-b64",
    "int4-b1024",
    "int8-b64",
    "float3-b64",
    "float4-b64",
    "float4-b256",
    "float4-b1024",
    "float5-b64",
    "float6-b64",
    "nf4-b64",
    "nf4-b256",
]
FAMILIES = {"fa": 1.0, "fb": 0.9, "fc": 1.15, "fd": 1.05, "fe": 0.95}
SIZES = (1e8, 3e8, 1e9, 3e9)
DTYPE_GAIN = {"int": 0.0, "float": 1.0, "nf": 1.5}


def _true_sqnr(spec: QuantSpec) -> float:
    return 6.02 * spec.bits - 6.0 + DTYPE_GAIN[spec.dtype] - 1.2 * math.log2(spec.block_size / 64)


def synthetic_scores(seed=0, noise=0.003, signal=True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A scores table and matching quant features from a known law.

    nll = fp16_nll + delta, delta = c_f * 10^(-SQNR/10) * 40 * (N / 1e8)^-0.35: degradation
    follows the noise power of the format, shrinks with size, and each family has its own
    sensitivity c_f. ``signal=False`` replaces every NLL by pure noise.
    """
    rng = np.random.default_rng(seed)
    scores, feats = [], []
    for fam, c in FAMILIES.items():
        for i, n in enumerate(SIZES):
            model = f"{fam}-{i}"
            fp16 = c * (2.0 + 3.0 * (n / 1e8) ** -0.1)
            meta = {"model": model, "family": fam, "n_params": n, "train_tokens": 3e11 * c}
            scores.append({**meta, "quant": "fp16", "total_bits": 16 * n, "value": math.exp(fp16)})
            for q in SPECS:
                spec = QuantSpec.parse(q)
                sqnr = _true_sqnr(spec)
                delta = c * 40 * 10 ** (-sqnr / 10) * (n / 1e8) ** -0.35
                nll = fp16 + delta + rng.normal(0, noise)
                if not signal:
                    nll = rng.normal(3.0, 0.3)
                bits = estimate_total_bits(spec, n, 0.9 * n, 24)
                scores.append({**meta, "quant": q, "total_bits": bits, "value": math.exp(nll)})
                feats.append(
                    {
                        "model": model,
                        "quant": q,
                        "sqnr_db_mean": sqnr + rng.normal(0, 0.05),
                        "sqnr_nsr_mean_db": sqnr - 0.5 + rng.normal(0, 0.05),
                        "n_params_quantized": 0.9 * n,
                        "n_tensors_quantized": 24,
                        "quantized_fraction": 0.9,
                    }
                )
    s = pd.DataFrame(scores).assign(target="wikitext:word_perplexity")
    return s, pd.DataFrame(feats)


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    scores, qf = synthetic_scores()
    return build_feature_table(scores, qf, acc_target=None)


def test_feature_table_has_targets_baselines_and_spec_columns(table):
    assert len(table) == len(FAMILIES) * len(SIZES) * len(SPECS)
    assert "fp16" not in set(table["quant"])
    row = table[(table.model == "fa-0") & (table.quant == "int4-b64")].iloc[0]
    scores, _ = synthetic_scores()
    ppl = scores[(scores.model == "fa-0") & (scores.quant == "int4-b64")]["value"].iloc[0]
    fp16 = scores[(scores.model == "fa-0") & (scores.quant == "fp16")]["value"].iloc[0]
    assert row["nll"] == pytest.approx(math.log(ppl))
    assert row["fp16_nll"] == pytest.approx(math.log(fp16))
    assert row["delta_nll"] == pytest.approx(math.log(ppl) - math.log(fp16))
    assert row["bits"] == 4 and row["log2_block_size"] == 6 and row["dtype_int"] == 1.0
    assert row["log10_n_params"] == pytest.approx(8.0)
    assert row["sqnr_db_mean"] == pytest.approx(_true_sqnr(QuantSpec.parse("int4-b64")), abs=0.3)
    cols = feature_columns(table)
    assert "sqnr_db_mean" in cols and "fp16_nll" in cols
    assert "outlier_fraction" not in cols  # no spread: nothing to learn from


def test_feature_table_without_a_baseline_keeps_nan_not_a_guess():
    scores, _ = synthetic_scores()
    scores = scores[~((scores.model == "fa-0") & (scores.quant == "fp16"))]
    t = build_feature_table(scores, acc_target=None)
    assert t.loc[t.model == "fa-0", "fp16_nll"].isna().all()
    assert t.loc[t.model == "fa-1", "fp16_nll"].notna().all()


def test_feature_table_rejects_missing_targets():
    scores, _ = synthetic_scores()
    with pytest.raises(ValueError, match="available"):
        build_feature_table(scores.assign(target="piqa:acc"))


def test_forest_beats_a_constant_on_held_out_families(table):
    v = cross_validate(table, "nll", "family", n_estimators=60)
    m = v.metrics.set_index("kind")
    assert v.status == "ok" and m.loc["forest", "n_groups"] == len(FAMILIES)
    assert m.loc["forest", "r2"] > 0.9
    assert m.loc["forest", "r2_delta"] > 0.5
    assert m.loc["forest", "r2_delta"] > m.loc["constant", "r2_delta"] + 0.5
    assert m.loc["constant", "r2"] <= 0.0
    assert m.loc["forest", "mae"] < m.loc["constant", "mae"]
    p = v.predictions[v.predictions.kind == "forest"]
    assert (p.lo <= p.pred + 1e-12).all() and (p.pred <= p.hi + 1e-12).all()
    # every prediction of a family came from a forest that never saw it
    assert set(p.group) == set(p.family) and (p.group == p.family).all()


def test_forest_claims_no_skill_on_pure_noise():
    scores, qf = synthetic_scores(signal=False)
    t = build_feature_table(scores, qf, acc_target=None)
    for group_by in ("family", "model"):
        kinds = ("forest", "ridge")
        m = cross_validate(t, "nll", group_by, kinds, n_estimators=30).metrics.set_index("kind")
        assert m.loc["forest", "r2"] < 0.05, group_by
        assert m.loc["ridge", "r2"] < 0.05, group_by


def test_too_few_families_are_reported_not_validated(table):
    two = table[table.family.isin(["fa", "fb"])]
    v = cross_validate(two, "nll", "family")
    assert v.status.startswith("too few family groups") and v.predictions.empty
    assert v.metrics["r2"].isna().all()


def test_leave_one_model_out_runs_and_scores(table):
    v = cross_validate(table, "delta_nll", "model", ("forest", "constant"), n_estimators=30)
    m = v.metrics.set_index("kind")
    assert m.loc["forest", "n_groups"] == len(FAMILIES) * len(SIZES)
    assert m.loc["forest", "r2"] > 0.7 > m.loc["constant", "r2"]


def test_importance_finds_the_signal_and_not_the_noise(table):
    noisy = table.assign(junk=np.random.default_rng(0).normal(size=len(table)))
    cols = ["sqnr_nsr_mean_db", "log10_n_params", "junk"]
    pred = fit_predictor(noisy, "delta_nll", "forest", cols, n_estimators=100)
    imp = feature_importance(pred, noisy, n_repeats=5).set_index("feature")
    assert imp.index[0] == "sqnr_nsr_mean_db"
    assert (
        imp.loc["junk", "permutation_mean"] < 0.05 < imp.loc["log10_n_params", "permutation_mean"]
    )
    assert imp["impurity"].sum() == pytest.approx(1.0)


def test_non_finite_features_are_encoded_explicitly(table):
    t = table.copy()
    t.loc[t.quant == "int4-b64", "log2_block_size"] = math.inf  # as a per-tensor block
    t.loc[t.quant == "nf4-b64", "sqnr_db_mean"] = math.nan
    pred = fit_predictor(t, "nll", "ridge", ["log2_block_size", "sqnr_db_mean", "fp16_nll"])
    enc = pred.encoder
    assert enc.fill["log2_block_size"][1] == pytest.approx(10.0 + 1.0)  # max finite (1024) + 1
    assert enc.imputed == {"log2_block_size": 20, "sqnr_db_mean": 20}
    assert np.isfinite(enc.transform(t)).all()


def test_iso_sqnr_delta_interpolates_the_radial_profile():
    radii, losses = [0.1, 1.0], [2.2, 4.0]
    assert iso_sqnr_delta(radii, losses, 2.0, 20.0) == pytest.approx(0.1)  # r = 0.1
    assert iso_sqnr_delta(radii, losses, 2.0, 40.0) == pytest.approx(0.01)  # r = 0.01
    assert math.isnan(iso_sqnr_delta(radii, losses, 2.0, -10.0))  # beyond the radii measured
    assert iso_sqnr_delta(radii, losses, 2.0, math.inf) == 0.0


def test_model_features_survive_parquet_and_feed_the_landscape_columns(tmp_path):
    from kbit.io import write_parquet

    scores, qf = synthetic_scores()
    models = sorted(scores.model.unique())
    mf = pd.DataFrame(
        {
            "model": models,
            "base_loss": 3.0,
            "r_rise_1pct": [0.05 * (i + 1) for i in range(len(models))],
            "r_rise_10pct": math.inf,  # never reached: explicit, not missing
            "hessian_trace_per_param": np.linspace(1e-4, 1e-3, len(models)),
            "radial_radii": [[0.01, 0.1, 1.0]] * len(models),
            "radial_loss": [[3.0, 3.3, 6.0]] * len(models),
        }
    )
    mf = mf[mf.model != "fa-0"]  # a model without landscape features
    back = pd.read_parquet(write_parquet(mf, tmp_path / "m.parquet"))
    t = build_feature_table(scores, qf, back, acc_target=None)
    row = t[(t.model == "fb-0") & (t.quant == "int4-b64")].iloc[0]
    r = 10 ** (-row["sqnr_nsr_mean_db"] / 20)  # about 0.13: between radii 0.1 and 1.0
    assert 0.1 < r < 1.0
    assert row["iso_sqnr_rel_delta"] == pytest.approx((3.3 + 2.7 * (r - 0.1) / 0.9) / 3.0 - 1)
    assert row["log10_r_rise_10pct"] == math.inf
    assert t.loc[t.model == "fa-0", "iso_sqnr_rel_delta"].isna().all()
    assert {"log10_r_rise_1pct", "iso_sqnr_rel_delta"} <= set(feature_columns(t))
    assert "log10_r_rise_10pct" not in feature_columns(t)  # no spread


# ----------------------------------------------------------------------------- laws vs forest
def test_law_comparison_puts_laws_next_to_the_forest(table):
    v = cross_validate(table, "nll", "family", kinds=("forest",), n_estimators=50)
    laws = law_comparison(table, v, n_estimators=50).set_index(["model", "constants"])
    assert laws.loc[("kumar", "fitted"), "status"] == "ok"
    assert laws.loc[("ouyang", "published"), "status"].startswith("no published")
    assert np.isfinite(laws.loc[("forest", "in-sample"), "r2"])
    held = laws.loc[("forest", "leave-one-family-out")]
    assert held["n_points"] == len(table) and held["r2"] > 0.5


# ----------------------------------------------------------------------------- ranking
def test_estimate_total_bits_matches_the_accounting():
    from kbit.accounting import predict_tensor_bits

    sizes = [4096, 12288, 1000]
    for q in ("int4-b64", "float3-b1024", "nf4-bt", "quantile4-b64", "mxfp4"):
        exact = sum(predict_tensor_bits(q, s) for s in sizes) + 16 * 500
        assert estimate_total_bits(q, sum(sizes) + 500, sum(sizes), tensor_sizes=sizes) == exact
    assert estimate_total_bits("fp16", 10, 8) == 160


def test_candidates_are_valid_specs_and_skip_invalid_combinations():
    c = candidate_specs(dtypes=("int", "mxfp"), bits=(3, 4), block_sizes=(64,), methods=("rtn",))
    assert [s.id for s in c] == ["int3-b64", "int4-b64", "mxfp4-e2-b64"]
    mixed = candidate_specs(("mxint",), (8,), (32,), ("rtn", "gptq"), mixed_ratios=(0.5, 0.9))
    assert [s.mixed_ratio for s in mixed] == [0.5, 0.9]  # gptq has no mixed form: skipped
    full, half = (estimate_total_bits(s, 1000, 800, 1) for s in (mixed[0].low_spec(), mixed[0]))
    assert half == pytest.approx((full + 16 * 1000) / 2, rel=1e-3)


def test_ranking_never_returns_an_evaluated_format_and_respects_the_budget(table):
    model = "fc-2"
    n = table.loc[table.model == model, "n_params"].iloc[0]
    budget = 5.0 * n
    r = rank_formats(table, model, budget, n_estimators=50)
    evaluated = set(table.loc[table.model == model, "quant"])
    assert len(r) and not set(r.quant) & evaluated
    assert (r.total_bits <= budget).all() and r.predicted.all()
    assert list(r["rank"]) == list(range(1, len(r) + 1))
    assert (np.diff(r.pred.to_numpy()) >= 0).all()  # NLL: lowest first
    # data types and methods never evaluated are not ranked (no gptq, no quantile in the study)
    assert not r.quant.str.contains("gptq").any() and not r.dtype.eq("quantile").any()
    assert (r.lo <= r.pred).all() and (r.pred <= r.hi).all()
    assert r.loc[r.bits == 2, "extrapolated"].all() and not r.loc[r.bits == 4, "extrapolated"].any()
    # no mixed-precision run in the study: a mixed candidate is not ranked
    mixed = QuantSpec(dtype="int", bits=4, block_size=32, mixed_ratio=0.5)
    only = rank_formats(table, model, 1e30, candidates=[mixed, "int4-b32"], n_estimators=10)
    assert list(only.quant) == ["int4-b32"]


def test_ranking_with_measured_sqnr_orders_candidates_by_the_truth(table):
    model = "fd-1"
    cands = ["int5-b64", "float5-b256", "int6-b256", "nf5-b64", "float7-b64", "int3-b256"]
    feats = pd.DataFrame(
        [
            {
                "quant": q,
                "sqnr_db_mean": _true_sqnr(QuantSpec.parse(q)),
                "sqnr_nsr_mean_db": _true_sqnr(QuantSpec.parse(q)) - 0.5,
            }
            for q in cands
        ]
    )
    r = rank_formats(
        table, model, 1e30, candidates=cands, candidate_features=feats, n_estimators=60
    )
    truth = {q: -_true_sqnr(QuantSpec.parse(q)) for q in cands}  # less noise, lower NLL
    order = [QuantSpec.parse(q).id for q in sorted(cands, key=truth.get)]
    assert r.quant.iloc[0] == order[0] and r.quant.iloc[-1] == order[-1]


def test_ranking_says_when_nothing_fits(table):
    with pytest.raises(ValueError, match="fits in"):
        rank_formats(table, "fa-0", 10.0, n_estimators=10)
    with pytest.raises(ValueError, match="not in the table"):
        rank_formats(table, "nope", 1e12)


def test_hit_rate_beats_chance_with_signal_and_not_on_noise():
    def rate(signal):
        scores, qf = synthetic_scores(signal=signal)
        t = build_feature_table(scores, qf, acc_target=None)
        t = t[t.family.isin(["fa", "fb"]) & t.model.str.endswith(("-0", "-3"))]
        return ranking_hit_rate(t, n_estimators=15)

    good, noise = rate(True), rate(False)
    assert good.status == "ok" and good.n_cases == noise.n_cases > 0
    assert good.n_fits == 4 * len(SPECS)
    assert good.rate > good.chance + 0.3
    assert good.rate > noise.rate
    assert noise.rate < noise.chance + 0.3


# ----------------------------------------------------------------------------- report
def test_figure_and_summary(table, tmp_path):
    study = prediction_study(table, n_estimators=15, check_ranking=False)
    fam = study.validations["family"]
    path = plot_predicted_vs_measured(fam, tmp_path / "pred.png")
    assert path.stat().st_size > 10_000
    md = study.markdown()
    r2 = fam.metrics.set_index("kind").loc["forest", "r2"]
    assert f"{r2:.3f}" in md and "Leave-one-family-out" in md and "kumar" in md
    tables = study.tables()
    assert set(tables) == {"validation", "predictions", "importance", "laws", "ranking_check"}
    assert set(tables["validation"]["group_by"]) == {"family", "model"}
    with pytest.raises(ValueError, match="no held-out"):
        plot_predicted_vs_measured(fam, tmp_path / "x.png", kind="nope")
    assert "Ranking check" in summary_markdown(fam, None, ranking_hit_rate(table.head(3)))


def test_spec_features_feed_the_table(table):
    assert spec_features("int4-b64")["quant"] in set(table.quant)
