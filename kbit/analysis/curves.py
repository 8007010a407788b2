"""Bit-level scaling curves: x = log2(total model bits), y = a metric, one curve per quant config.

A curve is the set of (model, value) points of one quant id within one family; the points are
the family's model sizes. The *main sweep* is the set of curves that differ only in precision
(bits, with the float exponent bits of the paper's default rule) and is what "optimal precision"
compares, together with the 16-bit baseline. Other sweeps (block size, data type, exponent bits,
proxy quantization, centering) are found from the spec fields in the data, never from names.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from kbit.analysis.tables import MEAN_TASK, lower_is_better
from kbit.spec import default_exponent_bits

SPEC_FIELDS = (
    "dtype",
    "bits",
    "exponent_bits",
    "block_size",
    "scale_dtype",
    "outlier_fraction",
    "center",
    "quantile_estimator",
    "method",
    "mixed_ratio",
    "granularity",
)
#: the spec fields that may not vary along the main precision sweep
SWEEP_FIXED = tuple(f for f in SPEC_FIELDS if f not in ("bits", "exponent_bits"))
BASELINE = "fp16"
#: perplexity-like metrics drawn as curves (when a rolling or loglikelihood task provides them)
PERPLEXITY_METRICS = ("word_perplexity", "bits_per_byte", "perplexity")
ACCURACY_TARGET = f"{MEAN_TASK}:acc"
#: the study's sweep that defines the main precision curves, when the study names its sweeps
MAIN_SWEEP = "precision"
#: tie-break between equally complete precision sweeps: the paper's main data type first
DTYPE_PREFERENCE = ("float", "int", "quantile", "nf", "dynamic")


#: columns of the curves table (plus ``main_sweep`` and, when the study names sweeps, ``sweeps``)
CURVE_COLUMNS = (
    "family",
    "target",
    "lower_is_better",
    "model",
    "n_params",
    "quant",
    *SPEC_FIELDS,
    "total_bits",
    "log2_bits",
    "value",
    "precision",
)


def curve_targets(scores: pd.DataFrame) -> list[str]:
    """Targets worth a curve: the mean zero-shot accuracies and corpus perplexities present."""
    present = set(scores["target"].unique())
    out = [t for t in (ACCURACY_TARGET, f"{MEAN_TASK}:acc_norm") if t in present]
    rolling = scores[scores["output_type"] == "loglikelihood_rolling"]
    for metric in ("word_perplexity", "bits_per_byte"):
        out += sorted(set(rolling.loc[rolling["metric"] == metric, "target"]))
    windows = scores[scores["output_type"] == "perplexity_windows"]
    out += sorted(set(windows.loc[windows["metric"] == "perplexity", "target"]))
    return out


#: the GPTQ paper's WikiText-2 perplexity (2048-token windows): Table 1's and Figure 5's metric
GPTQ_PERPLEXITY = "wikitext2_gptq:perplexity"


def gptq_metric(targets: Iterable[str], ppl: str | None) -> str:
    """What GPTQ is compared on: the GPTQ-convention WikiText-2 perplexity when the run has it,
    else ``ppl`` (the run's perplexity target), else mean zero-shot accuracy."""
    return GPTQ_PERPLEXITY if GPTQ_PERPLEXITY in set(targets) else ppl or ACCURACY_TARGET


def perplexity_target(targets: Sequence[str]) -> str | None:
    """The preferred perplexity target (WikiText word perplexity first), or None."""
    ppl = [t for t in targets if t.endswith(":word_perplexity")]
    ppl.sort(key=lambda t: (not t.startswith("wikitext"), t))
    return ppl[0] if ppl else None


def _key(row: pd.Series, cols: Sequence[str]) -> tuple:
    return tuple(None if pd.isna(row[c]) else row[c] for c in cols)


def spec_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per quant id with its spec fields (missing fields filled with their defaults)."""
    specs = df.drop_duplicates("quant").set_index("quant")
    out = pd.DataFrame(index=specs.index)
    defaults = {
        "outlier_fraction": 0.0,
        "center": False,
        "method": "rtn",
        "quantile_estimator": "sram",
        "scale_dtype": "fp16",
    }
    for f in SPEC_FIELDS:
        out[f] = specs[f] if f in specs else defaults.get(f, np.nan)
    return out


def _one_per_bits(g: pd.DataFrame) -> list[str]:
    """One quant per bit width: the paper's default exponent bits where floats offer several."""
    picks = []
    for bits, gb in g.groupby("bits"):
        if len(gb) > 1 and gb["exponent_bits"].notna().any():
            pref = gb[gb["exponent_bits"] == default_exponent_bits(int(bits))]
            gb = pref if len(pref) else gb.sort_values("exponent_bits")
        picks.append(str(gb.index[0]))
    return picks


def main_sweep_quants(df: pd.DataFrame, sweep: str = MAIN_SWEEP) -> list[str]:
    """Quant ids of the main precision sweep (plus ``fp16`` when present).

    When the rows carry the study's sweep names (column ``sweeps``) and one is called
    ``sweep``, its quants are the main sweep. Otherwise candidates are groups of quants equal in
    every spec field except bits/exponent bits; the group covering the most distinct bit widths
    wins (ties: the most (model, quant) points, then the paper's data type order float, int,
    quantile, nf, dynamic, then the smallest block size). Each bit width keeps one quant.
    """
    specs = spec_table(df)
    quantized = specs[specs["dtype"] != BASELINE]
    chosen: list[str] = []
    if "sweeps" in df.columns:
        tagged = df.loc[df["sweeps"].fillna("").str.split(",").apply(lambda s: sweep in s), "quant"]
        named = quantized[quantized.index.isin(set(tagged))]
        if len(named):
            chosen = _one_per_bits(named)
    if not chosen:
        best: tuple | None = None
        for key, g in quantized.groupby(list(SWEEP_FIXED), dropna=False, sort=True):
            picks = _one_per_bits(g)
            n_points = int(df["quant"].isin(picks).sum())
            dtype = key[SWEEP_FIXED.index("dtype")]
            pref = -DTYPE_PREFERENCE.index(dtype) if dtype in DTYPE_PREFERENCE else -99
            block = key[SWEEP_FIXED.index("block_size")]
            rank = (len(picks), n_points, pref, -(block if pd.notna(block) else np.inf))
            if best is None or rank > best:
                best, chosen = rank, picks
    if BASELINE in specs.index:
        chosen = [*chosen, BASELINE]
    return chosen


def build_curves(scores: pd.DataFrame, targets: Sequence[str] | None = None) -> pd.DataFrame:
    """The curves table: one row per (family, target, quant, model) point.

    Diverged runs (column ``diverged`` of the scores) are left out: a NaN or a perplexity of
    10^6 is an outcome to report, not a point to interpolate.

    Columns: family, target, lower_is_better, model, n_params, quant, the spec fields,
    total_bits, log2_bits, value, precision (bits; 16 for the baseline), main_sweep.
    """
    targets = list(curve_targets(scores) if targets is None else targets)
    rows = scores[scores["target"].isin(targets)].copy()
    if "diverged" in rows:  # reported in the tables and claims, never part of a curve
        rows = rows[~rows["diverged"].fillna(False).astype(bool)]
    if rows.empty:  # typed, so boolean masks on it select rows, not columns
        empty = pd.DataFrame(columns=[*CURVE_COLUMNS, "main_sweep"])
        return empty.astype({"main_sweep": bool, "lower_is_better": bool, "value": float})
    parts = []
    for _fam, g in rows.groupby("family", sort=True):
        main = set(main_sweep_quants(g))
        g = g.assign(main_sweep=g["quant"].isin(main))
        parts.append(g)
    rows = pd.concat(parts, ignore_index=True)
    rows["log2_bits"] = np.log2(rows["total_bits"].astype(float))
    rows["precision"] = np.where(rows["dtype"] == BASELINE, 16, rows["bits"]).astype(int)
    rows["lower_is_better"] = [lower_is_better(t) for t in rows["target"]]
    keep = [c for c in (*CURVE_COLUMNS, "main_sweep", "sweeps") if c in rows.columns]
    return rows[keep].sort_values(["family", "target", "quant", "log2_bits"]).reset_index(drop=True)


def interp(x: np.ndarray, y: np.ndarray, xq: np.ndarray) -> np.ndarray:
    """Piecewise-linear interpolation of ``y[..., len(x)]`` at ``xq``; NaN outside [x0, x-1].

    ``y`` may carry leading axes (e.g. bootstrap replicates): the weights depend on x only, so
    every replicate is interpolated with one matrix product.
    """
    x = np.asarray(x, dtype=float)
    xq = np.atleast_1d(np.asarray(xq, dtype=float))
    order = np.argsort(x)
    x, y = x[order], np.asarray(y, dtype=float)[..., order]
    out_shape = (*y.shape[:-1], len(xq))
    if len(x) == 0:
        return np.full(out_shape, np.nan)
    if len(x) == 1:
        w = np.where(np.isclose(xq, x[0]), 1.0, np.nan)[None, :]
        return y @ w if y.ndim else np.full(out_shape, np.nan)
    j = np.clip(np.searchsorted(x, xq, side="right") - 1, 0, len(x) - 2)
    t = (xq - x[j]) / (x[j + 1] - x[j])
    w = np.zeros((len(x), len(xq)))
    w[j, np.arange(len(xq))] = 1.0 - t
    w[j + 1, np.arange(len(xq))] += t
    res = y @ w
    inside = (xq >= x[0] - 1e-12) & (xq <= x[-1] + 1e-12)
    res[..., ~inside] = np.nan
    return res


def budget_grid(log2_bits: np.ndarray, n: int = 41) -> np.ndarray:
    """An evenly spaced grid of log2 budgets over the observed range."""
    lo, hi = float(np.min(log2_bits)), float(np.max(log2_bits))
    return np.linspace(lo, hi, n) if hi > lo else np.array([lo])


def curve_arrays(
    points: pd.DataFrame, by: str = "quant"
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{curve: (log2_bits, value)}`` for the points of one family and target."""
    return {
        k: (g["log2_bits"].to_numpy(float), g["value"].to_numpy(float))
        for k, g in points.groupby(by, sort=True)
    }


def variation_groups(
    curves: pd.DataFrame, vary: str | Sequence[str], require: dict | None = None
) -> list[pd.DataFrame]:
    """Groups of curves (within one family and target) equal in every spec field but ``vary``.

    ``require`` filters the quants first (e.g. ``{"bits": 4}``). Only groups with at least two
    distinct values of the varying field(s) are returned, largest group first.
    """
    vary = [vary] if isinstance(vary, str) else list(vary)
    df = curves[curves["dtype"] != BASELINE]
    for k, v in (require or {}).items():
        df = df[df[k].isin(v if isinstance(v, (list, tuple, set)) else [v])]
    if df.empty:
        return []
    fixed = ["family", "target", *[f for f in SPEC_FIELDS if f not in vary]]
    if "dtype" in vary and "exponent_bits" not in vary:
        # across data types, floats enter with the paper's default exponent bits only
        default = [
            pd.isna(e) or int(e) == default_exponent_bits(int(b))
            for e, b in zip(df["exponent_bits"], df["bits"], strict=True)
        ]
        df = df[np.asarray(default, dtype=bool)]
        fixed = [f for f in fixed if f != "exponent_bits"]
    groups = []
    for _, g in df.groupby(fixed, dropna=False, sort=True):
        if g.drop_duplicates(vary).shape[0] >= 2:
            groups.append(g)
    groups.sort(key=lambda g: -g["quant"].nunique())
    return groups


def curve_label(row: pd.Series | dict, vary: str | None = None) -> str:
    """A short legend label for a curve, naming the varying field when given."""
    if row["dtype"] == BASELINE:
        return "16-bit baseline"
    if vary == "block_size":
        b = row["block_size"]
        return "per tensor" if pd.isna(b) else f"block {int(b)}"
    if vary == "exponent_bits":
        return f"E{int(row['exponent_bits'])}M{int(row['bits']) - 1 - int(row['exponent_bits'])}"
    if vary == "dtype":
        return str(row["dtype"])
    if vary == "outlier_fraction":
        p = float(row["outlier_fraction"])
        return f"proxy {p:.0%}" if p else "no proxy"
    if vary == "center":
        return "centered" if bool(row["center"]) else "not centered"
    if vary == "method":
        return str(row["method"]).upper()
    return f"{int(row['bits'])}-bit"
