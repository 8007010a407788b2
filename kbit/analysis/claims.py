"""Each finding of the paper (PAPER.md, findings 1-11) tested on this run's data.

Every test is defined here precisely, with its thresholds as module constants, and uses the
paired document bootstrap for its intervals: a quantity derived from several points (a gain at
equal bits, a slope, a correlation) is computed replicate by replicate, so its interval keeps the
pairing. "Significantly" means the 95% percentile interval excludes zero. A verdict is one of
``holds``, ``does not hold`` or ``not enough data``; a claim with several parts holds when every
testable part holds and fails when any part fails.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from kbit.analysis.bootstrap import interval, paired_gain
from kbit.analysis.curves import (
    ACCURACY_TARGET,
    budget_grid,
    build_curves,
    curve_label,
    interp,
    perplexity_target,
    variation_groups,
)
from kbit.analysis.figures import load_laws
from kbit.analysis.tables import lower_is_better

HOLDS, FAILS, NA = "holds", "does not hold", "not enough data"
#: finding 1: share of budgets where 4-bit is best or not significantly worse than the best
MIN_SHARE_4BIT = 0.8
#: finding 1: share of budgets where 4-bit is the best point estimate (ties alone prove nothing)
MIN_SHARE_4BIT_BEST = 0.5
#: finding 1: fewest budgets (pooled) with >= 2 curves for a verdict
MIN_BUDGETS = 3
#: finding 1: share of shared budgets where 4-bit beats 3-bit (the reversal)
MIN_SHARE_3BIT_REVERSAL = 0.8
#: finding 2: share of curves (>= 4 bits) parallel to the reference; relative slope tolerance
MIN_SHARE_PARALLEL = 0.8
SLOPE_TOLERANCE = 0.25
#: finding 3: "near random" means within this much mean accuracy of chance
NEAR_CHANCE = 0.05
UNSTABLE_FAMILIES = ("opt", "pythia")
#: findings 4, 8, 9: a "gain" smaller than this is no practical help even when significant
PRACTICAL_GAIN = 0.005
#: finding 5: block gain vs 4 -> 5 bit gain ratio accepted as "about as much"
RATIO_RANGE = (0.5, 2.0)
#: finding 10: correlation at least this strong (negative) counts as strong
STRONG_R = -0.8
MIN_RUNS_R = 5
N_GRID = 21


@dataclass
class Claim:
    """One tested finding: its verdict, the precise test and the numbers behind the verdict."""

    number: int
    statement: str
    test: str
    verdict: str = NA
    evidence: list[str] = field(default_factory=list)


@dataclass
class Est:
    """An estimate with its 95% bootstrap interval."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:+.4f} [{self.low:+.4f}, {self.high:+.4f}]"

    @property
    def significant_positive(self) -> bool:
        return self.low > 0

    @property
    def significant_negative(self) -> bool:
        return self.high < 0


def _combine(parts: list[str]) -> str:
    if FAILS in parts:
        return FAILS
    return HOLDS if HOLDS in parts else NA


