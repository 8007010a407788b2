"""Predicting post-quantization quality from cheap features (Xu et al. 2024, arXiv 2410.12119),
next to two published post-training-quantization laws.

A study evaluates some (model, format) pairs; this module predicts the others:

- :func:`build_feature_table`: one row per quantized (model, quant) from the ``scores`` table,
  with the model's 16-bit loss, the format descriptors, the per-tensor SQNR aggregates and the
  per-model loss-landscape features of :mod:`kbit.features`, and the targets: ``nll``
  (post-quantization NLL = log perplexity of the perplexity task, nats per word for WikiText),
  ``delta_nll`` (minus the 16-bit NLL), ``acc`` and ``delta_acc`` (mean zero-shot accuracy).
- :func:`fit_predictor`: a seeded random forest (intervals from the spread of its trees), a
  ridge baseline on standardised features, or a constant; :func:`cross_validate` holds out one
  family (the paper's test) or one model at a time and reports R^2 and mean absolute error of
  the pooled held-out predictions, or says that there are too few groups to validate.
- :func:`fit_law`: Kumar et al. 2024 (``delta = C_T D^gD / N^gN exp(-P / g)``) and Ouyang et
  al. 2024 (``delta = k D^beta / (N^alpha P^gamma)``, the functional form of their unified law)
  fitted with scipy where the table has the axes (N parameters, D training tokens, P bits);
  Kumar's published constants are evaluated as a reference line. Ouyang's fitted constants are
  not built in (pass them to :func:`evaluate_published` or :func:`law_delta`); their N counts
  non-embedding parameters, which ``n_col`` can select if the table has such a column.
- :func:`rank_formats`: for a model and a memory budget, formats never evaluated on that model,
  ranked by the predictor, with intervals and ``predicted=True``; :func:`ranking_hit_rate`
  checks on the study's own data how often the predicted best format is the measured best.
- :func:`plot_predicted_vs_measured` and :func:`summary_markdown` for the report.

Non-finite feature values are encoded explicitly (:class:`Encoder`): ``+inf`` (a per-tensor
block, a loss rise never reached within the radii measured) becomes one unit above the largest
finite training value, ``-inf`` one below the smallest, NaN the training median; columns with no
finite training value are dropped, and every predictor records what it did.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import optimize

from kbit.accounting import extra_bits, n_blocks
from kbit.features import LAYER_GROUPS, LAYER_TYPES, spec_features
from kbit.spec import DTYPES, QuantSpec, SpecError

NLL_TARGET = "wikitext:word_perplexity"
ACC_TARGET = "mean_zeroshot:acc"
BASELINE = "fp16"
TARGETS = ("nll", "delta_nll", "acc", "delta_acc")
KINDS = ("forest", "ridge", "constant")
DEFAULT_LEVEL = 0.8  # central interval of predictions (10th to 90th percentile)
DEFAULT_TREES = 300
MIN_GROUPS = 3  # held-out groups needed to validate (each training set keeps >= 2 groups)
MIN_TRAIN_ROWS = 5

#: Kumar et al. 2024, "Scaling Laws for Precision", post-training quantization degradation
KUMAR_PUBLISHED = {"C_T": 0.0598, "gamma_D": 0.5068, "gamma_N": 0.3439, "gamma_post": 0.5907}
LAW_FORMS = {
    "kumar": "delta = C_T * D^gamma_D / N^gamma_N * exp(-P / gamma_post)",
    "ouyang": "delta = k * D^beta / (N^alpha * P^gamma)",
}
LAW_PARAMS = {
    "kumar": ("C_T", "gamma_D", "gamma_N", "gamma_post"),
    "ouyang": ("k", "beta", "alpha", "gamma"),
}
PUBLISHED: dict[str, dict[str, float] | None] = {"kumar": KUMAR_PUBLISHED, "ouyang": None}

#: model-level columns carried from ``scores`` (when present) or from ``models``
MODEL_INFO = ("family", "n_params", "train_tokens", "hf_id", "revision")
SPEC_COLUMNS = (
    "bits",
    "exponent_bits",
    "scale_bits",
    "log2_block_size",
    "bits_per_param_quantized",
    "is_gptq",
    "outlier_fraction",
    "center",
    "mixed_ratio",
    "mixed_layer_granularity",
    "mixed_loss_selection",
)
MODEL_COLUMNS = ("log10_n_params", "log10_train_tokens", "fp16_nll", "quantized_fraction")
SQNR_COLUMNS = (
    "sqnr_db_mean",
    "sqnr_lin_mean_db",
    "sqnr_nsr_mean_db",
    "sqnr_db_min",
    *(f"sqnr_db_{g}" for g in LAYER_GROUPS),
    *(f"sqnr_db_{t}" for t in LAYER_TYPES),
)
LANDSCAPE_COLUMNS = (
    "log10_r_rise_1pct",
    "log10_r_rise_10pct",
    "rise_ratio",
    "hessian_trace_per_param",
    "iso_sqnr_rel_delta",
)
DTYPE_COLUMNS = tuple(f"dtype_{d}" for d in DTYPES[1:])
#: per-model columns a never-evaluated candidate inherits from the model's evaluated rows
INHERITED = (
    "model",
    "family",
    "n_params",
    "train_tokens",
    "fp16_nll",
    "fp16_acc",
    "n_params_total",
    "n_params_quantized",
    "quantized_fraction",
    "n_tensors_quantized",
    "base_loss",
    "r_rise_1pct",
    "r_rise_10pct",
    "rise_ratio",
    "hessian_trace",
    "hessian_trace_se",
    "hessian_trace_per_param",
    "radial_radii",
    "radial_loss",
)


# ----------------------------------------------------------------------------- feature table
def nll_from_metric(target: str, values: Any) -> np.ndarray:
    """Values of a ``task:metric`` target as NLL in nats (log of a perplexity; bits x ln 2)."""
    metric = target.split(":", 1)[-1]
    v = np.asarray(values, dtype=float)
    if "perplexity" in metric:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log(v)
    if metric == "bits_per_byte":
        return v * math.log(2)
    if metric in ("nll", "loss", "cross_entropy"):
        return v
    raise ValueError(
        f"target {target!r} is not a perplexity, bits_per_byte or NLL metric; pass e.g. "
        f"'{NLL_TARGET}'"
    )


def iso_sqnr_delta(radii: Any, losses: Any, base: float, sqnr_db: float) -> float:
    """Relative loss rise of the radial profile at the radius of a format's SQNR.

    An isotropic perturbation of relative radius r has SQNR -20 log10 r, so the profile at
    ``r = 10^(-sqnr_db / 20)`` is the loss of Gaussian noise as strong as the format's error.
    Linear interpolation from (0, base); NaN outside the measured radii or without a profile
    (``radii``/``losses`` are sequences or arrays, as lists come back from Parquet).
    """
    try:
        xs = np.asarray(radii, dtype=float).ravel()
        ys = np.asarray(losses, dtype=float).ravel()
    except (TypeError, ValueError):
        return math.nan
    if xs.size == 0 or xs.size != ys.size or np.isnan(xs).any() or not math.isfinite(base):
        return math.nan
    if not math.isfinite(sqnr_db):
        return 0.0 if sqnr_db > 0 else math.nan
    r = 10.0 ** (-sqnr_db / 20.0)
    if r > xs.max():
        return math.nan
    xs, ys = np.concatenate([[0.0], xs]), np.concatenate([[base], ys])
    return float(np.interp(r, xs, ys) / base - 1.0)


def _log10(values: pd.Series) -> pd.Series:
    v = pd.to_numeric(values, errors="coerce").astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return pd.Series(np.where(v > 0, np.log10(v), np.nan), index=values.index)


def derive_columns(table: pd.DataFrame) -> pd.DataFrame:
    """Add the derived predictor columns (logs, dtype indicators, iso-SQNR loss rise)."""
    t = table.copy()
    if "n_params" in t:
        t["log10_n_params"] = _log10(t["n_params"])
    if "train_tokens" in t:
        t["log10_train_tokens"] = _log10(t["train_tokens"])
    for col in ("r_rise_1pct", "r_rise_10pct"):
        if col in t:
            t[f"log10_{col}"] = _log10(t[col])
    if "dtype" in t:
        for d in DTYPES[1:]:
            t[f"dtype_{d}"] = (t["dtype"] == d).astype(float)
    if {"radial_radii", "radial_loss", "base_loss", "sqnr_nsr_mean_db"} <= set(t.columns):
        t["iso_sqnr_rel_delta"] = [
            iso_sqnr_delta(r, y, b, s)
            for r, y, b, s in zip(
                t["radial_radii"],
                t["radial_loss"],
                pd.to_numeric(t["base_loss"], errors="coerce"),
                pd.to_numeric(t["sqnr_nsr_mean_db"], errors="coerce"),
                strict=True,
            )
        ]
    if {"nll", "fp16_nll"} <= set(t.columns):
        t["delta_nll"] = t["nll"] - t["fp16_nll"]
    if {"acc", "fp16_acc"} <= set(t.columns):
        t["delta_acc"] = t["acc"] - t["fp16_acc"]
    return t


def _spec_frame(quants: Iterable[str]) -> pd.DataFrame:
    rows = []
    for q in quants:
        try:
            # keyed on the id as written in the scores (an alias parses to its canonical id)
            rows.append({**spec_features(q), "quant": q})
        except SpecError as err:
            raise ValueError(f"quant id {q!r} in the scores is not a kbit spec: {err}") from None
    return pd.DataFrame(rows)


def build_feature_table(
    scores: pd.DataFrame,
    quant_features: pd.DataFrame | None = None,
    model_features: pd.DataFrame | None = None,
    *,
    nll_target: str | None = NLL_TARGET,
    acc_target: str | None = ACC_TARGET,
    models: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per quantized (model, quant) with features and targets (module docstring).

    ``scores``: the aggregated scores (model, quant, target, value and the model/spec columns of
    :mod:`kbit.analysis.tables`); the ``fp16`` rows give each model's baseline. ``quant_features``:
    rows of :func:`kbit.features.quant_features` with ``model`` (keyed on model and quant; its
    measurements win over same-named score columns). ``model_features``: rows of
    :func:`kbit.features.landscape_features` summaries with ``model``. ``models``: per-model
    columns such as ``family``, ``n_params`` and ``train_tokens`` (D for the laws), overriding
    the scores' values. A model without an ``fp16`` row gets NaN baselines (never guessed).
    """
    need = {"model", "quant", "target", "value"}
    if not need <= set(scores.columns):
        raise ValueError(f"scores lack columns {sorted(need - set(scores.columns))}")
    wanted = [t for t in (nll_target, acc_target) if t]
    have = set(scores["target"].unique())
    if not wanted or not (set(wanted) & have):
        raise ValueError(
            f"none of the targets {wanted} is in the scores; available: {sorted(have)}"
        )
    sub = scores[scores["target"].isin(wanted)]
    wide = sub.pivot_table(
        index=["model", "quant"], columns="target", values="value", aggfunc="first"
    )
    out = pd.DataFrame(index=wide.index).reset_index()
    out["nll"] = (
        nll_from_metric(nll_target, wide[nll_target].to_numpy()) if nll_target in wide else np.nan
    )
    out["acc"] = wide[acc_target].to_numpy(float) if acc_target in wide else np.nan
    info_cols = [c for c in MODEL_INFO if c in scores.columns]
    info = scores.groupby("model")[info_cols].first() if info_cols else pd.DataFrame()
    if models is not None:
        m = models.set_index("model")
        info = m.combine_first(info) if len(info) else m
    if len(info):
        out = out.merge(info.reset_index(), on="model", how="left")
    if "total_bits" in scores:
        tb = scores.groupby(["model", "quant"])["total_bits"].first().reset_index()
        out = out.merge(tb, on=["model", "quant"], how="left")
    base = out[out["quant"] == BASELINE].set_index("model")
    out["fp16_nll"] = out["model"].map(base["nll"])
    out["fp16_acc"] = out["model"].map(base["acc"])
    out = out[out["quant"] != BASELINE].reset_index(drop=True)
    spec = _spec_frame(out["quant"].unique())
    out = out.merge(spec, on="quant", how="left")
    if quant_features is not None and len(quant_features):
        qf = quant_features.drop(columns=[c for c in spec.columns if c != "quant"], errors="ignore")
        out = _merge_prefer(out, qf, ["model", "quant"])
    if model_features is not None and len(model_features):
        out = _merge_prefer(out, model_features, ["model"])
    return derive_columns(out).sort_values(["model", "quant"], ignore_index=True)


