"""Advice from the fitted bit-level scaling curves: the best measured configuration for a memory
budget, or the fewest bits that reach a target accuracy.

The candidates are the measured (model, quant) points of the curves, so every recommendation is
a configuration that was actually evaluated; its interval is the paired document bootstrap's.
The interpolated optimal precision at exactly the budget is reported beside it: it says which
precision's curve is highest there, for a model size that may not exist.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from kbit.analysis.bootstrap import optimal_frequencies, replicate_curves
from kbit.analysis.curves import ACCURACY_TARGET, BASELINE, interp

_UNITS = {
    "": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}
_BUDGET_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)(?:e([+-]?\d+))?\s*([A-Za-z]*)\s*$")
BUDGET_HELP = (
    "a number with a unit: bytes as B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB "
    "(powers of 1024), e.g. '8GB', '8GiB', '500MB'; bits as 'bits' (e.g. '6.4e10bits') or a "
    "plain number"
)


def parse_budget(text: str | float) -> float:
    """A budget in bits from '8GB', '8GiB', '500MB', '6.4e10bits' or a plain number of bits."""
    if isinstance(text, (int, float)):
        value, unit = float(text), "bits"
    else:
        m = _BUDGET_RE.match(str(text))
        if not m:
            raise ValueError(f"cannot parse budget {text!r}: expected {BUDGET_HELP}")
        value = float(m.group(1)) * (10.0 ** int(m.group(2)) if m.group(2) else 1.0)
        unit = m.group(3) or "bits"
    u = unit.lower()
    if u in ("bit", "bits"):
        bits = value
    else:
        stem = (
            u[:-5]
            if u.endswith("bytes")
            else u[:-4]
            if u.endswith("byte")
            else (u[:-1] if u.endswith("b") else None)
        )
        if stem is None or stem not in _UNITS:
            raise ValueError(f"unknown budget unit {unit!r} in {text!r}: expected {BUDGET_HELP}")
        bits = value * _UNITS[stem] * 8
    if not math.isfinite(bits) or bits <= 0:
        raise ValueError(f"budget {text!r} must be a positive amount of memory")
    return bits


def format_bits(bits: float) -> str:
    """Bits as a human-readable size in bytes (GB, powers of 1000)."""
    b = bits / 8
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if b >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{b:.0f} B"


@dataclass
class Recommendation:
    """One evaluated configuration with its predicted metric and interval."""

    family: str
    model: str
    n_params: float
    quant: str
    dtype: str
    bits: int
    block_size: float | None
    total_bits: float
    value: float
    ci_low: float
    ci_high: float

    def describe(self) -> str:
        block = (
            "-"
            if self.dtype == BASELINE
            else (
                "per tensor"
                if self.block_size is None or pd.isna(self.block_size)
                else str(int(self.block_size))
            )
        )
        ci = "" if math.isnan(self.ci_low) else f" [{self.ci_low:.4f}, {self.ci_high:.4f}]"
        return (
            f"{self.model} ({self.n_params / 1e6:,.0f}M params, {self.family}) at "
            f"{self.quant}: {self.bits}-bit {self.dtype}, block {block}, "
            f"{format_bits(self.total_bits)}; predicted {self.value:.4f}{ci}"
        )


def candidates(
    curves: pd.DataFrame,
    boot: pd.DataFrame | None = None,
    family: str | None = None,
    target: str = ACCURACY_TARGET,
) -> pd.DataFrame:
    """Every evaluated point of ``target`` (optionally of one family) with its interval."""
    c = curves[curves["target"] == target]
    if c.empty:
        have = sorted(curves["target"].unique()) if len(curves) else []
        raise ValueError(f"no curve points for target {target!r}; available: {have}")
    if family is not None:
        if family not in set(c["family"]):
            raise ValueError(
                f"family {family!r} not in the results; available: {sorted(c['family'].unique())}"
            )
        c = c[c["family"] == family]
    c = c.copy()
    c["ci_low"] = c["ci_high"] = np.nan
    if boot is not None and len(boot) and "kind" in boot:
        pts = boot.loc[boot["kind"] == "point", ["model", "quant", "target", "ci_low", "ci_high"]]
        c = c.drop(columns=["ci_low", "ci_high"]).merge(
            pts, on=["model", "quant", "target"], how="left"
        )
    return c


def _rec(row: pd.Series) -> Recommendation:
    return Recommendation(
        family=str(row["family"]),
        model=str(row["model"]),
        n_params=float(row["n_params"]),
        quant=str(row["quant"]),
        dtype=str(row["dtype"]),
        bits=int(row["precision"]),
        block_size=None if pd.isna(row["block_size"]) else float(row["block_size"]),
        total_bits=float(row["total_bits"]),
        value=float(row["value"]),
        ci_low=float(row["ci_low"]),
        ci_high=float(row["ci_high"]),
    )


def best_for_budget(cands: pd.DataFrame, budget_bits: float, top: int = 5) -> list[Recommendation]:
    """Configurations within the budget, best first (ties: fewer bits first)."""
    fit = cands[cands["total_bits"] <= budget_bits]
    if fit.empty:
        smallest = cands.loc[cands["total_bits"].idxmin()]
        raise ValueError(
            f"no evaluated configuration fits in {format_bits(budget_bits)}; the smallest is "
            f"{smallest['model']} at {smallest['quant']} with {format_bits(smallest['total_bits'])}"
        )
    lower = bool(fit["lower_is_better"].iloc[0]) if "lower_is_better" in fit else False
    order = fit.assign(_k=fit["value"] * (1 if lower else -1)).sort_values(["_k", "total_bits"])
    return [_rec(r) for _, r in order.head(top).iterrows()]


def fewest_bits(cands: pd.DataFrame, target_value: float, top: int = 5) -> list[Recommendation]:
    """Configurations reaching ``target_value``, fewest total bits first."""
    lower = bool(cands["lower_is_better"].iloc[0]) if "lower_is_better" in cands else False
    ok = cands[cands["value"] <= target_value] if lower else cands[cands["value"] >= target_value]
    if ok.empty:
        best = cands["value"].min() if lower else cands["value"].max()
        raise ValueError(
            f"no evaluated configuration reaches {target_value}; the best is {best:.4f}"
        )
    return [_rec(r) for _, r in ok.sort_values(["total_bits", "value"]).head(top).iterrows()]


def envelope_at(
    curves: pd.DataFrame,
    boot: pd.DataFrame | None,
    budget_bits: float,
    family: str | None,
    target: str = ACCURACY_TARGET,
) -> list[str]:
    """Per family, the main-sweep precision whose interpolated curve is best at exactly
    ``budget_bits`` (inside the range of >= 2 curves only), with how often it is best across
    bootstrap replicates."""
    c = curves[(curves["target"] == target) & curves["main_sweep"]]
    if family is not None:
        c = c[c["family"] == family]
    points = None
    if boot is not None and len(boot) and "kind" in boot:
        points = boot[(boot["kind"] == "point") & (boot["target"] == target)]
    x = np.array([math.log2(budget_bits)])
    sign = -1.0 if bool(c["lower_is_better"].any()) else 1.0
    lines = []
    for fam, g in c.groupby("family", sort=True):
        labels = g.groupby("quant")["precision"].first().to_dict()
        if points is not None and len(points):
            rc = replicate_curves(points, c, fam, target, list(labels))
        else:
            rc = {
                q: (
                    gq["log2_bits"].to_numpy(float),
                    gq["value"].to_numpy(float),
                    gq["value"].to_numpy(float)[None, :],
                )
                for q, gq in g.sort_values("log2_bits").groupby("quant")
            }
        opt = optimal_frequencies(rc, labels, x, sign) if rc else pd.DataFrame()
        if opt.empty or int(opt["n_curves"].iloc[0]) < 2:
            continue
        best = opt[opt["is_best"]].iloc[0]
        xq, yq, _ = rc[best["quant"]]
        value = float(interp(xq, yq, x)[0])
        lines.append(
            f"{fam}: the interpolated curves favour {int(best['precision'])}-bit at "
            f"this budget (predicted {value:.4f}; best in {best['freq']:.0%} of "
            f"bootstrap replicates; {int(best['n_curves'])} precisions compared)"
        )
    return lines