class _Data:
    """Curves, points and replicates with small helpers shared by the tests."""

    def __init__(self, scores: pd.DataFrame, curves: pd.DataFrame, boot: pd.DataFrame | None):
        self.scores, self.curves = scores, curves
        pts = None if boot is None or boot.empty else boot[boot["kind"] == "point"]
        self.points = None if pts is None else pts.set_index(["model", "quant", "target"])
        self.ppl = perplexity_target(list(curves["target"].unique())) if len(curves) else None

    def reps(self, model: str, quant: str, target: str, value: float) -> np.ndarray:
        """Bootstrap replicates of one point; without a bootstrap, the point itself."""
        key = (model, quant, target)
        if self.points is not None and key in self.points.index:
            return np.asarray(self.points.loc[key, "replicates"], dtype=float)
        return np.array([value])

    def curve(self, fam: str, target: str, quant: str) -> pd.DataFrame:
        c = self.curves
        sel = c[(c["family"] == fam) & (c["target"] == target) & (c["quant"] == quant)]
        return sel.sort_values("log2_bits")

    def rc(self, fam: str, target: str, quants) -> dict:
        out = {}
        for q in quants:
            g = self.curve(fam, target, q)
            if len(g) == 0:
                continue
            r = [self.reps(m, q, target, v) for m, v in zip(g["model"], g["value"], strict=True)]
            width = min(len(x) for x in r)
            out[q] = (
                g["log2_bits"].to_numpy(float),
                g["value"].to_numpy(float),
                np.stack([x[:width] for x in r], axis=1),
            )
        return out

    def gain_bits(self, fam: str, target: str, qa: str, qb: str) -> Est | None:
        """Mean gain of curve a over b at equal total bits over their shared range."""
        rc = self.rc(fam, target, [qa, qb])
        if len(rc) < 2 or len(rc[qa][0]) < 2 or len(rc[qb][0]) < 2:
            return None
        lo = max(rc[qa][0].min(), rc[qb][0].min())
        hi = min(rc[qa][0].max(), rc[qb][0].max())
        if hi <= lo:
            return None
        sign = -1.0 if _lower(target) else 1.0
        est, reps = paired_gain(rc, qa, qb, np.linspace(lo, hi, N_GRID), sign)
        r = np.nanmean(reps, axis=1)
        low, high = interval(r)
        return Est(float(np.nanmean(est)), float(low), float(high))

    def gain_model(self, fam: str, target: str, qa: str, qb: str) -> Est | None:
        """Mean gain of config a over b for the same models (equal parameters, not bits)."""
        a, b = self.curve(fam, target, qa), self.curve(fam, target, qb)
        m = a.merge(b, on="model", suffixes=("_a", "_b"))
        if m.empty:
            return None
        sign = -1.0 if _lower(target) else 1.0
        ra = [self.reps(r.model, qa, target, r.value_a) for r in m.itertuples()]
        rb = [self.reps(r.model, qb, target, r.value_b) for r in m.itertuples()]
        w = min(len(x) for x in ra + rb)
        reps = sign * np.mean([x[:w] - y[:w] for x, y in zip(ra, rb, strict=True)], axis=0)
        low, high = interval(reps)
        return Est(float(sign * np.mean(m["value_a"] - m["value_b"])), float(low), float(high))


def _lower(target: str) -> bool:
    return lower_is_better(target)


def _main_quants(d: _Data, fam: str, target: str) -> dict[int, str]:
    c = d.curves
    m = c[(c["family"] == fam) & (c["target"] == target) & c["main_sweep"]]
    return {int(p): str(g["quant"].iloc[0]) for p, g in m.groupby("precision")}


def _families(d: _Data, target: str = ACCURACY_TARGET) -> list[str]:
    c = d.curves
    return sorted(c.loc[c["target"] == target, "family"].unique())


