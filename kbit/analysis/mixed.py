"""Mixed-precision scaling laws (Cao et al., arXiv 2410.06722) measured on this project's tables.

Inputs are the aggregated ``scores`` table (one row per model, quant and target; see
:mod:`kbit.analysis.tables`) and, for intervals, the ``kind == "point"`` rows of the paired
document bootstrap (:func:`kbit.analysis.bootstrap.bootstrap_points`): replicate i of every run
used the same document resample, so every derived quantity below is computed replicate by
replicate and keeps the pairing.

Q_r of a run: 0 for the 16-bit baseline, 1 for a plain (not mixed) low-format run, and for a
mixed run the achieved ratio (column ``mixed_ratio_achieved``, else ``mixed_ratio``, else the
target in its id). A *series* is one low format at one granularity and selection method
(``low_quant``, ``granularity``, ``selection``, ``n_trials``, ``seed``); the baseline (Q_r 0)
and the plain low-format run (Q_r 1) belong to every series of their model.

Definitions:

- Delta of a run: relative to the same model's 16-bit value, ``value / baseline - 1`` for
  perplexities (Delta-PPL, a fraction: 0.05 is 5%) and ``value - baseline`` for accuracies.
- Q_r,max at budget b: walking the series' points in increasing Q_r (linear interpolation
  between them), the Q_r where Delta-PPL first rises above b. When no measured point exceeds b
  the value is the largest measured Q_r and the point is ``censored`` (a lower bound).
- Law 1, per family, series and budget: ``ln(y) = k x + c`` with y = parameters in billions and
  x = 1 - Q_r,max, ordinary least squares (scipy.stats.linregress) over uncensored models, with
  R^2 and RMSE in ln(y), t intervals (n - 2 degrees of freedom) and bootstrap intervals (the fit
  repeated on every replicate's Q_r,max).
- Law 2, per model, series format (the low format without its block size) and target Q_r
  <= 0.95: ``ln(Delta-PPL) = ln(A) + k ln(Q_b)`` over the block sizes Q_b whose Delta-PPL is
  positive (a logarithm needs it; per-tensor runs have no Q_b), with the same statistics.

Claims (verdicts ``holds`` / ``does not hold`` / ``not enough data``): each claim is tested in
parts; a part's statistic *supports* the claim when its bootstrap interval (when replicates
exist) and its t interval across models (when >= 3 models, or >= 2 for a mean difference)
both exclude zero on the claimed side and the estimate is at least a practical threshold in
size (a significant but negligible effect is no support), and *contradicts* it when the same
holds on the other side. A claim holds when at least ``MIN_SHARE`` of its testable parts
support it and none contradicts it; otherwise it does not hold; without testable parts there
is not enough data.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import stats

from kbit.analysis import style
from kbit.analysis.advise import format_bits
from kbit.analysis.bootstrap import ALPHA, interval
from kbit.analysis.claims import FAILS, HOLDS, NA, Claim
from kbit.analysis.curves import ACCURACY_TARGET, BASELINE, perplexity_target
from kbit.analysis.tables import MEAN_TASK
from kbit.io import atomic_write, write_parquet
from kbit.spec import ACHIEVED_COLUMN, QuantSpec

if TYPE_CHECKING:
    from matplotlib.figure import Figure as MplFigure

#: Delta-PPL budgets (fractions of the 16-bit perplexity)
BUDGETS = (0.05, 0.10, 0.20)
#: law 2 leaves out runs above this target Q_r (as the paper does)
MAX_RATIO_LAW2 = 0.95
#: fewest models for a trend across sizes (M1, M3)
MIN_MODELS = 3
#: share of a claim's testable parts that must support it
MIN_SHARE = 2 / 3
#: practical thresholds: M1 Q_r,max per decade of parameters (the paper's law 1 gives about
#: 0.2), M2 matmul-wise minus layer-wise Q_r,max, M3 change of k per decade of parameters
PRACTICAL_SLOPE_QR = 0.02
PRACTICAL_DIFF_QR = 0.01
PRACTICAL_SLOPE_K = 0.02
#: law 1's y is the parameter count in billions
SIZE_SCALE = 1e9
#: the paper's fits, for reference columns: Qwen-1.5 matmul-wise law 1 {budget: (k, c)} and
#: Qwen-1.5-7B law 2 {Q_r: (A, k)}
PAPER_LAW1 = {0.05: (-11.68, 4.83), 0.10: (-11.27, 3.35), 0.20: (-12.84, 1.86)}
PAPER_LAW2 = {0.5: (0.53, 0.32), 0.9: (1.65, 0.62), 0.95: (3.57, 0.61)}
#: a series: one low format at one granularity and selection
SERIES = ("low_quant", "granularity", "selection", "n_trials", "seed")
PERPLEXITY_METRICS = ("word_perplexity", "byte_perplexity", "perplexity")
TABLE_NAMES = ("mixed_curves", "mixed_qrmax", "mixed_law1", "mixed_law2")
_BLOCK_RE = re.compile(r"-b(?:\d+|t)(?=-|$)")


# ----------------------------------------------------------------------------- run table
def _relative(target: str) -> bool:
    """Perplexity-like targets get a relative Delta, accuracies an absolute one."""
    return target.split(":", 1)[-1] in PERPLEXITY_METRICS


def default_targets(scores: pd.DataFrame) -> list[str]:
    """Perplexity targets and the mean zero-shot accuracies present in ``scores``."""
    present = sorted(scores["target"].unique())
    ppl = [t for t in present if _relative(t)]
    acc = [t for t in (ACCURACY_TARGET, f"{MEAN_TASK}:acc_norm") if t in present]
    return ppl + acc


def low_format(low_quant: str) -> str:
    """A low format's id without its block size (``mxint4-b32`` -> ``mxint4``)."""
    return _BLOCK_RE.sub("", low_quant, count=1)


def _spec_info(quant: str) -> dict:
    spec = QuantSpec.parse(quant)
    if spec.is_baseline:
        return {"kind": "baseline"}
    low = spec.low_spec()
    info = {
        "kind": "mixed" if spec.is_mixed else "full",
        "low_quant": low.id,
        "low_format": low_format(low.id),
        "dtype": low.dtype,
        "bits": low.bits,
        "exponent_bits": low.exponent_bits,
        "block_size": low.block_size,
    }
    if spec.is_mixed:
        info.update(
            granularity=spec.granularity,
            selection=spec.selection,
            n_trials=spec.n_trials,
            seed=spec.seed,
            q_r_target=spec.mixed_ratio,
        )
    return info


