"""Paired bootstrap over documents.

Each replicate draws, for each task, one resample of that task's documents (by doc_id) and
applies it to every run: every quant config of every model is scored on the same resampled
documents. Differences between configs (and between model sizes) therefore keep the strong
positive correlation of paired evaluations, and their intervals are much tighter than those of
the points. A resample is a matrix of counts C (replicates x documents), so each task metric of
every run in every replicate is one matrix product: ``C @ values``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from kbit.analysis.curves import budget_grid, interp, main_sweep_quants
from kbit.analysis.tables import DEFAULT_ACCURACY_METRICS, MEAN_TASK, target_name

DOC_COLUMNS = (
    "model",
    "family",
    "quant",
    "task",
    "output_type",
    "doc_id",
    "ll",
    "acc",
    "acc_norm",
    "n_words",
    "n_bytes",
    "n_tokens",
)
ALPHA = 0.05


def resample_counts(n_docs: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """How often each document is drawn in each replicate: float32 (n_boot, n_docs)."""
    idx = rng.integers(0, n_docs, size=(n_boot, n_docs))
    flat = (idx + np.arange(n_boot)[:, None] * n_docs).ravel()
    return np.bincount(flat, minlength=n_boot * n_docs).reshape(n_boot, n_docs).astype(np.float32)


def _doc_matrix(values: np.ndarray, doc_pos: np.ndarray, run_pos: np.ndarray, shape) -> np.ndarray:
    """(n_docs, n_runs) matrix of a per-document quantity, NaN where a run lacks a document."""
    out = np.full(shape, np.nan)
    out[doc_pos, run_pos] = values
    return out


def _ratio(c: np.ndarray, num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Resampled sum(num) / sum(den) per replicate and run, documents missing in a run skipped."""
    mask = ~np.isnan(num)
    return (c @ np.where(mask, num, 0.0)) / (c @ np.where(mask, den, 0.0))


def task_replicates(
    g: pd.DataFrame, counts: np.ndarray
) -> tuple[list[tuple[str, str]], dict[str, np.ndarray]]:
    """Bootstrap replicates of one task's metrics for every run: ``{metric: (B, n_runs)}``.

    The same formulas as :func:`kbit.evaluation.metrics.task_metrics` with every sum weighted
    by the resample counts (all-ones counts reproduce the full-sample values exactly).
    """
    grouped = g.groupby(["model", "quant"], sort=True)
    runs = list(grouped.groups)
    doc_ids = np.sort(g["doc_id"].unique())
    shape = (len(doc_ids), len(runs))
    doc_pos = np.searchsorted(doc_ids, g["doc_id"].to_numpy())
    run_pos = grouped.ngroup().to_numpy()

    def matrix(values) -> np.ndarray:
        return _doc_matrix(np.asarray(values, dtype=float), doc_pos, run_pos, shape)

    first_ll = np.array([x[0] for x in g["ll"]], dtype=float)
    otype = str(g["output_type"].iloc[0])
    c = counts.astype(np.float64)
    out: dict[str, np.ndarray] = {}
    if otype in ("multiple_choice", "loglikelihood"):
        acc = matrix(g["acc"])
        one = np.where(np.isnan(acc), np.nan, 1.0)
        out["acc"] = _ratio(c, acc, one)
        if otype == "multiple_choice" and g["acc_norm"].notna().all():
            norm = matrix(g["acc_norm"])
            out["acc_norm"] = _ratio(c, norm, one)
        if otype == "loglikelihood":
            ll = matrix(first_ll)
            out["perplexity"] = np.exp(-_ratio(c, ll, np.where(np.isnan(ll), np.nan, 1.0)))
    elif otype == "loglikelihood_rolling":
        ll = matrix(first_ll)
        words = matrix(g["n_words"])
        nbytes = matrix(g["n_bytes"])
        out["word_perplexity"] = np.exp(-_ratio(c, ll, words))
        out["byte_perplexity"] = np.exp(-_ratio(c, ll, nbytes))
        out["bits_per_byte"] = -_ratio(c, ll, nbytes) / math.log(2)
    elif otype == "perplexity_windows":  # GPTQ-convention windows, each a document
        ll = matrix(first_ll)
        out["perplexity"] = np.exp(-_ratio(c, ll, matrix(g["n_tokens"])))
    else:
        raise ValueError(f"task output_type {otype!r} cannot be bootstrapped")
    return runs, out