# ----------------------------------------------------------------------------- the findings
def claim_1(d: _Data) -> Claim:
    cl = Claim(
        1,
        "4-bit is optimal for total model bits in nearly all families and sizes; "
        "3-bit reverses the trend.",
        f"Main precision sweep, mean zero-shot accuracy, interpolated in log2(total bits) on "
        f"a grid of {N_GRID * 2 - 1} budgets per family. (a) At each budget covered by the "
        f"4-bit curve and >= 1 other, 4-bit counts as optimal when it is the best curve or "
        f"its paired-bootstrap deficit to the best is not significant; holds when this is "
        f"so at >= {MIN_SHARE_4BIT:.0%} of budgets pooled over families, 4-bit is the best "
        f"point estimate at >= {MIN_SHARE_4BIT_BEST:.0%} of them (ties alone prove nothing) "
        f"and >= {MIN_BUDGETS} such budgets exist. (b) At budgets "
        f"shared by 3- and 4-bit, 4-bit is higher at >= {MIN_SHARE_3BIT_REVERSAL:.0%}.",
    )
    ok = total = rev_ok = rev_total = n_best = 0
    for fam in _families(d):
        mq = _main_quants(d, fam, ACCURACY_TARGET)
        if 4 not in mq or len(mq) < 2:
            continue
        rc = d.rc(fam, ACCURACY_TARGET, mq.values())
        grid = budget_grid(np.concatenate([v[0] for v in rc.values()]), N_GRID * 2 - 1)
        vals = {q: interp(rc[q][0], rc[q][1], grid) for q in rc}
        f_ok = f_total = 0
        for j in range(len(grid)):
            avail = [q for q in rc if not np.isnan(vals[q][j])]
            if mq[4] not in avail or len(avail) < 2:
                continue
            best = max(avail, key=lambda q: vals[q][j])
            f_total += 1
            if best == mq[4]:
                f_ok += 1
                n_best += 1
                continue
            _, reps = paired_gain(rc, best, mq[4], grid[j : j + 1])
            if interval(reps[:, 0])[0] <= 0:
                f_ok += 1
        ok, total = ok + f_ok, total + f_total
        line = f"{fam}: 4-bit optimal or tied at {f_ok}/{f_total} budgets"
        if 3 in mq:
            g = np.array([vals[mq[4]][j] - vals[mq[3]][j] for j in range(len(grid))])
            g = g[~np.isnan(g)]
            rev_ok, rev_total = rev_ok + int((g > 0).sum()), rev_total + len(g)
            gb = d.gain_bits(fam, ACCURACY_TARGET, mq[4], mq[3])
            line += f"; 4-bit minus 3-bit at equal bits {gb} (higher at {(g > 0).sum()}/{len(g)})"
        cl.evidence.append(line)
    parts = []
    if total < MIN_BUDGETS:
        cl.evidence.append(
            f"{total} budgets where 4-bit and another precision overlap; need >= {MIN_BUDGETS}"
        )
        return cl
    if total:
        share, best_share = ok / total, n_best / total
        parts.append(
            HOLDS if share >= MIN_SHARE_4BIT and best_share >= MIN_SHARE_4BIT_BEST else FAILS
        )
        cl.evidence.append(
            f"(a) pooled: 4-bit best or tied at {ok}/{total} = {share:.0%} of budgets, "
            f"strictly best at {n_best}/{total} = {best_share:.0%}"
        )
    if rev_total >= MIN_BUDGETS:
        share = rev_ok / rev_total
        parts.append(HOLDS if share >= MIN_SHARE_3BIT_REVERSAL else FAILS)
        cl.evidence.append(f"(b) 4-bit above 3-bit at {rev_ok}/{rev_total} = {share:.0%}")
    cl.verdict = _combine(parts) if total else NA
    return cl


def _slope(x: np.ndarray, reps: np.ndarray) -> np.ndarray:
    xc = x - x.mean()
    return reps @ xc / float(xc @ xc)


def claim_2(d: _Data) -> Claim:
    cl = Claim(
        2,
        "Curves for different precisions are nearly parallel (except 3-bit).",
        "For each family, the OLS slope of mean accuracy on log2(total bits) of each "
        "main-sweep curve with >= 2 points, per bootstrap replicate. A curve of >= 4 bits "
        "is parallel to the reference (the highest precision) when the interval of the "
        f"slope difference contains 0 or the difference is <= {SLOPE_TOLERANCE:.0%} of the "
        f"reference slope; holds when >= {MIN_SHARE_PARALLEL:.0%} of curves are parallel.",
    )
    n_par = n_all = 0
    for fam in _families(d):
        mq = _main_quants(d, fam, ACCURACY_TARGET)
        rc = {p: d.rc(fam, ACCURACY_TARGET, [mq[p]])[mq[p]] for p in mq}
        rc = {p: v for p, v in rc.items() if len(v[0]) >= 2}
        if len(rc) < 2:
            continue
        ref = max(rc)
        s_ref_est = _slope(rc[ref][0], rc[ref][1][None, :])[0]
        s_ref = _slope(rc[ref][0], rc[ref][2])
        parts = []
        for p in sorted(rc):
            if p == ref:
                continue
            s_est = _slope(rc[p][0], rc[p][1][None, :])[0]
            s = _slope(rc[p][0], rc[p][2])
            w = min(len(s), len(s_ref))
            lo, hi = interval(s[:w] - s_ref[:w])
            diff = Est(float(s_est - s_ref_est), float(lo), float(hi))
            parallel = (lo <= 0 <= hi) or abs(diff.value) <= SLOPE_TOLERANCE * abs(s_ref_est)
            if p >= 4:
                n_all += 1
                n_par += int(parallel)
            tag = "" if p >= 4 else " (3-bit, not counted)"
            parts.append(
                f"{p}-bit slope {s_est:.4f}, minus ref {diff}"
                f"{' parallel' if parallel else ' NOT parallel'}{tag}"
            )
        cl.evidence.append(
            f"{fam} (reference {ref}-bit, slope {s_ref_est:.4f}/doubling): " + "; ".join(parts)
        )
    if n_all:
        share = n_par / n_all
        cl.evidence.append(f"parallel: {n_par}/{n_all} = {share:.0%} of curves with >= 4 bits")
        cl.verdict = HOLDS if share >= MIN_SHARE_PARALLEL else FAILS
    return cl