def _ratio(row: pd.Series, info: dict) -> tuple[float, str]:
    if info["kind"] == "baseline":
        return 0.0, "baseline"
    if info["kind"] == "full":
        return 1.0, "full"
    for col, source in ((ACHIEVED_COLUMN, "achieved"), ("mixed_ratio", "column")):
        v = row.get(col)
        if v is not None and not pd.isna(v) and math.isfinite(float(v)):
            return float(v), source
    return float(info["q_r_target"]), "target"


def _replicate_map(points: pd.DataFrame | None) -> dict[tuple[str, str, str], np.ndarray]:
    if points is None or points.empty:
        return {}
    p = points[points["kind"] == "point"] if "kind" in points else points
    return {
        (m, q, t): np.asarray(r, dtype=float)
        for m, q, t, r in zip(p["model"], p["quant"], p["target"], p["replicates"], strict=True)
    }


def mixed_curves(
    scores: pd.DataFrame,
    points: pd.DataFrame | None = None,
    targets: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Delta against Q_r: one row per (model, target, series, run), see the module docstring.

    Columns: family, model, n_params, target, relative, the series columns, low_format, dtype,
    bits, exponent_bits, block_size, quant, kind (baseline/full/mixed), q_r, q_r_target,
    q_r_source, value, baseline, delta, total_bits (when given) and, with ``points``,
    value_ci_low/high, delta_ci_low/high and delta_replicates (paired with the baseline's).
    Models without a 16-bit row are left out (no Delta without a baseline).
    """
    need = {"model", "family", "n_params", "quant", "target", "value"}
    missing = sorted(need - set(scores.columns))
    if missing:
        raise ValueError(f"scores lack columns {missing}")
    targets = list(targets) if targets is not None else default_targets(scores)
    reps = _replicate_map(points)
    infos = {q: _spec_info(q) for q in scores["quant"].unique()}
    rows = []
    for (model, target), g in scores[scores["target"].isin(targets)].groupby(["model", "target"]):
        base = g[g["quant"] == BASELINE]
        mixed = [q for q in g["quant"] if infos[q]["kind"] == "mixed"]
        if base.empty or not mixed:
            continue
        base_value = float(base["value"].iloc[0])
        base_reps = reps.get((model, BASELINE, target))
        series = {tuple(infos[q].get(c) for c in SERIES) for q in mixed}
        for _, r in g.iterrows():
            info = infos[r["quant"]]
            for key in sorted(series, key=str):
                s = dict(zip(SERIES, key, strict=True))
                if info["kind"] != "baseline" and info["low_quant"] != s["low_quant"]:
                    continue
                if info["kind"] == "mixed" and any(info[c] != s[c] for c in SERIES):
                    continue
                rows.append(_curve_row(r, info, s, target, base_value, base_reps, reps))
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    return out.sort_values(["target", "family", "n_params", *SERIES, "q_r"], key=_sort_key)


def _sort_key(col: pd.Series) -> pd.Series:
    return col.astype(str) if col.dtype == object else col


def _curve_row(r, info, series, target, base_value, base_reps, reps) -> dict:
    fmt = {c: info.get(c) for c in ("dtype", "bits", "exponent_bits", "block_size")}
    if info["kind"] == "baseline":  # the baseline takes its series' low format for grouping
        low = _spec_info(series["low_quant"])
        fmt = {c: low.get(c) for c in fmt}
    q_r, source = _ratio(r, info)
    value = float(r["value"])
    rel = _relative(target)
    delta = value / base_value - 1.0 if rel else value - base_value
    row = {
        "family": r["family"],
        "model": r["model"],
        "n_params": float(r["n_params"]),
        "target": target,
        "relative": rel,
        **series,
        "low_format": low_format(series["low_quant"]),
        **fmt,
        "quant": r["quant"],
        "kind": info["kind"],
        "q_r": q_r,
        "q_r_target": info.get("q_r_target", q_r),
        "q_r_source": source,
        "value": value,
        "baseline": base_value,
        "delta": delta,
    }
    if "total_bits" in r.index:
        row["total_bits"] = float(r["total_bits"])
    rep = reps.get((r["model"], r["quant"], target))
    if rep is not None and base_reps is not None:
        w = min(len(rep), len(base_reps))
        d = rep[:w] / base_reps[:w] - 1.0 if rel else rep[:w] - base_reps[:w]
        lo, hi = interval(rep)
        dlo, dhi = interval(d)
        row.update(
            value_ci_low=float(lo),
            value_ci_high=float(hi),
            delta_ci_low=float(dlo),
            delta_ci_high=float(dhi),
            delta_replicates=d.tolist(),
        )
    return row


# ----------------------------------------------------------------------------- Q_r,max
def first_crossing(
    q: np.ndarray, delta: np.ndarray, budget: float
) -> tuple[np.ndarray, np.ndarray]:
    """Q_r where ``delta`` (``(..., P)`` at ascending ``q``) first rises above ``budget``.

    Returns ``(value, censored)``: linear interpolation between the last point within the
    budget and the first above it; the largest q (censored) when no point exceeds the budget;
    NaN for a row with a non-finite delta.
    """
    q = np.asarray(q, dtype=float)
    d = np.atleast_2d(np.asarray(delta, dtype=float))
    exceed = d > budget
    has = exceed.any(axis=-1)
    j = np.argmax(exceed, axis=-1)
    jm = np.clip(j - 1, 0, None)
    rows = np.arange(d.shape[0])
    d0, d1 = d[rows, jm], d[rows, j]
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(d1 > d0, (budget - d0) / (d1 - d0), 0.0)
    value = np.where(j == 0, q[0], q[jm] + np.clip(t, 0.0, 1.0) * (q[j] - q[jm]))
    value = np.where(has, value, q[-1])
    bad = ~np.isfinite(d).all(axis=-1)
    value = np.where(bad, np.nan, value)
    return value, (~has) & ~bad


def _curve_arrays(g: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(q, delta, replicates (B, P) or None) of one curve; equal q values are averaged."""
    g = g.sort_values("q_r", kind="stable")
    q = g["q_r"].to_numpy(float)
    d = g["delta"].to_numpy(float)
    reps = None
    if "delta_replicates" in g and g["delta_replicates"].map(_is_list).all():
        w = min(len(x) for x in g["delta_replicates"])
        reps = np.stack([np.asarray(x[:w], dtype=float) for x in g["delta_replicates"]], axis=1)
    uq, inv = np.unique(q, return_inverse=True)
    if len(uq) < len(q):
        count = np.bincount(inv)
        d = np.bincount(inv, weights=d) / count
        if reps is not None:
            reps = np.stack([reps[:, inv == i].mean(axis=1) for i in range(len(uq))], axis=1)
        q = uq
    return q, d, reps


def _is_list(x) -> bool:
    return isinstance(x, (list, tuple, np.ndarray)) and len(x) > 0


def qr_max_table(curves: pd.DataFrame, budgets: Sequence[float] = BUDGETS) -> pd.DataFrame:
    """Q_r,max per (model, perplexity target, series, budget) with bootstrap intervals.

    Columns: family, model, n_params, target, the series columns, low_format, budget, q_r_max,
    censored, ci_low, ci_high, n_points, q_r_max_replicates (empty without a bootstrap).
    """
    rows = []
    if curves.empty:
        return pd.DataFrame(rows)
    rel = curves[curves["relative"]]
    keys = ["family", "model", "n_params", "target", *SERIES, "low_format"]
    for key, g in rel.groupby(keys, dropna=False, sort=True):
        q, d, reps = _curve_arrays(g)
        if len(q) < 2 or q[0] != 0.0:
            continue
        for b in budgets:
            v, cens = first_crossing(q, d, b)
            row = {**dict(zip(keys, key, strict=True)), "budget": float(b)}
            row.update(q_r_max=float(v[0]), censored=bool(cens[0]), n_points=len(q))
            if reps is not None:
                rv, _ = first_crossing(q, reps, b)
                lo, hi = interval(rv)
                row.update(ci_low=float(lo), ci_high=float(hi), q_r_max_replicates=rv.tolist())
            else:
                row.update(ci_low=np.nan, ci_high=np.nan, q_r_max_replicates=[])
            rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- fits
@dataclass
class LineFit:
    """Ordinary least squares ``y = slope * x + intercept`` with t and bootstrap intervals."""

    slope: float
    intercept: float
    slope_se: float
    intercept_se: float
    slope_t: tuple[float, float]
    intercept_t: tuple[float, float]
    slope_boot: tuple[float, float]
    intercept_boot: tuple[float, float]
    r2: float
    rmse: float
    n: int
    slope_replicates: np.ndarray
    intercept_replicates: np.ndarray


def ols_replicates(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slope and intercept of OLS fits of each row of ``x`` (B, n) against ``y`` (B, n)."""
    x, y = np.atleast_2d(x), np.atleast_2d(y)
    xm, ym = x.mean(axis=1, keepdims=True), y.mean(axis=1, keepdims=True)
    sxx = ((x - xm) ** 2).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = np.where(sxx > 0, ((x - xm) * (y - ym)).sum(axis=1) / sxx, np.nan)
    return slope, ym[:, 0] - slope * xm[:, 0]


def fit_line(
    x: np.ndarray,
    y: np.ndarray,
    x_reps: np.ndarray | None = None,
    y_reps: np.ndarray | None = None,
    alpha: float = ALPHA,
) -> LineFit | None:
    """OLS of y on x (>= 2 distinct x) with t intervals (n >= 3) and bootstrap intervals.

    ``x_reps``/``y_reps`` (B, n) are replicates of x and y (either may be None: fixed); the fit
    is repeated on each replicate row. R^2 and RMSE are those of y.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or len(np.unique(x)) < 2 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return None
    n = len(x)
    lr = stats.linregress(x, y)
    pred = lr.intercept + lr.slope * x
    resid = y - pred
    tss = float(((y - y.mean()) ** 2).sum())
    nan2 = (float("nan"), float("nan"))
    st, it = nan2, nan2
    se_s = se_i = float("nan")
    if n >= 3:
        tq = stats.t.ppf(1 - alpha / 2, n - 2)
        se_s, se_i = float(lr.stderr), float(lr.intercept_stderr)
        st = (lr.slope - tq * se_s, lr.slope + tq * se_s)
        it = (lr.intercept - tq * se_i, lr.intercept + tq * se_i)
    sb, ib = nan2, nan2
    s_reps = i_reps = np.array([])
    if x_reps is not None or y_reps is not None:
        b = (x_reps if x_reps is not None else y_reps).shape[0]
        xr = x_reps if x_reps is not None else np.broadcast_to(x, (b, n))
        yr = y_reps if y_reps is not None else np.broadcast_to(y, (b, n))
        s_reps, i_reps = ols_replicates(xr, yr)
        bad = ~(np.isfinite(xr).all(axis=1) & np.isfinite(yr).all(axis=1))
        s_reps, i_reps = np.where(bad, np.nan, s_reps), np.where(bad, np.nan, i_reps)
        sb = tuple(float(v) for v in interval(s_reps, alpha))
        ib = tuple(float(v) for v in interval(i_reps, alpha))
    return LineFit(
        slope=float(lr.slope),
        intercept=float(lr.intercept),
        slope_se=se_s,
        intercept_se=se_i,
        slope_t=st,
        intercept_t=it,
        slope_boot=sb,
        intercept_boot=ib,
        r2=1 - float((resid**2).sum()) / tss if tss > 0 else float("nan"),
        rmse=float(np.sqrt(np.mean(resid**2))),
        n=n,
        slope_replicates=s_reps,
        intercept_replicates=i_reps,
    )


def _reps_matrix(col: pd.Series) -> np.ndarray | None:
    if not col.map(_is_list).all():
        return None
    w = min(len(x) for x in col)
    return np.stack([np.asarray(x[:w], dtype=float) for x in col], axis=1)


def law1_table(qmax: pd.DataFrame) -> pd.DataFrame:
    """Law 1 ``ln(y) = k (1 - Q_r,max) + c`` per (family, target, series, budget).

    Columns: the group, k, c with se / t / bootstrap intervals, r2, rmse (in ln y), n_points,
    n_censored (models left out), boot_valid (share of replicates that gave a fit), models,
    paper_k, paper_c (the paper's Qwen-1.5 matmul-wise values at that budget, for reference).
    """
    rows = []
    if qmax.empty:
        return pd.DataFrame(rows)
    keys = ["family", "target", *SERIES, "low_format", "budget"]
    for key, g in qmax.groupby(keys, dropna=False, sort=True):
        ok = g[~g["censored"] & g["q_r_max"].notna()].sort_values("n_params")
        row = dict(zip(keys, key, strict=True))
        row.update(n_points=len(ok), n_censored=int(g["censored"].sum()))
        reps = _reps_matrix(ok["q_r_max_replicates"]) if len(ok) else None
        x = 1.0 - ok["q_r_max"].to_numpy(float)
        y = np.log(ok["n_params"].to_numpy(float) / SIZE_SCALE)
        fit = fit_line(x, y, None if reps is None else 1.0 - reps, None)
        row.update(_fit_columns(fit, "k", "c"))
        row["models"] = ",".join(ok["model"])
        paper = PAPER_LAW1.get(round(float(row["budget"]), 6), (np.nan, np.nan))
        row.update(paper_k=paper[0], paper_c=paper[1])
        rows.append(row)
    return pd.DataFrame(rows)


def _fit_columns(fit: LineFit | None, slope: str, intercept: str) -> dict:
    if fit is None:
        names = [slope, intercept, "r2", "rmse", "boot_valid"]
        for p in (slope, intercept):
            names += [f"{p}_se", f"{p}_t_low", f"{p}_t_high", f"{p}_boot_low", f"{p}_boot_high"]
        return dict.fromkeys(names, np.nan) | {f"{slope}_replicates": []}
    valid = float(np.isfinite(fit.slope_replicates).mean()) if fit.slope_replicates.size else 0.0
    return {
        slope: fit.slope,
        intercept: fit.intercept,
        f"{slope}_se": fit.slope_se,
        f"{slope}_t_low": fit.slope_t[0],
        f"{slope}_t_high": fit.slope_t[1],
        f"{slope}_boot_low": fit.slope_boot[0],
        f"{slope}_boot_high": fit.slope_boot[1],
        f"{intercept}_se": fit.intercept_se,
        f"{intercept}_t_low": fit.intercept_t[0],
        f"{intercept}_t_high": fit.intercept_t[1],
        f"{intercept}_boot_low": fit.intercept_boot[0],
        f"{intercept}_boot_high": fit.intercept_boot[1],
        "r2": fit.r2,
        "rmse": fit.rmse,
        "boot_valid": valid,
        f"{slope}_replicates": fit.slope_replicates.tolist(),
    }


def law1_qr_max(n_params: np.ndarray | float, k: float, c: float) -> np.ndarray:
    """Q_r,max law 1 predicts for models of ``n_params`` parameters: 1 - (ln(y) - c) / k."""
    y = np.asarray(n_params, dtype=float) / SIZE_SCALE
    return 1.0 - (np.log(y) - c) / k


def law2_table(curves: pd.DataFrame) -> pd.DataFrame:
    """Law 2 ``Delta-PPL = A Q_b^k`` per (model, target, granularity/selection, format, Q_r).

    Mixed runs with target Q_r <= MAX_RATIO_LAW2 and a block size, in groups with >= 2 block
    sizes (a block-size sweep); points with Delta-PPL <= 0
    (or not finite) cannot be logged and are counted in ``n_nonpositive``. Columns: the group,
    A, k, their se / t / bootstrap intervals (A's are exp of ln A's), r2, rmse (in ln Delta),
    n_points, block_sizes, boot_valid, k_replicates, paper_A, paper_k (Qwen-1.5-7B).
    """
    rows = []
    if curves.empty:
        return pd.DataFrame(rows)
    c = curves[
        curves["relative"]
        & (curves["kind"] == "mixed")
        & (curves["q_r_target"] <= MAX_RATIO_LAW2 + 1e-12)
        & curves["block_size"].notna()
    ]
    keys = ["family", "model", "n_params", "target", *SERIES[1:], "low_format", "q_r_target"]
    for key, g in c.groupby(keys, dropna=False, sort=True):
        if g["block_size"].nunique() < 2:  # no block-size sweep at this point
            continue
        g = g.sort_values("block_size")
        pos = g[np.isfinite(g["delta"]) & (g["delta"] > 0)]
        row = dict(zip(keys, key, strict=True))
        row.update(
            n_points=len(pos),
            n_nonpositive=len(g) - len(pos),
            block_sizes=",".join(str(int(b)) for b in pos["block_size"]),
            q_r=float(g["q_r"].mean()),
        )
        x = np.log(pos["block_size"].to_numpy(float))
        y = np.log(pos["delta"].to_numpy(float))
        reps = _reps_matrix(pos["delta_replicates"]) if "delta_replicates" in pos else None
        y_reps = None
        if reps is not None:
            with np.errstate(invalid="ignore", divide="ignore"):
                y_reps = np.where(reps > 0, np.log(reps), np.nan)
        fit = fit_line(x, y, None, y_reps)
        cols = _fit_columns(fit, "k", "ln_A")
        ln_a = cols.pop("ln_A")
        cols["A"] = math.exp(ln_a) if np.isfinite(ln_a) else np.nan
        for part in ("t_low", "t_high", "boot_low", "boot_high"):
            v = cols.pop(f"ln_A_{part}")
            cols[f"A_{part}"] = math.exp(v) if np.isfinite(v) else np.nan
        cols["A_se_ln"] = cols.pop("ln_A_se")
        row.update(cols)
        paper = PAPER_LAW2.get(round(float(row["q_r_target"]), 6), (np.nan, np.nan))
        row.update(paper_A=paper[0], paper_k=paper[1])
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- all tables
def mixed_tables(
    scores: pd.DataFrame,
    points: pd.DataFrame | None = None,
    *,
    budgets: Sequence[float] = BUDGETS,
    targets: Sequence[str] | None = None,
) -> dict[str, pd.DataFrame]:
    """``{"mixed_curves", "mixed_qrmax", "mixed_law1", "mixed_law2"}`` from scores (+ points)."""
    curves = mixed_curves(scores, points, targets)
    qmax = qr_max_table(curves, budgets)
    return {
        "mixed_curves": curves,
        "mixed_qrmax": qmax,
        "mixed_law1": law1_table(qmax),
        "mixed_law2": law2_table(curves),
    }


def write_mixed_tables(tables: Mapping[str, pd.DataFrame], paths: Mapping[str, str | Path]) -> None:
    """Write each table to its Parquet path (atomically)."""
    missing = [n for n in TABLE_NAMES if n not in paths]
    if missing:
        raise ValueError(f"no output path for mixed-precision tables {missing}")
    for name in TABLE_NAMES:
        write_parquet(tables[name], paths[name])


# ----------------------------------------------------------------------------- claims
@dataclass
class Part:
    """One tested part of a claim: a statistic with its intervals and what it says."""

    label: str
    value: float
    boot: tuple[float, float] | None
    t: tuple[float, float] | None
    sign: float  # +1: the claim says positive, -1: negative
    threshold: float = 0.0  # smallest |value| that counts as an effect

    @property
    def _intervals(self) -> list[tuple[float, float]]:
        """The finite intervals of non-zero width. A zero-width bootstrap interval comes from a
        single resampling unit (one document: every replicate is the same number), which says
        nothing about uncertainty, so it cannot make a difference significant."""
        out = []
        for iv in (self.boot, self.t):
            if iv is not None and np.isfinite(iv).all() and iv[1] > iv[0]:
                out.append(iv)
        return out

    @property
    def testable(self) -> bool:
        return bool(self._intervals) and math.isfinite(self.value)

    def _significant(self, side: float) -> bool:
        ivs = self._intervals
        return (
            self.testable
            and all(side * lo > 0 and side * hi > 0 for lo, hi in ivs)
            and side * self.value >= self.threshold
        )

    @property
    def supports(self) -> bool:
        return self._significant(self.sign)

    @property
    def contradicts(self) -> bool:
        return self._significant(-self.sign)

    def describe(self) -> str:
        def fmt(iv):
            return (
                "n/a"
                if iv is None or not np.isfinite(iv).all()
                else f"[{iv[0]:+.4f}, {iv[1]:+.4f}]"
            )

        what = (
            "supports"
            if self.supports
            else "contradicts"
            if self.contradicts
            else f"not significant or below the practical size {self.threshold:g}"
        )
        return (
            f"{self.label}: {self.value:+.4f}, bootstrap {fmt(self.boot)}, "
            f"t {fmt(self.t)} -> {what}"
        )


def verdict(parts: list[Part]) -> tuple[str, str]:
    """The claim's verdict from its parts, and a summary line."""
    tested = [p for p in parts if p.testable]
    if not tested:
        return NA, "no testable part"
    sup = sum(p.supports for p in tested)
    con = sum(p.contradicts for p in tested)
    share = sup / len(tested)
    line = (
        f"{sup}/{len(tested)} testable parts support the claim ({share:.0%}, need "
        f">= {MIN_SHARE:.0%}), {con} contradict it"
    )
    return (HOLDS if share >= MIN_SHARE and con == 0 else FAILS), line


def _trend_part(label, x, y, y_reps, sign, threshold) -> Part | None:
    fit = fit_line(x, y, None, y_reps)
    if fit is None:
        return None
    boot = fit.slope_boot if y_reps is not None else None
    t = fit.slope_t if fit.n >= 3 else None
    return Part(label, fit.slope, boot, t, sign, threshold)


def _pct(b: float) -> str:
    return f"{100 * b:g}%"


def _series_label(key: Mapping) -> str:
    sel = key.get("selection")
    extra = "" if sel in (None, "random") else f" {sel}"
    return f"{key.get('low_quant')} {key.get('granularity')}{extra}"


def claim_m1(tables: Mapping[str, pd.DataFrame], target: str | None = None) -> Claim:
    """M1: larger models tolerate a higher Q_r."""
    cl = Claim(
        "M1",  # type: ignore[arg-type]
        "Larger models tolerate a higher quantization ratio Q_r at a fixed loss budget.",
        f"Per family, series (low format, granularity, selection) and Delta-PPL budget "
        f"({', '.join(_pct(b) for b in BUDGETS)}), the OLS slope of Q_r,max on log10(parameters) "
        f"over >= {MIN_MODELS} models (censored Q_r,max enter as their lower bound; a group "
        f"whose models are all censored is not testable). A part supports the claim when its "
        f"bootstrap interval and its t interval lie above 0 and the slope is >= "
        f"{PRACTICAL_SLOPE_QR} per decade; holds when >= {MIN_SHARE:.0%} of "
        "testable parts support it and none contradicts it.",
    )
    q = _target_rows(tables.get("mixed_qrmax"), target)
    parts = []
    if q is not None:
        keys = ["family", *SERIES, "budget"]
        for key, g in q.groupby(keys, dropna=False, sort=True):
            k = dict(zip(keys, key, strict=True))
            g = g[g["q_r_max"].notna()].sort_values("n_params")
            label = f"{k['family']} {_series_label(k)} budget {_pct(k['budget'])}"
            if len(g) < MIN_MODELS or g["censored"].all():
                cl.evidence.append(f"{label}: {len(g)} models, not testable")
                continue
            part = _trend_part(
                f"{label}: slope of Q_r,max per decade of parameters over {len(g)} models "
                f"({int(g['censored'].sum())} censored)",
                np.log10(g["n_params"].to_numpy(float)),
                g["q_r_max"].to_numpy(float),
                _reps_matrix(g["q_r_max_replicates"]),
                +1.0,
                PRACTICAL_SLOPE_QR,
            )
            if part is not None:
                parts.append(part)
                cl.evidence.append(part.describe())
    cl.verdict, line = verdict(parts)
    cl.evidence.append(line)
    return cl


def primary_target(targets: Sequence[str]) -> str | None:
    """The Delta-PPL target the laws and claims use: WikiText word perplexity first, then any
    word perplexity, then any other perplexity; None without one."""
    targets = sorted(set(targets))
    return perplexity_target(targets) or next((t for t in targets if _relative(t)), None)


def _target_rows(df: pd.DataFrame | None, target: str | None) -> pd.DataFrame | None:
    """The rows of ``target`` (default :func:`primary_target`), or None when there are none."""
    if df is None or df.empty:
        return None
    t = target or primary_target(list(df["target"].unique()))
    out = df[df["target"] == t]
    return out if len(out) else None


def claim_m2(tables: Mapping[str, pd.DataFrame], target: str | None = None) -> Claim:
    """M2: matmul-wise Q_r,max >= layer-wise Q_r,max."""
    cl = Claim(
        "M2",  # type: ignore[arg-type]
        "Matmul-wise granularity allows a higher Q_r than layer-wise.",
        "Per family, low format, selection and budget, the mean over models of "
        "Q_r,max(matmul) - Q_r,max(layer) on the same model (models where both are censored "
        "carry no information and are left out). A part supports the claim when its "
        "bootstrap interval (replicate-wise mean) and its t interval over models (>= 2 "
        f"models) lie above 0 and the mean is >= {PRACTICAL_DIFF_QR}; holds when "
        f">= {MIN_SHARE:.0%} of testable parts support it and none contradicts it.",
    )
    q = _target_rows(tables.get("mixed_qrmax"), target)
    parts = []
    if q is not None:
        keys = ["family", "low_quant", "selection", "n_trials", "seed", "budget"]
        for key, g in q.groupby(keys, dropna=False, sort=True):
            k = dict(zip(keys, key, strict=True))
            part = _granularity_part(g, k)
            if isinstance(part, str):
                cl.evidence.append(part)
            else:
                parts.append(part)
                cl.evidence.append(part.describe())
    cl.verdict, line = verdict(parts)
    cl.evidence.append(line)
    return cl


def _granularity_part(g: pd.DataFrame, k: Mapping) -> Part | str:
    label = f"{k['family']} {k['low_quant']} budget {_pct(k['budget'])}"
    m = g[g["granularity"] == "matmul"].set_index("model")
    ly = g[g["granularity"] == "layer"].set_index("model")
    models = [
        x
        for x in m.index.intersection(ly.index)
        if not (m.at[x, "censored"] and ly.at[x, "censored"])
    ]
    models = [x for x in models if np.isfinite([m.at[x, "q_r_max"], ly.at[x, "q_r_max"]]).all()]
    if not models:
        return f"{label}: no model with both granularities (and an uncensored Q_r,max)"
    diffs = np.array([m.at[x, "q_r_max"] - ly.at[x, "q_r_max"] for x in models])
    boot = None
    rm = [m.at[x, "q_r_max_replicates"] for x in models]
    rl = [ly.at[x, "q_r_max_replicates"] for x in models]
    if all(_is_list(v) for v in rm + rl):
        w = min(len(v) for v in rm + rl)
        reps = np.mean(
            [np.asarray(a[:w]) - np.asarray(b[:w]) for a, b in zip(rm, rl, strict=True)], axis=0
        )
        boot = tuple(float(v) for v in interval(reps))
    t = None
    if len(diffs) >= 2:
        se = diffs.std(ddof=1) / math.sqrt(len(diffs))
        tq = stats.t.ppf(1 - ALPHA / 2, len(diffs) - 1)
        t = (diffs.mean() - tq * se, diffs.mean() + tq * se)
    return Part(
        f"{label}: mean Q_r,max(matmul) - Q_r,max(layer) over {len(models)} models",
        float(diffs.mean()),
        boot,
        t,
        +1.0,
        PRACTICAL_DIFF_QR,
    )


def claim_m3(tables: Mapping[str, pd.DataFrame], target: str | None = None) -> Claim:
    """M3: the block-size exponent k shrinks with model size."""
    cl = Claim(
        "M3",  # type: ignore[arg-type]
        "Small blocks matter less as models grow: the block-size exponent k of "
        "Delta-PPL = A Q_b^k shrinks with model size.",
        f"Per family, granularity, selection, low format and target Q_r <= {MAX_RATIO_LAW2}, "
        f"the OLS slope of law 2's k on log10(parameters) over >= {MIN_MODELS} models with a "
        "fitted k (bootstrap: k refitted on every replicate). A part supports the claim when "
        "its bootstrap interval and its t interval lie below 0 and the slope is <= "
        f"-{PRACTICAL_SLOPE_K} per decade; holds when "
        f">= {MIN_SHARE:.0%} of testable parts support it and none contradicts it.",
    )
    law2 = _target_rows(tables.get("mixed_law2"), target)
    parts = []
    if law2 is not None:
        keys = ["family", *SERIES[1:], "low_format", "q_r_target"]
        for key, g in law2.groupby(keys, dropna=False, sort=True):
            k = dict(zip(keys, key, strict=True))
            g = g[np.isfinite(g["k"].astype(float))].sort_values("n_params")
            label = f"{k['family']} {k['low_format']} {k['granularity']} Q_r {k['q_r_target']:g}"
            if len(g) < MIN_MODELS:
                cl.evidence.append(f"{label}: {len(g)} models with a fitted k, not testable")
                continue
            part = _trend_part(
                f"{label}: slope of k per decade of parameters over {len(g)} models "
                f"(k from {g['k'].min():.3f} to {g['k'].max():.3f})",
                np.log10(g["n_params"].to_numpy(float)),
                g["k"].to_numpy(float),
                _reps_matrix(g["k_replicates"]),
                -1.0,
                PRACTICAL_SLOPE_K,
            )
            if part is not None:
                parts.append(part)
                cl.evidence.append(part.describe())
    cl.verdict, line = verdict(parts)
    cl.evidence.append(line)
    return cl


MIXED_CLAIMS = (claim_m1, claim_m2, claim_m3)


def check_mixed_claims(
    tables: Mapping[str, pd.DataFrame], target: str | None = None
) -> list[Claim]:
    """Claims M1-M3 on the tables of :func:`mixed_tables` (``target``: the Delta-PPL target,
    default the preferred perplexity target, WikiText word perplexity first)."""
    return [f(tables, target) for f in MIXED_CLAIMS]


# ----------------------------------------------------------------------------- advice
@dataclass
class MixedRecommendation:
    """One evaluated (model, low format, Q_r, granularity) with its measured score."""

    family: str
    model: str
    n_params: float
    quant: str
    low_quant: str | None
    granularity: str | None
    q_r: float
    total_bits: float
    target: str
    value: float
    ci_low: float
    ci_high: float

    def describe(self) -> str:
        if self.low_quant is None:
            how = "16-bit"
        elif self.granularity is None:
            how = f"all quantizable weights in {self.low_quant}"
        else:
            how = f"Q_r {self.q_r:.3f} of {self.low_quant}, {self.granularity}-wise"
        ci = "" if math.isnan(self.ci_low) else f" [{self.ci_low:.4f}, {self.ci_high:.4f}]"
        return (
            f"{self.model} ({self.n_params / 1e6:,.0f}M params, {self.family}): {how}, "
            f"{format_bits(self.total_bits)}; predicted {self.target} {self.value:.4f}{ci}"
        )


def best_mixed_for_budget(
    curves: pd.DataFrame,
    budget_bits: float,
    *,
    target: str | None = None,
    family: str | None = None,
    top: int = 5,
) -> list[MixedRecommendation]:
    """The best measured configurations within ``budget_bits`` total model bits, best first.

    Candidates are the evaluated runs of :func:`mixed_curves` (16-bit, plain low format and
    mixed), ranked by ``target`` (lower first for perplexities; default the preferred
    perplexity target) and then by fewer bits; the predicted score is the measured value with
    its bootstrap interval.
    """
    if curves.empty or "total_bits" not in curves:
        raise ValueError("no mixed-precision runs with total_bits to choose from")
    t = target or primary_target(list(curves["target"].unique())) or ACCURACY_TARGET
    c = curves[curves["target"] == t]
    if family is not None:
        c = c[c["family"] == family]
    if c.empty:
        raise ValueError(
            f"no mixed-precision runs for target {t!r}" + (f" in {family}" if family else "")
        )
    c = c.drop_duplicates(["model", "quant"])
    fit = c[c["total_bits"] <= budget_bits]
    if fit.empty:
        small = c.loc[c["total_bits"].idxmin()]
        raise ValueError(
            f"no evaluated configuration fits in {format_bits(budget_bits)}; the smallest is "
            f"{small['model']} at {small['quant']} with {format_bits(small['total_bits'])}"
        )
    sign = 1.0 if bool(fit["relative"].iloc[0]) else -1.0
    order = fit.assign(_k=sign * fit["value"]).sort_values(["_k", "total_bits"])
    out = []
    for _, r in order.head(top).iterrows():
        out.append(
            MixedRecommendation(
                family=str(r["family"]),
                model=str(r["model"]),
                n_params=float(r["n_params"]),
                quant=str(r["quant"]),
                low_quant=None if r["kind"] == "baseline" else str(r["low_quant"]),
                granularity=str(r["granularity"]) if r["kind"] == "mixed" else None,
                q_r=float(r["q_r"]),
                total_bits=float(r["total_bits"]),
                target=t,
                value=float(r["value"]),
                ci_low=float(r.get("value_ci_low", np.nan)),
                ci_high=float(r.get("value_ci_high", np.nan)),
            )
        )
    return out


# ----------------------------------------------------------------------------- figures
class _Skip(Exception):
    """A figure whose data is missing."""


def _panels(n: int, ncols: int = 3, w: float = 4.4, h: float = 3.6):
    import matplotlib.pyplot as plt

    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(w * ncols, h * nrows), squeeze=False, layout="constrained"
    )
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    return fig, list(axes.ravel()[:n])


def _yerr(g: pd.DataFrame, col: str, lo: str, hi: str, scale: float = 1.0):
    if lo not in g or not g[lo].notna().all():
        return None
    y = g[col].to_numpy(float)
    err = np.vstack([y - g[lo].to_numpy(float), g[hi].to_numpy(float) - y]) * scale
    return np.clip(err, 0, None)


def fig_delta_vs_ratio(curves: pd.DataFrame, target: str | None = None) -> MplFigure:
    """Delta-PPL (%) against Q_r: one panel per series, one line per model (budgets dotted)."""
    c = _target_rows(curves, target)
    if c is None:
        raise _Skip("mixed-precision runs with a perplexity and a 16-bit baseline")
    groups = list(c.groupby(["family", *SERIES], dropna=False, sort=True))
    fig, axes = _panels(len(groups))
    for ax, (key, g) in zip(axes, groups, strict=True):
        models = g.drop_duplicates("model").sort_values("n_params")["model"].tolist()
        colors = style.series_colors(len(models))
        for i, (m, col) in enumerate(zip(models, colors, strict=True)):
            gm = g[g["model"] == m].sort_values("q_r")
            ax.errorbar(
                gm["q_r"],
                100 * gm["delta"],
                yerr=_yerr(gm, "delta", "delta_ci_low", "delta_ci_high", 100.0),
                marker=style.MARKERS[i % len(style.MARKERS)],
                ms=4,
                lw=1.4,
                capsize=2,
                color=col,
                label=m,
            )
        for b in BUDGETS:
            ax.axhline(100 * b, ls=":", lw=0.9, color="0.4")
        k = dict(zip(["family", *SERIES], key, strict=True))
        ax.set_title(f"{k['family']}: {_series_label(k)}")
        ax.set_xlabel("quantization ratio $Q_r$")
        ax.set_ylabel(f"$\\Delta$PPL (%), {g['target'].iloc[0]}")
        ax.legend(fontsize="small")
    return fig


def fig_qrmax_vs_size(
    qmax: pd.DataFrame, law1: pd.DataFrame, target: str | None = None
) -> MplFigure:
    """Q_r,max against parameters (log x) per budget, with law 1's fitted curve."""
    q = _target_rows(qmax, target)
    if q is None:
        raise _Skip("Q_r,max of at least one model (mixed runs with a perplexity)")
    keys = ["family", *SERIES]
    groups = list(q.groupby(keys, dropna=False, sort=True))
    fig, axes = _panels(len(groups))
    colors = style.series_colors(len(BUDGETS))
    law = _target_rows(law1, target)
    for ax, (key, g) in zip(axes, groups, strict=True):
        k = dict(zip(keys, key, strict=True))
        for i, b in enumerate(sorted(g["budget"].unique())):
            gb = g[g["budget"] == b].sort_values("n_params")
            col = colors[i % len(colors)]
            ax.errorbar(
                gb["n_params"],
                gb["q_r_max"],
                yerr=_yerr(gb, "q_r_max", "ci_low", "ci_high"),
                ls="none",
                marker="o",
                ms=5,
                capsize=2,
                color=col,
                mfc="none" if gb["censored"].all() else col,
                label=f"budget {_pct(b)}",
            )
            fit = None
            if law is not None:
                sel = law[(law["budget"] == b)]
                for c_ in keys:
                    sel = sel[(sel[c_] == k[c_]) | (sel[c_].isna() & pd.isna(k[c_]))]
                fit = sel.iloc[0] if len(sel) and np.isfinite(sel["k"].iloc[0]) else None
            if fit is not None:
                xs = np.geomspace(gb["n_params"].min(), gb["n_params"].max(), 50)
                ys = np.clip(law1_qr_max(xs, fit["k"], fit["c"]), 0, 1)
                ax.plot(
                    xs, ys, lw=1.2, color=col, label=f"law 1: k {fit['k']:.2f}, c {fit['c']:.2f}"
                )
        _size_axis(ax)
        ax.set_title(f"{k['family']}: {_series_label(k)}")
        ax.set_xlabel("parameters")
        ax.set_ylabel("$Q_{r,\\max}$ (open: censored)")
        ax.legend(fontsize="small")
    return fig


def _size_label(v: float, _pos=None) -> str:
    return f"{v / 1e9:g}B" if v >= 1e9 else f"{v / 1e6:g}M"


def _size_axis(ax) -> None:
    """Log x axis of parameter counts, labelled 250M, 1B, ... without overlapping minor labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(_size_label))
    ax.xaxis.set_minor_formatter(NullFormatter())


def fig_delta_vs_block(
    curves: pd.DataFrame, law2: pd.DataFrame, target: str | None = None
) -> MplFigure:
    """Delta-PPL against block size (log-log) per target Q_r, with law 2's fitted lines."""
    c = _target_rows(curves, target)
    if c is None:
        raise _Skip("mixed runs at several block sizes")
    c = c[(c["kind"] == "mixed") & c["block_size"].notna()]
    keys = ["family", "model", *SERIES[1:], "low_format"]
    groups = [
        (k, g)
        for k, g in c.groupby(keys, dropna=False, sort=True)
        if g["block_size"].nunique() >= 2
    ]
    if not groups:
        raise _Skip("mixed runs of one low format at >= 2 block sizes")
    fig, axes = _panels(len(groups))
    law = _target_rows(law2, target)
    for ax, (key, g) in zip(axes, groups, strict=True):
        k = dict(zip(keys, key, strict=True))
        per_ratio = g.groupby("q_r_target")["block_size"].nunique()
        ratios = sorted(per_ratio[per_ratio >= 2].index)
        colors = style.series_colors(len(ratios))
        for i, (r, col) in enumerate(zip(ratios, colors, strict=True)):
            gr = g[(g["q_r_target"] == r) & (g["delta"] > 0)].sort_values("block_size")
            if gr.empty:
                continue
            excluded = r > MAX_RATIO_LAW2
            ax.plot(
                gr["block_size"],
                100 * gr["delta"],
                ls="none",
                marker=style.MARKERS[i % len(style.MARKERS)],
                color=col,
                mfc="none" if excluded else col,
                label=f"$Q_r$ {r:g}" + (" (not fitted)" if excluded else ""),
            )
            if law is None or excluded:
                continue
            sel = law[
                (law["model"] == k["model"])
                & (law["granularity"] == k["granularity"])
                & (law["low_format"] == k["low_format"])
                & np.isclose(law["q_r_target"], r)
            ]
            if len(sel) and np.isfinite(sel["k"].iloc[0]):
                f = sel.iloc[0]
                xs = np.geomspace(gr["block_size"].min(), gr["block_size"].max(), 30)
                ax.plot(xs, 100 * f["A"] * xs ** f["k"], lw=1.1, color=col)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{k['model']}: {k['low_format']} {k['granularity']}")
        ax.set_xlabel("block size $Q_b$")
        ax.set_ylabel("$\\Delta$PPL (%)")
        ax.legend(fontsize="small")
    return fig


FIGURES = {
    "fig_mixed_delta_vs_ratio": "Delta-PPL against the quantization ratio Q_r, per series; "
    "dotted lines are the 5/10/20% budgets; bars are 95% paired bootstrap intervals.",
    "fig_mixed_qrmax_vs_size": "Largest Q_r within each Delta-PPL budget against model size, "
    "with law 1 (y = exp(k (1 - Q_r,max) + c)); open markers are censored (lower bounds).",
    "fig_mixed_block_size": "Delta-PPL against block size at fixed Q_r with law 2 "
    "(Delta-PPL = A Q_b^k); Q_r above 0.95 is drawn open and not fitted.",
}


def _save(fig, out_dir: Path, name: str) -> list[Path]:
    import matplotlib.pyplot as plt

    paths = [
        atomic_write(out_dir / f"{name}.{ext}", lambda p, e=ext: fig.savefig(p, format=e))
        for ext in ("png", "pdf")
    ]
    plt.close(fig)
    return paths


def make_mixed_figures(
    tables: Mapping[str, pd.DataFrame], out_dir: str | Path, target: str | None = None
) -> tuple[list[Path], list[tuple[str, str]]]:
    """Write the three figures (PNG + PDF); returns (written files, [(skipped, data needed)])."""
    style.apply()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves = tables.get("mixed_curves", pd.DataFrame())
    builders = {
        "fig_mixed_delta_vs_ratio": lambda: fig_delta_vs_ratio(curves, target),
        "fig_mixed_qrmax_vs_size": lambda: fig_qrmax_vs_size(
            tables.get("mixed_qrmax", pd.DataFrame()),
            tables.get("mixed_law1", pd.DataFrame()),
            target,
        ),
        "fig_mixed_block_size": lambda: fig_delta_vs_block(
            curves, tables.get("mixed_law2", pd.DataFrame()), target
        ),
    }
    written: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for name, build in builders.items():
        try:
            fig = build()
        except _Skip as e:
            skipped.append((name, str(e)))
            continue
        written += _save(fig, out, name)
    return written, skipped


# ----------------------------------------------------------------------------- registration
#: descriptive names of M1-M3 in the claims registry (kbit.analysis.claims)
MIXED_FINDING_NAMES = {
    "M1": "larger_models_tolerate_higher_ratio",
    "M2": "matmul_beats_layer_granularity",
    "M3": "block_size_matters_less_at_scale",
}


def _registered(fn: Callable[..., Claim]) -> Callable:
    def check(d: Any, cl: Claim) -> None:
        tables = {k: v for k, v in d.tables.items() if k in TABLE_NAMES}
        if "mixed_curves" not in tables:
            cl.evidence.append("no mixed-precision runs in this study")
            return
        res = fn(tables)
        cl.verdict, cl.evidence = res.verdict, list(res.evidence)

    return check


def register_findings() -> None:
    """Register M1-M3 with the claims check, so they appear in claims.md beside findings 1-11
    when a study has mixed-precision runs (their tables are passed to ``check_claims``)."""
    from kbit.analysis.claims import Finding, register

    empty: dict[str, pd.DataFrame] = {}
    for fn in MIXED_CLAIMS:
        template = fn(empty)
        name = MIXED_FINDING_NAMES[str(template.number)]
        register(
            Finding(name, template.number, template.statement, template.test, _registered(fn)),
            replace=True,
        )


register_findings()