def _merge_prefer(left: pd.DataFrame, right: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Left-merge ``right`` on ``keys``; where both have a column, ``right``'s non-null wins."""
    missing = [k for k in keys if k not in right.columns]
    if missing:
        raise ValueError(f"feature rows lack key columns {missing}")
    if right.duplicated(keys).any():
        raise ValueError(f"feature rows repeat keys {keys}: one row per key expected")
    both = [c for c in right.columns if c in left.columns and c not in keys]
    merged = left.merge(right, on=keys, how="left", suffixes=("", "__new"))
    for c in both:
        new = merged.pop(f"{c}__new")
        merged[c] = new.where(new.notna(), merged[c])
    return merged


def feature_columns(
    table: pd.DataFrame,
    groups: Sequence[str] = ("spec", "model", "sqnr", "landscape"),
) -> list[str]:
    """Predictor columns present in ``table`` with at least one finite value and some spread."""
    by_group = {
        "spec": (*SPEC_COLUMNS, *DTYPE_COLUMNS),
        "model": MODEL_COLUMNS,
        "sqnr": SQNR_COLUMNS,
        "landscape": LANDSCAPE_COLUMNS,
    }
    bad = set(groups) - set(by_group)
    if bad:
        raise ValueError(f"feature groups {sorted(bad)} unknown; allowed are {sorted(by_group)}")
    cols = []
    for g in groups:
        for c in by_group[g]:
            if c not in table.columns:
                continue
            v = _numeric(table, c)
            if np.isfinite(v).any() and np.unique(v[~np.isnan(v)]).size > 1:
                cols.append(c)
    return cols


# ----------------------------------------------------------------------------- encoding
@dataclass
class Encoder:
    """Numeric matrix from feature columns with explicit handling of non-finite values.

    Learned on the training rows: NaN -> median, +inf -> finite max + 1, -inf -> finite min - 1.
    ``dropped`` lists columns without a finite training value; ``imputed`` counts replacements
    made on the training rows per column.
    """

    columns: list[str]
    fill: dict[str, tuple[float, float, float]]
    dropped: list[str] = field(default_factory=list)
    imputed: dict[str, int] = field(default_factory=dict)

    @classmethod
    def fit(cls, frame: pd.DataFrame, columns: Sequence[str]) -> Encoder:
        keep, fill, dropped, imputed = [], {}, [], {}
        for c in columns:
            v = _numeric(frame, c)
            fin = v[np.isfinite(v)]
            if fin.size == 0:
                dropped.append(c)
                continue
            keep.append(c)
            fill[c] = (float(np.median(fin)), float(fin.max() + 1.0), float(fin.min() - 1.0))
            n_bad = int((~np.isfinite(v)).sum())
            if n_bad:
                imputed[c] = n_bad
        if not keep:
            raise ValueError(f"no usable feature among {list(columns)}: no finite values")
        return cls(keep, fill, dropped, imputed)

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        out = np.empty((len(frame), len(self.columns)))
        for j, c in enumerate(self.columns):
            v = _numeric(frame, c) if c in frame.columns else np.full(len(frame), np.nan)
            med, hi, lo = self.fill[c]
            v = np.where(np.isnan(v), med, v)
            v = np.where(np.isposinf(v), hi, v)
            out[:, j] = np.where(np.isneginf(v), lo, v)
        return out


def _numeric(frame: pd.DataFrame, col: str) -> np.ndarray:
    """A column as float64 (booleans as 0/1; anything unparsable as NaN)."""
    s = frame[col]
    try:
        return s.astype(float).to_numpy()
    except (TypeError, ValueError):
        return pd.to_numeric(s, errors="coerce").astype(float).to_numpy()


def _finite_target(table: pd.DataFrame, target: str) -> pd.DataFrame:
    if target not in table.columns:
        raise ValueError(f"target {target!r} not in the table; allowed are {TARGETS}")
    y = pd.to_numeric(table[target], errors="coerce").astype(float)
    return table[np.isfinite(y.to_numpy())]


def lower_is_better(target: str) -> bool:
    """Whether smaller values of a table target are better (NLLs yes, accuracies no)."""
    return "nll" in target or "perplexity" in target


# ----------------------------------------------------------------------------- predictors
@dataclass
class Predictor:
    """A fitted predictor of one table target with its feature encoding."""

    kind: str
    target: str
    encoder: Encoder
    estimator: Any
    resid_sd: float
    n_train: int

    @property
    def columns(self) -> list[str]:
        return self.encoder.columns

    def predict(self, frame: pd.DataFrame, level: float = DEFAULT_LEVEL) -> pd.DataFrame:
        """``pred``, ``lo``, ``hi`` per row (index of ``frame``).

        Forest: the mean of the trees and the central ``level`` quantiles of the trees'
        predictions (their spread: the model's uncertainty, not the evaluation noise). Ridge and
        constant: +- z(level) times the training residual standard deviation.
        """
        if len(frame) == 0:
            return pd.DataFrame(columns=["pred", "lo", "hi"], index=frame.index, dtype=float)
        x = self.encoder.transform(frame)
        pred = self.estimator.predict(x)
        if self.kind == "forest":
            trees = np.stack([t.predict(x) for t in self.estimator.estimators_])
            q = (1 - level) / 2
            lo, hi = np.quantile(trees, [q, 1 - q], axis=0)
        else:
            from scipy.stats import norm

            half = norm.ppf(0.5 + level / 2) * self.resid_sd
            lo, hi = pred - half, pred + half
        return pd.DataFrame({"pred": pred, "lo": lo, "hi": hi}, index=frame.index)


def fit_predictor(
    table: pd.DataFrame,
    target: str = "nll",
    kind: str = "forest",
    columns: Sequence[str] | None = None,
    *,
    seed: int = 0,
    n_estimators: int = DEFAULT_TREES,
    min_samples_leaf: int = 2,
    max_features: float = 0.5,
    n_jobs: int = 1,
) -> Predictor:
    """Fit a predictor of ``target`` on the rows with a finite target.

    ``forest``: sklearn RandomForestRegressor (seeded; bootstrap, ``max_features`` of the
    columns per split); ``ridge``: standardised features, RidgeCV over 13 penalties 1e-3..1e3;
    ``constant``: the training mean (the no-skill reference). ``columns`` defaults to
    :func:`feature_columns`.
    """
    from sklearn.dummy import DummyRegressor
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: allowed are {KINDS}")
    train = _finite_target(table, target)
    if len(train) < 3:
        raise ValueError(f"{len(train)} rows with a finite {target!r}: at least 3 are needed")
    cols = list(columns) if columns is not None else feature_columns(train)
    if not cols:
        raise ValueError("no feature column with spread in the table: nothing to learn from")
    enc = Encoder.fit(train, cols)
    x = enc.transform(train)
    y = train[target].to_numpy(float)
    if kind == "forest":
        est = RandomForestRegressor(
            n_estimators=n_estimators,
            min_samples_leaf=min_samples_leaf,
            max_features=max_features,
            random_state=seed,
            n_jobs=n_jobs,
        )
    elif kind == "ridge":
        est = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
    else:
        est = DummyRegressor(strategy="mean")
    est.fit(x, y)
    resid = y - est.predict(x)
    sd = float(np.std(resid, ddof=1)) if len(y) > 1 else math.nan
    return Predictor(kind, target, enc, est, sd, len(y))


# ----------------------------------------------------------------------------- validation
def _metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    res = y - pred
    tss = float(np.sum((y - y.mean()) ** 2))
    return {
        "r2": 1 - float(np.sum(res**2)) / tss if tss > 0 else math.nan,
        "mae": float(np.mean(np.abs(res))),
        "rmse": float(np.sqrt(np.mean(res**2))),
    }


@dataclass
class Validation:
    """Held-out predictions of one grouping (family or model) and their pooled metrics."""

    group_by: str
    target: str
    predictions: pd.DataFrame  # model, family, quant, group, kind, y, pred, lo, hi
    metrics: pd.DataFrame  # kind, group_by, target, n_groups, n_points, r2, mae, rmse, ...
    status: str


def _pooled_metrics(p: pd.DataFrame, target: str) -> dict[str, float]:
    """R^2, MAE, RMSE of pooled held-out predictions; for ``nll`` also of the degradation."""
    nan = {"r2": math.nan, "mae": math.nan, "rmse": math.nan}
    y, pred = p["y"].to_numpy(float), p["pred"].to_numpy(float)
    out = _metrics(y, pred) if len(p) else dict(nan)
    if target == "nll" and "fp16_nll" in p:
        base = p["fp16_nll"].to_numpy(float)
        ok = np.isfinite(base)
        d = _metrics(y[ok] - base[ok], pred[ok] - base[ok]) if ok.any() else nan
        out["r2_delta"] = d["r2"]  # (the MAE is the same with or without the baseline)
    return out


def _held_out(
    data: pd.DataFrame,
    group_by: str,
    g: Any,
    kinds: Sequence[str],
    cols: list[str],
    target: str,
    level: float,
    fit_kw: Mapping[str, Any],
) -> list[pd.DataFrame]:
    """Predictions of group ``g`` by each kind fitted on the other groups."""
    test, train = data[data[group_by] == g], data[data[group_by] != g]
    keep = [c for c in ("model", "family", "quant", "fp16_nll", "fp16_acc") if c in test]
    parts = []
    for kind in kinds:
        p = fit_predictor(train, target, kind, cols, **fit_kw).predict(test, level)
        part = test[keep].copy()
        part["group"], part["kind"] = g, kind
        part["y"] = test[target].to_numpy(float)
        part[["pred", "lo", "hi"]] = p[["pred", "lo", "hi"]].to_numpy()
        parts.append(part)
    return parts


def cross_validate(
    table: pd.DataFrame,
    target: str = "nll",
    group_by: str = "family",
    kinds: Sequence[str] = KINDS,
    columns: Sequence[str] | None = None,
    *,
    seed: int = 0,
    min_groups: int = MIN_GROUPS,
    level: float = DEFAULT_LEVEL,
    **fit_kw: Any,
) -> Validation:
    """Leave-one-``group_by``-out validation (``family`` or ``model``) of each predictor kind.

    Every group is predicted by predictors fitted on all other groups; R^2, MAE and RMSE are
    computed on the pooled held-out predictions (R^2 against their own mean, so a constant
    scores <= 0). For ``nll`` targets ``r2_delta`` scores the degradation
    (prediction minus the 16-bit NLL), which the 16-bit loss alone does not explain. With fewer
    than ``min_groups`` groups nothing is fitted and ``status`` says so; a group whose training
    set would have fewer than ``MIN_TRAIN_ROWS`` rows is skipped and named in ``status``.
    """
    if group_by not in table.columns:
        raise ValueError(f"group_by={group_by!r} is not a column of the table")
    data = _finite_target(table, target)
    groups = sorted(data[group_by].dropna().unique())
    empty = pd.DataFrame(columns=["model", "family", "quant", "group", "kind", "y", "pred"])
    cols = list(columns) if columns is not None else feature_columns(data)
    preds, skipped = [], []
    if len(groups) < min_groups:
        listed = ", ".join(map(str, groups)) or "none"
        status = f"too few {group_by} groups to validate: {len(groups)} < {min_groups} ({listed})"
    else:
        for g in groups:
            if (data[group_by] != g).sum() < MIN_TRAIN_ROWS:
                skipped.append(str(g))
                continue
            preds += _held_out(
                data, group_by, g, kinds, cols, target, level, {"seed": seed, **fit_kw}
            )
        status = "ok"
        if skipped:
            status += f"; groups with < {MIN_TRAIN_ROWS} training rows skipped: {skipped}"
    predictions = pd.concat(preds, ignore_index=True) if preds else empty
    rows = []
    for kind in kinds:
        p = predictions[predictions["kind"] == kind]
        rows.append(
            {
                "kind": kind,
                "group_by": group_by,
                "target": target,
                "n_groups": int(p["group"].nunique()),
                "n_points": len(p),
                **_pooled_metrics(p, target),
                "status": status,
            }
        )
    return Validation(group_by, target, predictions, pd.DataFrame(rows), status)


def feature_importance(
    predictor: Predictor, table: pd.DataFrame, n_repeats: int = 10, seed: int = 0
) -> pd.DataFrame:
    """Impurity (forest only) and permutation importance (drop in R^2) per feature.

    Permutation importance is computed on ``table``: on the training rows it measures how much
    the predictor relies on a feature, on held-out rows how much the feature helps it generalise.
    Correlated features share importance (SQNR and bits, for instance).
    """
    from sklearn.inspection import permutation_importance

    data = _finite_target(table, predictor.target)
    x = predictor.encoder.transform(data)
    y = data[predictor.target].to_numpy(float)
    perm = permutation_importance(predictor.estimator, x, y, n_repeats=n_repeats, random_state=seed)
    impurity = (
        predictor.estimator.feature_importances_
        if predictor.kind == "forest"
        else np.full(len(predictor.columns), np.nan)
    )
    out = pd.DataFrame(
        {
            "feature": predictor.columns,
            "impurity": impurity,
            "permutation_mean": perm.importances_mean,
            "permutation_sd": perm.importances_std,
        }
    )
    return out.sort_values("permutation_mean", ascending=False, ignore_index=True)


# ----------------------------------------------------------------------------- published laws
def _law_design(law: str, n: np.ndarray, d: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Both laws are log-linear: log delta = X @ theta with X = [1, log D, -log N, f(P)]."""
    if law == "kumar":
        fp = -p  # coefficient 1 / gamma_post
    elif law == "ouyang":
        fp = -np.log(p)  # coefficient gamma
    else:
        raise ValueError(f"law={law!r}: allowed are {tuple(LAW_FORMS)}")
    return np.column_stack([np.ones_like(n), np.log(d), -np.log(n), fp])


def _to_theta(law: str, params: Mapping[str, float]) -> np.ndarray:
    if law == "kumar":
        return np.array(
            [
                math.log(params["C_T"]),
                params["gamma_D"],
                params["gamma_N"],
                1.0 / params["gamma_post"],
            ]
        )
    return np.array([math.log(params["k"]), params["beta"], params["alpha"], params["gamma"]])


def _from_theta(law: str, theta: np.ndarray, cov: np.ndarray) -> tuple[dict, dict]:
    se = np.sqrt(np.clip(np.diag(cov), 0, None)) if cov is not None else np.full(4, np.nan)
    c = math.exp(theta[0])
    names = LAW_PARAMS[law]
    values = [c, theta[1], theta[2], 1.0 / theta[3] if law == "kumar" else theta[3]]
    ses = [c * se[0], se[1], se[2], se[3] / theta[3] ** 2 if law == "kumar" else se[3]]
    return dict(zip(names, map(float, values), strict=True)), dict(
        zip(names, map(float, ses), strict=True)
    )


def law_delta(law: str, params: Mapping[str, float], n: Any, d: Any, p: Any) -> np.ndarray:
    """The degradation a law predicts at parameters ``n``, training tokens ``d``, bits ``p``."""
    n, d, p = (np.asarray(v, dtype=float) for v in (n, d, p))
    x = _law_design(law, n.ravel(), d.ravel(), p.ravel())
    return np.exp(x @ _to_theta(law, params)).reshape(np.broadcast(n, d, p).shape)


@dataclass
class LawFit:
    """A law fitted to (or evaluated on) a table: constants, standard errors, goodness of fit."""

    law: str
    constants: str  # "fitted" | "published"
    status: str  # "ok" or why not
    params: dict[str, float] = field(default_factory=dict)
    se: dict[str, float] = field(default_factory=dict)
    r2: float = math.nan
    mae: float = math.nan
    rmse: float = math.nan
    n_points: int = 0
    n_dropped: int = 0  # rows left out of a log-space fit (delta <= 0)
    space: str = "linear"

    def row(self) -> dict[str, Any]:
        return {
            "model": self.law,
            "constants": self.constants,
            "form": LAW_FORMS.get(self.law, ""),
            "status": self.status,
            "r2": self.r2,
            "mae": self.mae,
            "rmse": self.rmse,
            "n_points": self.n_points,
            "params": json.dumps({k: round(v, 6) for k, v in self.params.items()}),
            "se": json.dumps({k: round(v, 6) for k, v in self.se.items()}),
        }


def _law_data(table: pd.DataFrame, delta: str, n_col: str, d_col: str, p_col: str):
    missing = [c for c in (delta, n_col, d_col, p_col) if c not in table.columns]
    if missing:
        return None, f"not enough data: no {', '.join(missing)} column"
    sub = table[[delta, n_col, d_col, p_col]].apply(pd.to_numeric, errors="coerce").astype(float)
    ok = np.isfinite(sub.to_numpy()).all(axis=1) & (sub[[n_col, d_col, p_col]] > 0).all(axis=1)
    return sub[ok.to_numpy()], ""


def _why_unidentifiable(n: np.ndarray, d: np.ndarray, p: np.ndarray, x: np.ndarray) -> str:
    """Why four constants cannot be fitted to these rows ("" when they can)."""
    flat = [name for name, v in (("N", n), ("D", d), ("P", p)) if np.unique(v).size < 2]
    if flat:
        return f"not enough data: a single value of {', '.join(flat)}"
    if len(x) < x.shape[1] + 2:
        return f"not enough data: {len(x)} rows for {x.shape[1]} constants (need >= 6)"
    xs = (x[:, 1:] - x[:, 1:].mean(0)) / x[:, 1:].std(0)
    if np.linalg.matrix_rank(np.column_stack([np.ones(len(x)), xs]), tol=1e-8) < x.shape[1]:
        return "not enough data: N, D and P are collinear (they do not vary independently)"
    return ""


def _fit_log(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """OLS of log(delta) on the rows with delta > 0: (theta, covariance), None if too few."""
    pos = y > 0
    if pos.sum() < x.shape[1] + 1:
        return None
    xp, ly = x[pos], np.log(y[pos])
    theta, *_ = np.linalg.lstsq(xp, ly, rcond=None)
    s2 = float(np.sum((ly - xp @ theta) ** 2)) / (len(ly) - x.shape[1])
    return theta, s2 * np.linalg.pinv(xp.T @ xp)


def _fit_linear(
    x: np.ndarray, y: np.ndarray, start: np.ndarray
) -> tuple[np.ndarray, np.ndarray, str]:
    """Least squares of delta = exp(x @ theta): (theta, covariance, message or "")."""

    def resid(t: np.ndarray) -> np.ndarray:
        return np.exp(np.clip(x @ t, -700, 700)) - y

    def jac(t: np.ndarray) -> np.ndarray:
        return np.exp(np.clip(x @ t, -700, 700))[:, None] * x

    res = optimize.least_squares(resid, start, jac=jac, method="lm", max_nfev=20000)
    s2 = 2 * res.cost / (len(y) - x.shape[1])
    msg = "" if res.success else f"fit did not converge: {res.message}"
    return res.x, s2 * np.linalg.pinv(res.jac.T @ res.jac), msg


def fit_law(
    table: pd.DataFrame,
    law: str,
    *,
    delta: str = "delta_nll",
    n_col: str = "n_params",
    d_col: str = "train_tokens",
    p_col: str = "bits",
    space: str = "linear",
) -> LawFit:
    """Fit a law's four constants to the degradation ``delta`` of the table.

    ``space="linear"``: least squares on delta itself (additive evaluation noise; rows with
    delta <= 0, common at high precision, are kept), started from the log-space solution.
    ``space="log"``: ordinary least squares of log(delta) (multiplicative noise; rows with
    delta <= 0 are dropped and counted). Goodness of fit is always on delta. The table must vary
    N, D and P independently (at least two values each, not collinear in the law's
    coordinates) with at least 6 rows; otherwise the status says "not enough data" and why.
    Standard errors come from the Jacobian at the optimum (delta method for C_T, k, gamma_post).
    """
    if space not in ("linear", "log"):
        raise ValueError(f"space={space!r}: allowed are 'linear', 'log'")
    data, why = _law_data(table, delta, n_col, d_col, p_col)
    fit = LawFit(law, "fitted", why, space=space)
    if data is None:
        return fit
    n, d, p, y = (data[c].to_numpy() for c in (n_col, d_col, p_col, delta))
    x = _law_design(law, n, d, p)
    fit.status = _why_unidentifiable(n, d, p, x)
    if fit.status:
        return fit
    logfit = _fit_log(x, y)
    if space == "log":
        if logfit is None:
            fit.status = f"not enough data: {int((y > 0).sum())} rows with delta > 0 for a log fit"
            return fit
        (theta, cov), msg = logfit, ""
        fit.n_dropped = int((y <= 0).sum())
    else:
        start = logfit[0] if logfit else np.array([math.log(max(abs(y.mean()), 1e-6)), 0, 0, 0.5])
        theta, cov, msg = _fit_linear(x, y, start)
    if law == "kumar" and theta[3] <= 0:
        fit.status = "fit failed: no decay with P (the fitted 1 / gamma_post is not positive)"
        return fit
    fit.params, fit.se = _from_theta(law, theta, cov)
    _score(fit, law_delta(law, fit.params, n, d, p), y)
    fit.status = msg or "ok"
    return fit


def _score(fit: LawFit, pred: np.ndarray, y: np.ndarray) -> None:
    m = _metrics(y, pred)
    fit.r2, fit.mae, fit.rmse, fit.n_points = m["r2"], m["mae"], m["rmse"], len(y)


def evaluate_published(
    table: pd.DataFrame,
    law: str = "kumar",
    params: Mapping[str, float] | None = None,
    *,
    delta: str = "delta_nll",
    n_col: str = "n_params",
    d_col: str = "train_tokens",
    p_col: str = "bits",
) -> LawFit:
    """Goodness of fit of a law's published constants (no fitting) on the table's rows."""
    params = dict(params or PUBLISHED.get(law) or {})
    fit = LawFit(law, "published", "", params=params)
    if not params:
        fit.status = f"no published constants for {law!r} built in (pass params)"
        return fit
    data, why = _law_data(table, delta, n_col, d_col, p_col)
    if data is None or len(data) == 0:
        fit.status = why or "not enough data: no rows with N, D, P and delta"
        return fit
    n, d, p, y = (data[c].to_numpy() for c in (n_col, d_col, p_col, delta))
    _score(fit, law_delta(law, params, n, d, p), y)
    fit.status = "ok"
    return fit


def law_comparison(
    table: pd.DataFrame,
    validation: Validation | None = None,
    *,
    seed: int = 0,
    n_estimators: int = DEFAULT_TREES,
    **law_kw: Any,
) -> pd.DataFrame:
    """The two laws (fitted and published) next to the forest, all scored on ``delta_nll``.

    Laws are scored in-sample; the forest in-sample (fitted on every row) and, when a
    validation of target ``nll`` or ``delta_nll`` is given, on its held-out predictions.
    """
    columns = {k: v for k, v in law_kw.items() if k in ("delta", "n_col", "d_col", "p_col")}
    rows = [fit_law(table, law, **law_kw).row() for law in LAW_FORMS]
    rows += [evaluate_published(table, law, **columns).row() for law in LAW_FORMS]
    data = _finite_target(table, "delta_nll") if "delta_nll" in table else table.iloc[:0]
    if len(data) >= 3:
        pred = fit_predictor(data, "delta_nll", "forest", seed=seed, n_estimators=n_estimators)
        m = _metrics(data["delta_nll"].to_numpy(float), pred.predict(data)["pred"].to_numpy())
        rows.append(
            {
                "model": "forest",
                "constants": "in-sample",
                "status": "ok",
                "n_points": len(data),
                **m,
            }
        )
    if validation is not None and validation.target in ("nll", "delta_nll"):
        p = validation.predictions[validation.predictions["kind"] == "forest"]
        if len(p):
            y, pr = p["y"].to_numpy(float), p["pred"].to_numpy(float)
            if validation.target == "nll":
                y, pr = y - p["fp16_nll"].to_numpy(float), pr - p["fp16_nll"].to_numpy(float)
            ok = np.isfinite(y) & np.isfinite(pr)
            rows.append(
                {
                    "model": "forest",
                    "constants": f"leave-one-{validation.group_by}-out",
                    "status": validation.status,
                    "n_points": int(ok.sum()),
                    **_metrics(y[ok], pr[ok]),
                }
            )
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- ranking
def _has_mixed_ratio() -> bool:
    return "mixed_ratio" in {f.name for f in dataclasses.fields(QuantSpec)}


def candidate_specs(
    dtypes: Sequence[str] = ("int", "float", "nf", "quantile", "dynamic", "mxfp", "nvfp"),
    bits: Sequence[int] = (2, 3, 4, 5, 6, 7, 8),
    block_sizes: Sequence[int | None] = (32, 64, 128, 256, 1024, None),
    methods: Sequence[str] = ("rtn", "gptq"),
    mixed_ratios: Sequence[float] | None = None,
) -> list[QuantSpec]:
    """Every valid spec of the grid (combinations the spec rejects are skipped: this is a menu
    of candidates, not a user's sweep). ``mixed_ratios`` needs a ``mixed_ratio`` spec field."""
    if mixed_ratios is not None and not _has_mixed_ratio():
        raise ValueError("QuantSpec has no mixed_ratio field: mixed ratios cannot be candidates")
    out: list[QuantSpec] = []
    for dt in dtypes:
        for k in bits:
            for b in block_sizes:
                for m in methods:
                    for r in mixed_ratios or [None]:
                        kw: dict[str, Any] = {"dtype": dt, "bits": k, "block_size": b, "method": m}
                        if r is not None:
                            kw["mixed_ratio"] = r
                        try:
                            spec = QuantSpec(**kw)
                        except (SpecError, TypeError):
                            continue
                        if spec not in out:
                            out.append(spec)
    return out


def estimate_total_bits(
    spec: QuantSpec | str,
    n_params: float,
    n_params_quantized: float,
    n_tensors: int = 1,
    tensor_sizes: Sequence[int] | None = None,
) -> float:
    """Total model bits of a model under ``spec`` without quantizing it.

    Exact (as :mod:`kbit.accounting` counts) when ``tensor_sizes`` lists the quantized tensors'
    sizes and the spec keeps no outlier columns; otherwise the quantized parameters are split in
    ``n_tensors`` equal tensors and outlier columns are ``outlier_fraction`` of each tensor. A
    spec with a ``mixed_ratio`` quantizes that fraction of them and keeps the rest in 16 bit.
    """
    spec = QuantSpec.parse(spec)
    if spec.is_baseline:
        return 16.0 * n_params
    if tensor_sizes is None:
        n_t = max(int(n_tensors), 1)
        sizes = [n_params_quantized / n_t] * n_t
    else:
        sizes = [float(s) for s in tensor_sizes]
    ratio = getattr(spec, "mixed_ratio", None)
    ratio = 1.0 if ratio is None else float(ratio)
    total, counted = 0.0, 0.0
    for s in sizes:
        n = s * ratio
        kept = round(spec.outlier_fraction * n)
        nq = n - kept
        total += spec.bits * nq + spec.scale_bits * n_blocks(spec, math.ceil(nq)) + extra_bits(spec)
        total += 16 * kept
        counted += n
    return float(total + 16.0 * (n_params - counted))


def _canonical(quants: Iterable[str]) -> set[str]:
    """Canonical ids of quant ids as written (aliases such as ``mxfp4`` included)."""
    return {QuantSpec.parse(q).id for q in set(quants)}


def _model_rows(table: pd.DataFrame, model: str) -> pd.DataFrame:
    rows = table[table["model"] == model]
    if rows.empty:
        raise ValueError(
            f"model {model!r} not in the table; available: {sorted(table['model'].unique())}"
        )
    return rows


def _candidate_frame(
    model_rows: pd.DataFrame, specs: Sequence[QuantSpec], candidate_features: pd.DataFrame | None
) -> pd.DataFrame:
    base = {c: model_rows[c].iloc[0] for c in INHERITED if c in model_rows.columns}
    for c in ("n_params_quantized", "quantized_fraction", "n_tensors_quantized"):
        if c in model_rows.columns:
            base[c] = pd.to_numeric(model_rows[c], errors="coerce").median()
    frame = pd.DataFrame([{**base, **spec_features(s)} for s in specs])
    if candidate_features is not None and len(candidate_features):
        cf = candidate_features.drop(columns=["model"], errors="ignore")
        cf = cf.assign(quant=[QuantSpec.parse(q).id for q in cf["quant"]])
        frame = _merge_prefer(frame, cf, ["quant"])
    return derive_columns(frame)


RANKING_COLUMNS = (
    "model",
    "quant",
    "dtype",
    "bits",
    "block_size",
    "method",
    "mixed_ratio",
    "total_bits",
    "pred",
    "lo",
    "hi",
    "predicted",
    "rank",
    "evaluated_on_other_models",
    "extrapolated",
    "target",
    "kind",
)


def _unknown_to(table: pd.DataFrame) -> Callable[[QuantSpec], bool]:
    """Whether a spec has a data type, method or mixed precision the table never evaluated."""
    dtypes, methods = set(table["dtype"]), set(table["method"])
    ratios = _numeric(table, "mixed_ratio") if "mixed_ratio" in table else np.array([])
    has_mixed = bool((ratios < 1).any())

    def unknown(spec: QuantSpec) -> bool:
        mixed = getattr(spec, "mixed_ratio", None) is not None
        return spec.dtype not in dtypes or spec.method not in methods or (mixed and not has_mixed)

    return unknown


def _candidate_bits(
    cand: pd.DataFrame, specs: Sequence[QuantSpec], rows: pd.DataFrame, sizes: Sequence[int] | None
) -> list[float]:
    n_all = float(rows["n_params"].iloc[0]) if "n_params" in rows else math.nan
    n_q = float(cand["n_params_quantized"].iloc[0]) if "n_params_quantized" in cand else math.nan
    if not (math.isfinite(n_q) and math.isfinite(n_all)):
        raise ValueError(
            f"{rows['model'].iloc[0]}: n_params and n_params_quantized are needed to count bits"
        )
    n_t = cand["n_tensors_quantized"].iloc[0] if "n_tensors_quantized" in cand else 1
    n_t = int(n_t) if pd.notna(n_t) else 1
    return [estimate_total_bits(s, n_all, n_q, n_t, sizes) for s in specs]


def rank_formats(
    table: pd.DataFrame,
    model: str,
    budget_bits: float,
    *,
    target: str = "nll",
    candidates: Sequence[QuantSpec | str] | None = None,
    candidate_features: pd.DataFrame | None = None,
    kind: str = "forest",
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
    top: int | None = None,
    tensor_sizes: Sequence[int] | None = None,
    **fit_kw: Any,
) -> pd.DataFrame:
    """Never-evaluated formats for ``model`` within ``budget_bits``, best predicted first.

    A candidate (default: :func:`candidate_specs`) is dropped when it was evaluated on this
    model, when its data type, method or mixed precision appears nowhere in the table (the
    predictor knows nothing about it), or when its estimated total bits
    (:func:`estimate_total_bits`, exact with ``tensor_sizes``) exceed the budget. The predictor
    is fitted on the whole table with the feature columns the candidates have: the format
    descriptors and the model's features always, per-spec SQNR only when
    ``candidate_features`` (rows of :func:`kbit.features.measure_quant_features` with
    ``quant``) supplies it. ``extrapolated`` flags candidates whose bits or block size lie
    outside the evaluated range. Columns: :data:`RANKING_COLUMNS`.
    """
    rows = _model_rows(table, model)
    evaluated_here = _canonical(rows["quant"])
    unknown = _unknown_to(table)
    pool = candidates if candidates is not None else candidate_specs()
    specs = [QuantSpec.parse(c) for c in pool]
    specs = [s for s in specs if not (s.is_baseline or s.id in evaluated_here or unknown(s))]
    if not specs:
        raise ValueError(
            f"no candidate left for {model}: each was evaluated on it or uses a data type, "
            f"method or mixed precision the study never evaluated ({sorted(set(table['dtype']))}, "
            f"{sorted(set(table['method']))})"
        )
    cand = _candidate_frame(rows, specs, candidate_features)
    cand["total_bits"] = _candidate_bits(cand, specs, rows, tensor_sizes)
    fits = cand[cand["total_bits"] <= budget_bits]
    if fits.empty:
        small = cand.loc[cand["total_bits"].idxmin()]
        raise ValueError(
            f"no unevaluated candidate for {model} fits in {budget_bits:.4g} bits; the smallest "
            f"is {small['quant']} with {small['total_bits']:.4g} bits"
        )
    usable = [
        c
        for c in feature_columns(table)
        if c in fits.columns and np.isfinite(_numeric(fits, c)).any()
    ]
    pred = fit_predictor(table, target, kind, usable, seed=seed, **fit_kw)
    out = fits.join(pred.predict(fits, level))
    sign = 1 if lower_is_better(target) else -1
    out = out.assign(_k=out["pred"] * sign).sort_values(["_k", "total_bits"])
    out["rank"] = np.arange(1, len(out) + 1)
    out["predicted"] = True
    out["evaluated_on_other_models"] = out["quant"].isin(_canonical(table["quant"]))
    out["extrapolated"] = _outside(out, table, "bits") | _outside(out, table, "log2_block_size")
    out["target"], out["kind"] = target, kind
    out = out[list(RANKING_COLUMNS)].reset_index(drop=True)
    return out if top is None else out.head(top)


def _outside(frame: pd.DataFrame, table: pd.DataFrame, col: str) -> pd.Series:
    v, ref = _numeric(frame, col), _numeric(table, col)
    return pd.Series((v < np.nanmin(ref)) | (v > np.nanmax(ref)), index=frame.index)


@dataclass
class HitRate:
    """How often the predicted best format within a budget is the measured best."""

    cases: pd.DataFrame  # model, budget_bits, n_candidates, predicted_best, measured_best, hit
    hits: int
    n_cases: int
    chance: float  # expected hit rate of a random pick: mean of 1 / n_candidates
    n_fits: int
    status: str

    @property
    def rate(self) -> float:
        return self.hits / self.n_cases if self.n_cases else math.nan


def leave_one_run_out(
    table: pd.DataFrame, target: str = "nll", kind: str = "forest", *, seed: int = 0, **fit_kw: Any
) -> pd.Series:
    """Prediction of every run by a predictor fitted on all other runs (one fit per run)."""
    data = _finite_target(table, target)
    cols = feature_columns(data)
    out = pd.Series(np.nan, index=data.index)
    for i in data.index:
        p = fit_predictor(data.drop(index=i), target, kind, cols, seed=seed, **fit_kw)
        out[i] = float(p.predict(data.loc[[i]])["pred"].iloc[0])
    return out


def ranking_hit_rate(
    table: pd.DataFrame,
    target: str = "nll",
    kind: str = "forest",
    *,
    seed: int = 0,
    n_estimators: int = 100,
    min_candidates: int = 2,
    **fit_kw: Any,
) -> HitRate:
    """For every model and every budget equal to one of its runs' total bits, is the run with
    the best leave-that-run-out prediction among the runs within the budget the measured best?

    Each budget adds at least one run to the candidates, so cases are distinct. Cost: one
    predictor fit per run. ``chance`` is the hit rate of picking a candidate at random.
    """
    data = _finite_target(table, target)
    if "total_bits" not in data.columns or data["total_bits"].isna().all():
        return HitRate(pd.DataFrame(), 0, 0, math.nan, 0, "not enough data: no total_bits column")
    if len(data) < MIN_TRAIN_ROWS + 1:
        return HitRate(pd.DataFrame(), 0, 0, math.nan, 0, f"not enough data: {len(data)} runs")
    loro = leave_one_run_out(data, target, kind, seed=seed, n_estimators=n_estimators, **fit_kw)
    sign = 1.0 if lower_is_better(target) else -1.0
    cases = []
    for model, g in data.assign(loro=loro).groupby("model", sort=True):
        for budget in sorted(g["total_bits"].unique()):
            c = g[g["total_bits"] <= budget]
            if len(c) < min_candidates:
                continue
            y, p = sign * c[target].to_numpy(float), sign * c["loro"].to_numpy(float)
            best_measured = set(c["quant"].to_numpy()[y == y.min()])
            pick = c["quant"].to_numpy()[int(np.argmin(p))]
            cases.append(
                {
                    "model": model,
                    "budget_bits": float(budget),
                    "n_candidates": len(c),
                    "predicted_best": pick,
                    "measured_best": ",".join(sorted(best_measured)),
                    "hit": pick in best_measured,
                }
            )
    df = pd.DataFrame(cases)
    if df.empty:
        return HitRate(
            df, 0, 0, math.nan, len(data), f"not enough data: no model has >= {min_candidates} runs"
        )
    return HitRate(
        df, int(df["hit"].sum()), len(df), float((1.0 / df["n_candidates"]).mean()), len(data), "ok"
    )


# ----------------------------------------------------------------------------- report
def plot_predicted_vs_measured(
    validation: Validation, path: str | Path, kind: str = "forest", delta: bool = False
) -> Path:
    """Held-out predicted vs measured values, one marker (and colour) per family, the y = x
    line, R^2 in the title; intervals as vertical bars. ``delta`` plots the degradation
    (minus the 16-bit NLL) for an ``nll`` validation. Written atomically (format by suffix)."""
    import matplotlib.pyplot as plt

    from kbit.analysis import style
    from kbit.io import atomic_write

    p = validation.predictions
    p = p[p["kind"] == kind]
    if p.empty:
        raise ValueError(f"no held-out {kind} predictions to plot: {validation.status}")
    y, pr = p["y"].to_numpy(float), p["pred"].to_numpy(float)
    lo, hi = p["lo"].to_numpy(float), p["hi"].to_numpy(float)
    label = validation.target
    if delta and validation.target != "nll":
        raise ValueError(f"delta=True needs an 'nll' validation, not {validation.target!r}")
    if delta:
        base = p["fp16_nll"].to_numpy(float)
        y, pr, lo, hi, label = y - base, pr - base, lo - base, hi - base, f"{label} - fp16"
    style.apply()
    fam = p["family"].astype(str).to_numpy() if "family" in p else np.full(len(p), "all")
    families = sorted(set(fam))
    colors = style.series_colors(len(families))
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    for i, f in enumerate(families):
        s = fam == f
        ax.errorbar(
            y[s],
            pr[s],
            yerr=[pr[s] - lo[s], hi[s] - pr[s]],
            fmt="none",
            ecolor=colors[i],
            alpha=0.35,
            lw=0.8,
        )
        ax.scatter(
            y[s],
            pr[s],
            marker=style.MARKERS[i % len(style.MARKERS)],
            color=colors[i],
            label=f,
            s=22,
            zorder=3,
        )
    ok = np.isfinite(y) & np.isfinite(pr)
    lims = [min(y[ok].min(), pr[ok].min()), max(y[ok].max(), pr[ok].max())]
    ax.plot(lims, lims, color="0.4", lw=1, ls="--", label="y = x")
    r2 = _metrics(y[ok], pr[ok])["r2"]
    ax.set_xlabel(f"measured {label}")
    ax.set_ylabel(f"predicted {label}")
    ax.set_title(f"{kind}, leave-one-{validation.group_by}-out: $R^2$ = {r2:.3f}")
    ax.legend(fontsize="small", frameon=False)
    try:
        atomic_write(
            path, lambda tmp: fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png")
        )
    finally:
        plt.close(fig)
    return Path(path)


def _fmt(v: Any, digits: int = 3) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "n/a" if not math.isfinite(f) else f"{f:.{digits}f}"


def summary_markdown(
    validations: Sequence[Validation] | Validation,
    laws: pd.DataFrame | None = None,
    hit: HitRate | None = None,
) -> str:
    """A short markdown summary: held-out R^2/MAE per grouping and predictor, the laws next to
    the forest, and the ranking check."""
    if isinstance(validations, Validation):
        validations = [validations]
    lines = ["## Predicting post-quantization quality", ""]
    for v in validations:
        lines.append(f"Leave-one-{v.group_by}-out, target `{v.target}` ({v.status}):")
        lines.append("")
        lines.append("| predictor | groups | points | R^2 | MAE | R^2 of the degradation |")
        lines.append("|---|---|---|---|---|---|")
        for _, r in v.metrics.iterrows():
            lines.append(
                f"| {r['kind']} | {r['n_groups']} | {r['n_points']} | {_fmt(r['r2'])} | "
                f"{_fmt(r['mae'], 4)} | {_fmt(r.get('r2_delta'))} |"
            )
        lines.append("")
    if laws is not None and len(laws):
        lines += [
            "Degradation laws vs the forest (target `delta_nll`):",
            "",
            "| model | constants | status | R^2 | MAE | points |",
            "|---|---|---|---|---|---|",
        ]
        for _, r in laws.iterrows():
            lines.append(
                f"| {r['model']} | {r['constants']} | {r['status']} | {_fmt(r['r2'])} | "
                f"{_fmt(r['mae'], 4)} | {int(r['n_points']) if pd.notna(r['n_points']) else 0} |"
            )
        lines.append("")
    if hit is not None:
        if hit.n_cases:
            lines.append(
                f"Ranking check (leave-that-run-out): the predicted best format within a budget "
                f"was the measured best in {hit.hits} of {hit.n_cases} cases "
                f"({hit.rate:.0%}; a random pick: {hit.chance:.0%})."
            )
        else:
            lines.append(f"Ranking check: {hit.status}.")
        lines.append("")
    return "\n".join(lines)


@dataclass
class PredictionStudy:
    """Everything the prediction step produces, as tables (write each with write_parquet)."""

    validations: dict[str, Validation]
    importance: pd.DataFrame
    laws: pd.DataFrame
    hit: HitRate | None

    def markdown(self) -> str:
        return summary_markdown(list(self.validations.values()), self.laws, self.hit)

    def tables(self) -> dict[str, pd.DataFrame]:
        """``validation`` (metrics), ``predictions`` (held-out), ``importance``, ``laws``,
        ``ranking_check`` (cases)."""
        return {
            "validation": pd.concat(
                [v.metrics for v in self.validations.values()], ignore_index=True
            ),
            "predictions": pd.concat(
                [v.predictions.assign(group_by=k) for k, v in self.validations.items()],
                ignore_index=True,
            ),
            "importance": self.importance,
            "laws": self.laws,
            "ranking_check": self.hit.cases if self.hit is not None else pd.DataFrame(),
        }


def prediction_study(
    table: pd.DataFrame,
    target: str = "nll",
    *,
    seed: int = 0,
    n_estimators: int = DEFAULT_TREES,
    check_ranking: bool = True,
    law_kw: Mapping[str, Any] | None = None,
) -> PredictionStudy:
    """The whole prediction step: leave-one-family-out and leave-one-model-out validation,
    importances of a forest fitted on every row, the laws next to the forest, the ranking check.
    """
    vals = {
        g: cross_validate(table, target, g, seed=seed, n_estimators=n_estimators)
        for g in ("family", "model")
        if g in table.columns
    }
    data = _finite_target(table, target)
    importance = pd.DataFrame()
    if len(data) >= 3 and feature_columns(data):
        forest = fit_predictor(data, target, "forest", seed=seed, n_estimators=n_estimators)
        importance = feature_importance(forest, data, seed=seed)
    laws = law_comparison(
        table, vals.get("family"), seed=seed, n_estimators=n_estimators, **dict(law_kw or {})
    )
    hit = ranking_hit_rate(table, target, seed=seed) if check_ranking else None
    return PredictionStudy(vals, importance, laws, hit)


__all__ = [
    "ACC_TARGET",
    "KUMAR_PUBLISHED",
    "LAW_FORMS",
    "NLL_TARGET",
    "RANKING_COLUMNS",
    "Encoder",
    "HitRate",
    "LawFit",
    "PredictionStudy",
    "Predictor",
    "Validation",
    "build_feature_table",
    "candidate_specs",
    "cross_validate",
    "derive_columns",
    "estimate_total_bits",
    "evaluate_published",
    "feature_columns",
    "feature_importance",
    "fit_law",
    "fit_predictor",
    "iso_sqnr_delta",
    "law_comparison",
    "law_delta",
    "leave_one_run_out",
    "lower_is_better",
    "nll_from_metric",
    "plot_not_enough_data",
    "plot_predicted_vs_measured",
    "prediction_study",
    "rank_formats",
    "ranking_hit_rate",
    "summary_markdown",
]


def plot_not_enough_data(path: str | Path, reason: str) -> Path:
    """A figure that says why there is no predicted-vs-measured plot (the rule's output exists
    either way, so a small study still completes)."""
    import matplotlib.pyplot as plt

    from kbit.analysis import style
    from kbit.io import atomic_write

    style.apply()
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.axis("off")
    ax.text(0.5, 0.5, f"no validation: {reason}", ha="center", va="center", wrap=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp))
    plt.close(fig)
    return Path(path)