def _chance(d: _Data, model: str, quant: str) -> float:
    s = d.scores
    row = s[(s["model"] == model) & (s["quant"] == quant) & (s["target"] == ACCURACY_TARGET)]
    return float(row["chance"].iloc[0]) if len(row) and "chance" in row else float("nan")


def claim_3(d: _Data) -> Claim:
    cl = Claim(
        3,
        "3-bit OPT and Pythia become unstable at large sizes (near random accuracy).",
        f"For each OPT or Pythia family (by family name) with >= 2 sizes at 3 bits in the "
        f"main sweep: the largest model is unstable when its 3-bit mean accuracy is within "
        f"{NEAR_CHANCE} of chance (the mean over tasks of 1/choices, 0 for LAMBADA) or is "
        f"significantly below the next smaller model's. Holds when every such family is "
        f"unstable.",
    )
    parts = []
    for fam in _families(d):
        if not any(k in fam.lower() for k in UNSTABLE_FAMILIES):
            continue
        q3 = _main_quants(d, fam, ACCURACY_TARGET).get(3)
        if q3 is None:
            continue
        g = d.curve(fam, ACCURACY_TARGET, q3).sort_values("n_params")
        if len(g) < 2:
            continue
        big, prev = g.iloc[-1], g.iloc[-2]
        chance = _chance(d, big["model"], q3)
        near = big["value"] - chance <= NEAR_CHANCE
        diff = d.reps(big["model"], q3, ACCURACY_TARGET, big["value"]) - d.reps(
            prev["model"], q3, ACCURACY_TARGET, prev["value"]
        )
        lo, hi = interval(diff)
        drop = Est(float(big["value"] - prev["value"]), float(lo), float(hi))
        unstable = bool(near or drop.significant_negative)
        parts.append(HOLDS if unstable else FAILS)
        cl.evidence.append(
            f"{fam}: largest {big['model']} 3-bit accuracy {big['value']:.4f} (chance "
            f"{chance:.3f}); change from {prev['model']} {drop} -> "
            f"{'unstable' if unstable else 'stable'}"
        )
    if not parts:
        cl.evidence.append("no OPT or Pythia family with >= 2 model sizes at 3 bits")
    cl.verdict = _combine(parts)
    return cl


def _variant_gains(d: _Data, vary: str, bits, mode: str = "bits"):
    """(family, bits, reference quant, other quant, gain) for every variation group."""
    out = []
    groups = variation_groups(
        d.curves[d.curves["target"] == ACCURACY_TARGET], vary, {"bits": list(bits)}
    )
    for g in groups:
        fam, b = g["family"].iloc[0], int(g["bits"].iloc[0])
        quants = sorted(g["quant"].unique())
        main = [q for q in quants if g.loc[g["quant"] == q, "main_sweep"].any()]
        ref = main[0] if main else quants[0]
        for q in quants:
            if q == ref:
                continue
            fn = d.gain_bits if mode == "bits" else d.gain_model
            est = fn(fam, ACCURACY_TARGET, q, ref)
            if est is not None:
                out.append((fam, b, ref, q, est))
    return out


