"""Three models of a family's bit-level scaling curves, their goodness of fit, and the optimal
precision at each bit budget.

- ``interpolation`` (the paper): each precision's curve is piecewise linear in log2(total bits).
  It fits the observed points exactly, so its honest error is the leave-one-model-out error.
- ``base_offset``: y = f(x) + o_p with x = log2(total bits), f a polynomial shared by every
  precision and one offset per precision (the reference precision's offset is 0). Parallel
  curves are exactly this model, so small residuals mean "nearly parallel".
- ``power_law``: y = E + s * (A * (N / 1e9)^-alpha + B * k^-beta) in parameters N and bits k
  (s = -1 for accuracies, +1 for losses), the bivariate form the paper found to fit poorly.

Perplexities are fitted as cross-entropies (their natural logarithm); accuracies as they are.
All three are compared on R^2, RMSE, AIC and leave-one-model-out RMSE.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pandas as pd
from scipy import optimize, stats

from kbit.analysis.curves import budget_grid, interp
from kbit.analysis.tables import lower_is_better

N_SCALE = 1e9
log = logging.getLogger("kbit")


def fit_space(target: str) -> Callable[[np.ndarray], np.ndarray]:
    """The transform applied to a target before fitting (log for perplexities)."""
    return np.log if "perplexity" in target else (lambda v: np.asarray(v, dtype=float))


def _gof(y: np.ndarray, pred: np.ndarray, n_par: int) -> dict[str, float]:
    res = y - pred
    n = len(y)
    rss = float(np.sum(res**2))
    tss = float(np.sum((y - y.mean()) ** 2))
    aic = n * np.log(rss / n) + 2 * n_par if rss > 0 and n > n_par else float("nan")
    return {
        "r2": 1 - rss / tss if tss > 0 else float("nan"),
        "rmse": float(np.sqrt(rss / n)),
        "aic": float(aic),
        "n_points": float(n),
        "n_params": float(n_par),
    }


def _jacobian_ci(res: optimize.OptimizeResult, n: int, level: float = 0.95):
    """Standard errors and t intervals from the Jacobian at the optimum: cov = s^2 (J'J)^-1."""
    p = len(res.x)
    dof = n - p
    if dof <= 0:
        nan = np.full(p, np.nan)
        return nan, nan, nan
    s2 = 2 * res.cost / dof
    cov = s2 * np.linalg.pinv(res.jac.T @ res.jac)
    se = np.sqrt(np.clip(np.diag(cov), 0, None))
    t = stats.t.ppf(0.5 + level / 2, dof)
    return se, res.x - t * se, res.x + t * se


# ----------------------------------------------------------------------------- interpolation
def _extrap(x: np.ndarray, y: np.ndarray, xq: float) -> float:
    """Linear interpolation inside the points, linear extrapolation of the end segment outside."""
    order = np.argsort(x)
    x, y = x[order], y[order]
    if len(x) < 2:
        return float("nan")
    if xq <= x[0]:
        return float(y[0] + (y[1] - y[0]) / (x[1] - x[0]) * (xq - x[0]))
    if xq >= x[-1]:
        return float(y[-1] + (y[-1] - y[-2]) / (x[-1] - x[-2]) * (xq - x[-1]))
    return float(interp(x, y, np.array([xq]))[0])


def loo_interpolation(df: pd.DataFrame) -> np.ndarray:
    """Leave-one-model-out predictions of interpolation (NaN where a curve keeps < 2 points)."""
    pred = np.full(len(df), np.nan)
    for _, g in df.groupby("quant"):
        x, y = g["x"].to_numpy(), g["y"].to_numpy()
        for i, idx in enumerate(g.index):
            keep = np.arange(len(g)) != i
            pred[df.index.get_loc(idx)] = _extrap(x[keep], y[keep], x[i])
    return pred


# ----------------------------------------------------------------------------- base + offset
def base_offset_design(x: np.ndarray, precision: np.ndarray, levels: list[int], degree: int):
    """Design matrix [1, x, ..., x^d, one-hot(precision != reference)] (reference = levels[-1])."""
    cols = [x**d for d in range(degree + 1)]
    cols += [(precision == p).astype(float) for p in levels[:-1]]
    return np.column_stack(cols)


def fit_base_offset(
    x: np.ndarray,
    y: np.ndarray,
    precision: np.ndarray,
    degree: int = 2,
    y_reps: np.ndarray | None = None,
    x0: float | None = None,
) -> dict:
    """Least-squares fit of the shared-base-plus-offset model.

    Offsets are relative to the highest precision present (0 by definition). Intervals come
    from the Jacobian (t-based) and, when ``y_reps`` (B, n) is given, from refitting every
    bootstrap replicate (the model is linear in its parameters, so that is one pseudo-inverse).
    """
    levels = sorted({int(p) for p in precision})
    x0 = float(np.mean(x)) if x0 is None else x0
    xc = x - x0
    X = base_offset_design(xc, precision, levels, degree)
    names = [f"c{d}" for d in range(degree + 1)] + [f"offset_{p}" for p in levels[:-1]]
    if X.shape[0] < X.shape[1]:
        raise ValueError(f"{X.shape[0]} points cannot determine {X.shape[1]} parameters")
    res = optimize.least_squares(
        lambda b: X @ b - y, np.zeros(X.shape[1]), jac=lambda b: X, method="lm"
    )
    se, lo, hi = _jacobian_ci(res, len(y))
    out = {
        "names": names,
        "estimate": res.x,
        "se": se,
        "ci_low": lo,
        "ci_high": hi,
        "pred": X @ res.x,
        "x0": x0,
        "reference": levels[-1],
        "degree": degree,
    }
    if y_reps is not None:
        beta = np.linalg.pinv(X) @ np.asarray(y_reps, dtype=float).T  # (p, B)
        out["boot_ci_low"], out["boot_ci_high"] = np.nanquantile(beta, [0.025, 0.975], axis=1)
    return out


def loo_base_offset(df: pd.DataFrame, degree: int) -> np.ndarray:
    """Leave-one-model-out predictions (refit without the model, predict its points)."""
    pred = np.full(len(df), np.nan)
    x0 = float(df["x"].mean())
    for m in df["model"].unique():
        tr, te = df[df["model"] != m], df[df["model"] == m]
        levels = sorted({int(p) for p in df["precision"]})
        if not set(te["precision"]) <= set(tr["precision"]):
            continue
        Xtr = base_offset_design(
            tr["x"].to_numpy() - x0, tr["precision"].to_numpy(), levels, degree
        )
        keep = Xtr.any(axis=0)
        if Xtr[:, keep].shape[0] <= Xtr[:, keep].shape[1]:
            continue
        beta = np.linalg.lstsq(Xtr[:, keep], tr["y"].to_numpy(), rcond=None)[0]
        Xte = base_offset_design(
            te["x"].to_numpy() - x0, te["precision"].to_numpy(), levels, degree
        )
        pred[[df.index.get_loc(i) for i in te.index]] = Xte[:, keep] @ beta
    return pred


# ----------------------------------------------------------------------------- power law
def _power(theta: np.ndarray, n: np.ndarray, k: np.ndarray, s: float) -> np.ndarray:
    e, a, alpha, b, beta = theta
    return e + s * (a * n ** (-alpha) + b * k ** (-beta))


def fit_power_law(
    n_params: np.ndarray,
    bits: np.ndarray,
    y: np.ndarray,
    sign: float,
    starts: list[np.ndarray] | None = None,
) -> dict:
    """Fit y = E + sign * (A (N/1e9)^-alpha + B k^-beta) from several starts; keep the best.

    The objective is not convex in the exponents, hence the starts (a grid of exponents unless
    given, e.g. the full-data optimum when refitting without one model).
    """
    n = np.asarray(n_params, dtype=float) / N_SCALE
    k = np.asarray(bits, dtype=float)
    best = None
    e0 = float(np.max(y) if sign < 0 else np.min(y))
    starts_given = starts is not None
    if starts is None:
        starts = [np.array([e0, 0.1, a0, 0.1, b0]) for a0 in (0.2, 0.6) for b0 in (1.0, 3.0)]
    for theta0 in starts:
        try:
            res = optimize.least_squares(
                lambda t: _power(t, n, k, sign) - y,
                theta0,
                bounds=([-np.inf, 0, 0, 0, 0], [np.inf, np.inf, 5, np.inf, 10]),
            )
        except ValueError:
            continue
        if best is None or res.cost < best.cost:
            best = res
    if best is None:
        if starts_given:
            return fit_power_law(n_params, bits, y, sign)
        raise ValueError("the power law could not be fitted from any start")
    se, lo, hi = _jacobian_ci(best, len(y))
    return {
        "names": ["E", "A", "alpha", "B", "beta"],
        "estimate": best.x,
        "se": se,
        "ci_low": lo,
        "ci_high": hi,
        "pred": _power(best.x, n, k, sign),
        "sign": sign,
    }


def loo_power_law(df: pd.DataFrame, sign: float, start: np.ndarray | None = None) -> np.ndarray:
    """Leave-one-model-out predictions of the power law (refits start from ``start``)."""
    pred = np.full(len(df), np.nan)
    for m in df["model"].unique():
        tr, te = df[df["model"] != m], df[df["model"] == m]
        if tr["model"].nunique() < 2:
            continue
        f = fit_power_law(
            tr["n_params"].to_numpy(),
            tr["precision"].to_numpy(),
            tr["y"].to_numpy(),
            sign,
            None
            if start is None
            else [np.clip(start, [-np.inf, 0, 0, 0, 0], [np.inf, np.inf, 5, np.inf, 10])],
        )
        p = _power(
            f["estimate"],
            te["n_params"].to_numpy(float) / N_SCALE,
            te["precision"].to_numpy(float),
            sign,
        )
        pred[[df.index.get_loc(i) for i in te.index]] = p
    return pred


# ----------------------------------------------------------------------------- driver
def _rows(fam, target, fit, names, f, extra=None) -> list[dict]:
    rows = []
    for i, name in enumerate(names):
        r = {
            "family": fam,
            "target": target,
            "fit": fit,
            "term": name,
            "estimate": float(f["estimate"][i]),
            "se": float(f["se"][i]),
            "ci_low": float(f["ci_low"][i]),
            "ci_high": float(f["ci_high"][i]),
        }
        if "boot_ci_low" in f:
            r["boot_ci_low"] = float(f["boot_ci_low"][i])
            r["boot_ci_high"] = float(f["boot_ci_high"][i])
        rows.append(r)
    for name, v in (extra or {}).items():
        rows.append(
            {"family": fam, "target": target, "fit": fit, "term": name, "estimate": float(v)}
        )
    return rows


def _loo_rmse(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    ok = ~np.isnan(pred)
    return {
        "loo_rmse": float(np.sqrt(np.mean((y[ok] - pred[ok]) ** 2))) if ok.any() else float("nan"),
        "loo_points": float(ok.sum()),
    }


def fit_family(
    points: pd.DataFrame, target: str, degree: int = 2, y_reps: np.ndarray | None = None
) -> list[dict]:
    """Fit the three models to one family's main-sweep points of one target (long rows)."""
    fam = str(points["family"].iloc[0])
    df = points.reset_index(drop=True).copy()
    df["x"] = df["log2_bits"].astype(float)
    df["y"] = fit_space(target)(df["value"].to_numpy(float))
    y = df["y"].to_numpy()
    rows: list[dict] = []
    # (a) interpolation: exact in-sample, judged by leave-one-model-out error
    loo = loo_interpolation(df)
    n_par = len(df)
    rows += _rows(
        fam,
        target,
        "interpolation",
        [],
        {"estimate": [], "se": [], "ci_low": [], "ci_high": []},
        {
            "r2": 1.0,
            "rmse": 0.0,
            "aic": float("nan"),
            "n_points": len(df),
            "n_params": n_par,
            **_loo_rmse(y, loo),
        },
    )
    # (b) shared base + offset per precision
    if y_reps is not None:
        y_reps = fit_space(target)(y_reps)
    try:
        bo = fit_base_offset(df["x"].to_numpy(), y, df["precision"].to_numpy(), degree, y_reps)
        gof = _gof(y, bo["pred"], len(bo["names"]))
        rows += _rows(
            fam,
            target,
            "base_offset",
            bo["names"],
            bo,
            {
                **gof,
                **_loo_rmse(y, loo_base_offset(df, degree)),
                "x0": bo["x0"],
                "reference_precision": bo["reference"],
                "degree": degree,
            },
        )
    except (ValueError, np.linalg.LinAlgError) as err:
        log.warning("%s %s: no base+offset fit (%s)", fam, target, err)
    # (c) bivariate power law in parameters and bits
    sign = 1.0 if lower_is_better(target) else -1.0  # losses fall, accuracies rise with N, k
    if df["model"].nunique() >= 2 and len(df) > 5:
        pl = fit_power_law(df["n_params"].to_numpy(), df["precision"].to_numpy(), y, sign)
        gof = _gof(y, pl["pred"], 5)
        rows += _rows(
            fam,
            target,
            "power_law",
            pl["names"],
            pl,
            {**gof, **_loo_rmse(y, loo_power_law(df, sign, pl["estimate"])), "n_scale": N_SCALE},
        )
    return rows


def fit_all(
    curves: pd.DataFrame, boot: pd.DataFrame | None = None, degree: int = 2
) -> pd.DataFrame:
    """The fits table: for every family and target, the three models on the main sweep."""
    rows: list[dict] = []
    pts = (
        None
        if boot is None
        else boot[boot["kind"] == "point"].set_index(["model", "quant", "target"])
    )
    for (_fam, target), c in curves[curves["main_sweep"]].groupby(["family", "target"], sort=True):
        y_reps = None
        if pts is not None:
            keys = list(zip(c["model"], c["quant"], c["target"], strict=True))
            if all(k in pts.index for k in keys):
                y_reps = np.stack(
                    [np.asarray(pts.loc[k, "replicates"], float) for k in keys], axis=1
                )
        rows += fit_family(c, target, degree, y_reps)
    cols = [
        "family",
        "target",
        "fit",
        "term",
        "estimate",
        "se",
        "ci_low",
        "ci_high",
        "boot_ci_low",
        "boot_ci_high",
    ]
    return pd.DataFrame(rows, columns=cols)


def optimal_precision(
    curves: pd.DataFrame, boot: pd.DataFrame | None = None, n_grid: int = 41
) -> pd.DataFrame:
    """At each budget of an even log2 grid over the observed range, the best main-sweep curve.

    Best means the highest interpolated value (lowest for perplexities) among the curves whose
    range covers the budget. With the bootstrap table, ``freq_best`` is the fraction of
    replicates in which that precision is also best.
    """
    rows = []
    opt = None
    if boot is not None and "budget_log2" in boot:
        opt = boot[boot["kind"] == "optimal"]
    for (fam, target), c in curves[curves["main_sweep"]].groupby(["family", "target"], sort=True):
        sign = -1.0 if bool(c["lower_is_better"].iloc[0]) else 1.0
        budgets = budget_grid(c["log2_bits"].to_numpy(), n_grid)
        curves_q = {
            q: (g["log2_bits"].to_numpy(), g["value"].to_numpy(), int(g["precision"].iloc[0]))
            for q, g in c.groupby("quant")
        }
        vals = np.stack([interp(x, y, budgets) for x, y, _ in curves_q.values()])
        names = list(curves_q)
        for j, b in enumerate(budgets):
            avail = ~np.isnan(vals[:, j])
            if not avail.any():
                continue
            order = np.argsort(-np.where(avail, sign * vals[:, j], -np.inf))
            i = int(order[0])
            row = {
                "family": fam,
                "target": target,
                "budget_log2": float(b),
                "budget_bits": float(2**b),
                "best_quant": names[i],
                "best_precision": curves_q[names[i]][2],
                "best_value": float(vals[i, j]),
                "n_curves": int(avail.sum()),
            }
            if avail.sum() >= 2:
                k = int(order[1])
                row.update(
                    runner_up_precision=curves_q[names[k]][2],
                    margin=float(sign * (vals[i, j] - vals[k, j])),
                )
            if opt is not None:
                f = opt[
                    (opt["family"] == fam)
                    & (opt["target"] == target)
                    & np.isclose(opt["budget_log2"], b)
                    & (opt["quant"] == names[i])
                ]
                row["freq_best"] = float(f["freq"].iloc[0]) if len(f) else float("nan")
            rows.append(row)
    return pd.DataFrame(rows)