def bootstrap_points(
    docs: pd.DataFrame,
    accuracy_metrics: Mapping[str, str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    targets: Sequence[str] | None = None,
    alpha: float = ALPHA,
) -> pd.DataFrame:
    """Replicates of every (model, quant) point of every target, resampling documents in pairs.

    Returns one row per (family, model, quant, target): ``estimate`` (full sample), ``se``,
    percentile ``ci_low``/``ci_high`` and ``replicates`` (a list of ``n_boot`` values; replicate
    i of every row used the same document resample, so any derived quantity can be bootstrapped
    later by computing it replicate-wise).
    """
    if n_boot < 2:
        raise ValueError(f"n_boot={n_boot}: need at least 2 replicates")
    metrics = dict(DEFAULT_ACCURACY_METRICS if accuracy_metrics is None else accuracy_metrics)
    rng = np.random.default_rng(seed)
    family = docs.groupby("model")["family"].first().to_dict()
    reps: dict[tuple[str, str, str], np.ndarray] = {}
    full: dict[tuple[str, str, str], float] = {}
    per_task: dict[str, dict[tuple[str, str], dict[str, tuple[np.ndarray, float]]]] = {}
    for task, g in docs.groupby("task", sort=True):
        n = int(g["doc_id"].nunique())
        counts = resample_counts(n, n_boot, rng)
        runs, rep = task_replicates(g, counts)
        _, point = task_replicates(g, np.ones((1, n), dtype=np.float32))
        for metric, r in rep.items():
            for j, run in enumerate(runs):
                reps[(*run, target_name(task, metric))] = r[:, j]
                full[(*run, target_name(task, metric))] = float(point[metric][0, j])
                per_task.setdefault(task, {}).setdefault(run, {})[metric] = (
                    r[:, j],
                    full[(*run, target_name(task, metric))],
                )
    # mean zero-shot accuracy per replicate: the same tasks and metrics as tables.mean_zeroshot
    runs_all = {run for t in per_task.values() for run in t}
    for run in sorted(runs_all):
        tasks = [t for t in sorted(metrics) if run in per_task.get(t, {})]
        if not tasks:
            continue
        for name in ("acc", "acc_norm"):
            pick = []
            for t in tasks:
                m = per_task[t][run]
                want = metrics[t] if name == "acc" or "acc_norm" not in m else "acc_norm"
                if want not in m:
                    break
                pick.append(m[want])
            else:
                key = (*run, target_name(MEAN_TASK, name))
                reps[key] = np.mean([p[0] for p in pick], axis=0)
                full[key] = float(np.mean([p[1] for p in pick]))
    rows = []
    for (model, quant, target), r in reps.items():
        if targets is not None and target not in targets:
            continue
        lo, hi = np.nanquantile(r, [alpha / 2, 1 - alpha / 2])
        rows.append(
            {
                "kind": "point",
                "family": family[model],
                "model": model,
                "quant": quant,
                "target": target,
                "estimate": full[(model, quant, target)],
                "se": float(np.nanstd(r, ddof=1)),
                "ci_low": float(lo),
                "ci_high": float(hi),
                "replicates": r.astype(float).tolist(),
            }
        )
    return pd.DataFrame(rows)


def replicate_curves(
    points: pd.DataFrame, curves: pd.DataFrame, family: str, target: str, quants: Sequence[str]
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``{quant: (log2_bits, estimate, replicates (B, n_models))}`` for curves of one family."""
    c = curves[(curves["family"] == family) & (curves["target"] == target)]
    p = points[(points["family"] == family) & (points["target"] == target)]
    p = p.set_index(["model", "quant"])
    out = {}
    for q in quants:
        cq = c[c["quant"] == q].sort_values("log2_bits")
        if cq.empty:
            continue
        keys = list(zip(cq["model"], cq["quant"], strict=True))
        if not all(k in p.index for k in keys):
            continue
        reps = np.stack([np.asarray(p.loc[k, "replicates"], dtype=float) for k in keys], axis=1)
        out[q] = (cq["log2_bits"].to_numpy(float), cq["value"].to_numpy(float), reps)
    return out


def paired_gain(
    rc: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    quant_a: str,
    quant_b: str,
    budgets: np.ndarray,
    sign: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Gain of curve a over curve b at equal total bits: (estimate (nq,), replicates (B, nq)).

    ``sign`` is -1 for lower-is-better metrics so that a positive gain always means "a better".
    NaN where a budget lies outside either curve's range.
    """
    xa, ya, ra = rc[quant_a]
    xb, yb, rb = rc[quant_b]
    est = sign * (interp(xa, ya, budgets) - interp(xb, yb, budgets))
    reps = sign * (interp(xa, ra, budgets) - interp(xb, rb, budgets))
    return est, reps


def interval(
    reps: np.ndarray, alpha: float = ALPHA, axis: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of replicates along ``axis`` (NaN where every replicate is NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lo = np.nanquantile(reps, alpha / 2, axis=axis)
        hi = np.nanquantile(reps, 1 - alpha / 2, axis=axis)
    return lo, hi


def optimal_frequencies(
    rc: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    labels: Mapping[str, int],
    budgets: np.ndarray,
    sign: float = 1.0,
) -> pd.DataFrame:
    """How often each precision is optimal at each budget, across replicates and in the estimate."""
    quants = list(rc)
    est = np.stack([sign * interp(rc[q][0], rc[q][1], budgets) for q in quants])  # (Q, nq)
    reps = np.stack([sign * interp(rc[q][0], rc[q][2], budgets) for q in quants])  # (Q, B, nq)
    rows = []
    for j, b in enumerate(budgets):
        avail = ~np.isnan(est[:, j])
        if avail.sum() < 1:
            continue
        r = np.where(np.isnan(reps[:, :, j]), -np.inf, reps[:, :, j])
        best = np.argmax(r, axis=0)
        best_est = int(np.nanargmax(est[:, j]))
        for i in np.flatnonzero(avail):
            rows.append(
                {
                    "kind": "optimal",
                    "budget_log2": float(b),
                    "quant": quants[i],
                    "precision": int(labels[quants[i]]),
                    "freq": float(np.mean(best == i)),
                    "is_best": bool(i == best_est),
                    "n_curves": int(avail.sum()),
                }
            )
    return pd.DataFrame(rows)


def bootstrap_table(
    points: pd.DataFrame, curves: pd.DataFrame, n_grid: int = 41, alpha: float = ALPHA
) -> pd.DataFrame:
    """Points plus, per family and target of the main sweep: pairwise precision gains at equal
    bits (kind ``diff``) and the frequency of each precision being optimal (kind ``optimal``)."""
    parts = [points]
    for (fam, target), c in curves.groupby(["family", "target"], sort=True):
        main = c[c["main_sweep"]]
        quants = [q for q in main_sweep_quants(c) if q in set(main["quant"])]
        rc = replicate_curves(points, curves, fam, target, quants)
        if len(rc) < 2:
            continue
        sign = -1.0 if bool(c["lower_is_better"].iloc[0]) else 1.0
        labels = main.groupby("quant")["precision"].first().to_dict()
        budgets = budget_grid(main["log2_bits"].to_numpy(), n_grid)
        names = sorted(rc, key=lambda q: labels[q])
        rows = []
        for i, qa in enumerate(names):
            for qb in names[i + 1 :]:
                est, reps = paired_gain(rc, qa, qb, budgets, sign)
                lo, hi = interval(reps, alpha)
                for j, b in enumerate(budgets):
                    if np.isnan(est[j]):
                        continue
                    rows.append(
                        {
                            "kind": "diff",
                            "budget_log2": float(b),
                            "quant": qa,
                            "other_quant": qb,
                            "precision": int(labels[qa]),
                            "other_precision": int(labels[qb]),
                            "estimate": float(est[j]),
                            "ci_low": float(lo[j]),
                            "ci_high": float(hi[j]),
                        }
                    )
        opt = optimal_frequencies(rc, labels, budgets, sign)
        for df in (pd.DataFrame(rows), opt):
            if len(df):
                parts.append(df.assign(family=fam, target=target))
    out = pd.concat(parts, ignore_index=True)
    if "budget_log2" in out:
        out["budget_bits"] = np.exp2(out["budget_log2"])
    return out