def claim_4(d: _Data) -> Claim:
    cl = Claim(
        4,
        "At 6-8 bits no data type or block size helps.",
        "At each of 6, 7, 8 bits, every curve that differs from the main-sweep curve only "
        "in data type or block size is compared at equal total bits (mean interpolated "
        f"gain over the shared range). It helps when the gain is significantly > 0 and > "
        f"{PRACTICAL_GAIN}. Holds when no variant helps.",
    )
    parts = []
    for vary in ("dtype", "block_size"):
        for fam, b, ref, q, est in _variant_gains(d, vary, (6, 7, 8)):
            helps = est.significant_positive and est.value > PRACTICAL_GAIN
            parts.append(FAILS if helps else HOLDS)
            cl.evidence.append(
                f"{fam} {b}-bit: {q} vs {ref}: gain {est}{' helps' if helps else ''}"
            )
    cl.verdict = _combine(parts)
    return cl


def claim_5(d: _Data) -> Claim:
    cl = Claim(
        5,
        "Smaller blocks help below 6 bits: at 4 bits, B 1024 -> 64 (+0.24 bit) gains "
        "about as much as 4 -> 5 bits.",
        "(a) At each precision below 6 bits with a block-size sweep, the smallest block's "
        "curve is significantly above the largest block's at equal total bits. (b) At 4 "
        "bits, the same-model gain of the smallest over the largest block divided by the "
        f"same-model gain of the 5-bit over the 4-bit main curve lies in {RATIO_RANGE}.",
    )
    parts = []
    groups = variation_groups(
        d.curves[d.curves["target"] == ACCURACY_TARGET], "block_size", {"bits": [2, 3, 4, 5]}
    )
    for g in groups:
        fam, b = g["family"].iloc[0], int(g["bits"].iloc[0])
        bs = g.drop_duplicates("quant").assign(_b=lambda x: x["block_size"].fillna(np.inf))
        bs = bs.sort_values("_b")
        small, large = bs["quant"].iloc[0], bs["quant"].iloc[-1]
        est = d.gain_bits(fam, ACCURACY_TARGET, small, large)
        if est is None:
            continue
        parts.append(HOLDS if est.significant_positive else FAILS)
        cl.evidence.append(f"(a) {fam} {b}-bit: {small} over {large} at equal bits: {est}")
        mq = _main_quants(d, fam, ACCURACY_TARGET)
        if b == 4 and 5 in mq:
            gb = d.gain_model(fam, ACCURACY_TARGET, small, large)
            g5 = d.gain_model(fam, ACCURACY_TARGET, mq[5], mq[4])
            if gb is None or g5 is None or g5.value <= 0:
                cl.evidence.append(f"(b) {fam}: 4 -> 5 bit gain {g5} is not positive; no ratio")
                continue
            ratio = gb.value / g5.value
            ok = RATIO_RANGE[0] <= ratio <= RATIO_RANGE[1]
            parts.append(HOLDS if ok else FAILS)
            cl.evidence.append(
                f"(b) {fam}: block gain {gb} vs 4->5-bit gain {g5}: ratio {ratio:.2f}"
            )
    cl.verdict = _combine(parts)
    return cl


def claim_6(d: _Data) -> Claim:
    cl = Claim(
        6,
        "Quantile and float beat int and dynamic exponent (quantile best by perplexity); "
        "int beats float at 5 bits.",
        "Data-type sweeps (same block size) compared at equal total bits. (a) At 3-4 bits "
        "each of quantile and float is significantly above each of int and dynamic. (b) At "
        "5 bits int is above float (point estimate). (c) With a perplexity task, quantile "
        "has the lowest perplexity of the data types at 3-4 bits.",
    )
    parts = []
    acc = d.curves[d.curves["target"] == ACCURACY_TARGET]
    for g in variation_groups(acc, "dtype", {"bits": [3, 4, 5]}):
        fam, b = g["family"].iloc[0], int(g["bits"].iloc[0])
        q = g.drop_duplicates("dtype").set_index("dtype")["quant"].to_dict()
        pairs = (
            [(w, lo) for w in ("quantile", "float") for lo in ("int", "dynamic")]
            if b <= 4
            else [("int", "float")]
        )
        for w, lo in pairs:
            if w not in q or lo not in q:
                continue
            est = d.gain_bits(fam, ACCURACY_TARGET, q[w], q[lo])
            if est is None:
                continue
            ok = est.significant_positive if b <= 4 else est.value > 0
            parts.append(HOLDS if ok else FAILS)
            cl.evidence.append(f"({'a' if b <= 4 else 'b'}) {fam} {b}-bit: {w} over {lo}: {est}")
        if b <= 4 and d.ppl is not None and "quantile" in q:
            ppl = d.curves[(d.curves["target"] == d.ppl) & (d.curves["family"] == fam)]
            means = {t: ppl.loc[ppl["quant"] == qq, "value"].mean() for t, qq in q.items()}
            means = {t: v for t, v in means.items() if not math.isnan(v)}
            if len(means) >= 2:
                best = min(means, key=means.get)
                parts.append(HOLDS if best == "quantile" else FAILS)
                cl.evidence.append(
                    f"(c) {fam} {b}-bit mean {d.ppl}: "
                    + ", ".join(
                        f"{t} {v:.3f}" for t, v in sorted(means.items(), key=lambda kv: kv[1])
                    )
                )
    cl.verdict = _combine(parts)
    return cl


def claim_7(d: _Data) -> Claim:
    cl = Claim(
        7,
        "Float exponent bits: best at >= ceil(k/2).",
        "For each precision k with a float exponent-bit sweep, the exponent width with the "
        "highest mean accuracy over the family's models (same bits, so equal total bits) "
        "is >= ceil(k/2); the bootstrap gives how often that is so across replicates.",
    )
    parts = []
    acc = d.curves[d.curves["target"] == ACCURACY_TARGET]
    for g in variation_groups(acc, "exponent_bits", {"dtype": "float"}):
        fam, k = g["family"].iloc[0], int(g["bits"].iloc[0])
        models = sorted(set.intersection(*[set(x["model"]) for _, x in g.groupby("quant")]))
        if not models:
            continue
        es, means, reps = [], [], []
        for e, ge in g.groupby("exponent_bits"):
            ge = ge[ge["model"].isin(models)]
            es.append(int(e))
            means.append(ge["value"].mean())
            r = [
                d.reps(m, q, ACCURACY_TARGET, v)
                for m, q, v in zip(ge["model"], ge["quant"], ge["value"], strict=True)
            ]
            w = min(len(x) for x in r)
            reps.append(np.mean([x[:w] for x in r], axis=0))
        w = min(len(r) for r in reps)
        best = es[int(np.argmax(means))]
        freq = float(
            np.mean(
                np.array(es)[np.argmax(np.stack([r[:w] for r in reps]), axis=0)] >= math.ceil(k / 2)
            )
        )
        ok = best >= math.ceil(k / 2)
        parts.append(HOLDS if ok else FAILS)
        cl.evidence.append(
            f"{fam} {k}-bit: mean accuracy by E "
            + ", ".join(f"E{e}={m:.4f}" for e, m in zip(es, means, strict=True))
            + f"; best E{best} (ceil(k/2)={math.ceil(k / 2)}; share of replicates with best "
            f"E >= ceil(k/2): {freq:.0%})"
        )
    cl.verdict = _combine(parts)
    return cl


def claim_8(d: _Data) -> Claim:
    cl = Claim(
        8,
        "Proxy quantization stabilizes 3-bit but gives no gain at 4-bit.",
        "Curves that differ only in outlier_fraction (> 0 vs 0), compared at equal total "
        "bits (the 16-bit outlier columns count). (a) At 3 bits the proxy curve is "
        f"significantly above. (b) At 4 bits it is not both significantly above and more "
        f"than {PRACTICAL_GAIN} above.",
    )
    parts = []
    for fam, b, ref, q, est in _variant_gains(d, "outlier_fraction", (3, 4)):
        if b == 3:
            ok = est.significant_positive
        else:
            ok = not (est.significant_positive and est.value > PRACTICAL_GAIN)
        parts.append(HOLDS if ok else FAILS)
        cl.evidence.append(f"({'a' if b == 3 else 'b'}) {fam} {b}-bit: {q} over {ref}: {est}")
    cl.verdict = _combine(parts)
    return cl


def claim_9(d: _Data) -> Claim:
    cl = Claim(
        9,
        "Centering never helps.",
        "Curves that differ only in centering, same models (centering adds no bits worth "
        f"counting): centered helps when its mean gain is significantly > 0 and > "
        f"{PRACTICAL_GAIN}. Holds when it never helps.",
    )
    parts = []
    for fam, b, ref, q, est in _variant_gains(d, "center", range(2, 9), mode="model"):
        centered = bool(d.curves.loc[d.curves["quant"] == q, "center"].iloc[0])
        c_q, other = (q, ref) if centered else (ref, q)
        if c_q != q:
            est = Est(-est.value, -est.high, -est.low)
        helps = est.significant_positive and est.value > PRACTICAL_GAIN
        parts.append(FAILS if helps else HOLDS)
        cl.evidence.append(f"{fam} {b}-bit: {c_q} over {other}: {est}")
    cl.verdict = _combine(parts)
    return cl


def claim_10(d: _Data) -> Claim:
    cl = Claim(
        10,
        "Perplexity and mean zero-shot accuracy correlate strongly (r = -0.94).",
        f"Pearson r between the corpus perplexity and mean zero-shot accuracy over every "
        f"(model, quant) run with both, replicate-wise for the interval; holds when r <= "
        f"{STRONG_R}.",
    )
    if d.ppl is None:
        cl.evidence.append("no perplexity task in this run")
        return cl
    s = d.scores
    a = s[s["target"] == ACCURACY_TARGET][["model", "quant", "value"]]
    p = s[s["target"] == d.ppl][["model", "quant", "value"]]
    m = a.merge(p, on=["model", "quant"], suffixes=("_a", "_p"))
    if len(m) < MIN_RUNS_R:
        cl.evidence.append(f"only {len(m)} runs have both metrics; need >= {MIN_RUNS_R}")
        return cl
    r = float(np.corrcoef(m["value_p"], m["value_a"])[0, 1])
    ra = [d.reps(x.model, x.quant, ACCURACY_TARGET, x.value_a) for x in m.itertuples()]
    rp = [d.reps(x.model, x.quant, d.ppl, x.value_p) for x in m.itertuples()]
    w = min(len(x) for x in ra + rp)
    A, P = np.stack([x[:w] for x in ra], 1), np.stack([x[:w] for x in rp], 1)
    A, P = A - A.mean(1, keepdims=True), P - P.mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        rr = (A * P).sum(1) / np.sqrt((A * A).sum(1) * (P * P).sum(1))
    lo, hi = interval(rr)
    cl.evidence.append(
        f"r({d.ppl}, {ACCURACY_TARGET}) = {Est(r, float(lo), float(hi))} over "
        f"{len(m)} runs (paper: -0.94 on Pile CommonCrawl)"
    )
    cl.verdict = HOLDS if r <= STRONG_R else FAILS
    return cl


def claim_11(d: _Data) -> Claim:
    cl = Claim(
        11,
        "GPTQ beats zero-shot methods at low bits only with blocking (2-bit GPTQ vs "
        "3-bit float on WikiText-2).",
        "For each block size with both a 2-bit GPTQ curve and a 3-bit round-to-nearest "
        "float curve, the same-model mean perplexity (accuracy without a perplexity task). "
        "Holds when GPTQ is better at every finite block size and, where per-tensor runs "
        "exist, not better per tensor.",
    )
    target = d.ppl or ACCURACY_TARGET
    c = d.curves[d.curves["target"] == target]
    gptq = c[(c["method"] == "gptq") & (c["bits"] == 2)]
    flt = c[(c["method"] == "rtn") & (c["bits"] == 3) & (c["dtype"] == "float")]
    parts = []
    for (fam, q), g in gptq.groupby(["family", "quant"]):
        b = g["block_size"].iloc[0]
        same = flt[
            (flt["family"] == fam)
            & ((flt["block_size"] == b) | (flt["block_size"].isna() & pd.isna(b)))
        ]
        if same.empty:
            continue
        est = d.gain_model(fam, target, q, same["quant"].iloc[0])
        if est is None:
            continue
        blocked = not pd.isna(b)
        better = est.value > 0
        parts.append(HOLDS if better == blocked else FAILS)
        cl.evidence.append(
            f"{fam} {curve_label(g.iloc[0], 'block_size')}: {q} over "
            f"{same['quant'].iloc[0]} ({target}, positive = GPTQ better): {est}"
        )
    if not parts:
        cl.evidence.append("no 2-bit GPTQ run with a matching 3-bit float run")
    cl.verdict = _combine(parts)
    return cl


CLAIMS = (
    claim_1,
    claim_2,
    claim_3,
    claim_4,
    claim_5,
    claim_6,
    claim_7,
    claim_8,
    claim_9,
    claim_10,
    claim_11,
)


def check_claims(
    scores: pd.DataFrame,
    laws: Mapping[str, pd.DataFrame] | str | Path | None,
    boot: pd.DataFrame | None,
) -> list[Claim]:
    """Test findings 1-11 on ``scores`` with the fit step's curves and the bootstrap table."""
    tables = load_laws(laws)
    curves = tables.get("curves")
    if curves is None or curves.empty:
        curves = build_curves(scores)
    d = _Data(scores, curves, boot if boot is not None else tables.get("bootstrap"))
    claims = [f(d) for f in CLAIMS]
    claims[1].evidence += fit_comparison(tables.get("fits"))
    if d.points is None:
        for cl in claims:
            cl.evidence.append("no bootstrap table: intervals collapse to the point estimates")
    return claims


def fit_comparison(fits: pd.DataFrame | None, target: str = ACCURACY_TARGET) -> list[str]:
    """One line per family comparing the three fits (context for finding 2: a shared base plus
    offsets fitting about as well as free interpolation means the curves are parallel)."""
    if fits is None or fits.empty:
        return []
    lines = []
    f = fits[fits["target"] == target]
    for fam, g in f.groupby("family", sort=True):
        parts = []
        for name in ("interpolation", "base_offset", "power_law"):
            t = g[g["fit"] == name].set_index("term")["estimate"]
            if "loo_rmse" not in t:
                continue
            r2 = "" if name == "interpolation" else f"R^2 {t.get('r2', float('nan')):.3f}, "
            loo = t["loo_rmse"]
            loo_text = "n/a (too few models)" if math.isnan(loo) else f"{loo:.4f}"
            parts.append(f"{name}: {r2}leave-one-model-out RMSE {loo_text}")
        if parts:
            lines.append(f"fits for {fam}: " + "; ".join(parts))
    return lines


def render_claims(claims: list[Claim]) -> str:
    """``claims.md``: a summary table, then each finding's test and evidence."""
    lines = [
        "# The paper's findings on this run",
        "",
        "Intervals are 95% paired document-bootstrap percentile intervals; gains are "
        "positive when the first configuration is better.",
        "",
        "| # | finding | verdict |",
        "|---|---|---|",
    ]
    lines += [f"| {c.number} | {c.statement} | **{c.verdict}** |" for c in claims]
    for c in claims:
        lines += [
            "",
            f"## Finding {c.number}: {c.verdict}",
            "",
            c.statement,
            "",
            f"*Test.* {c.test}",
            "",
        ]
        lines += [f"- {e}" for e in c.evidence] or ["- no data for this test"]
    return "\n".join(lines) + "\n"
