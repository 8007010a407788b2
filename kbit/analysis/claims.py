"""Each finding of the paper (PAPER.md, findings 1-11) tested on this run's data.

Findings live in a registry. Each is a function of the shared :class:`ClaimData` registered
with :func:`finding` under a descriptive name and the paper's number; :func:`check_claims`
runs the registry (or a subset) and :func:`render_claims` writes ``claims.md``. Another module
adds its own findings the same way, numbered with strings so they sort after the paper's::

    from kbit.analysis.claims import HOLDS, FAILS, Claim, ClaimData, finding

    @finding("mixed_ratio_exponential", number="M1", statement="...", test="...")
    def mixed_ratio_exponential(d: ClaimData, cl: Claim) -> None:
        fams = d.gate(cl, "mean_zeroshot:acc")   # families with a scaling signal
        ...                                      # append to cl.evidence, set cl.verdict

Importing that module registers its findings; ``check_claims(..., select=["M1"])`` runs only
them. ``FINDING_MODULES`` lists the modules :func:`load_findings` imports for the workflow.

Every test is defined here precisely, with its thresholds as module constants, and uses the
paired document bootstrap for its intervals: a quantity derived from several points (a gain at
equal bits, a slope, a correlation) is computed replicate by replicate, so its interval keeps the
pairing. "Significantly" means the 95% percentile interval excludes zero. A verdict is one of
``holds``, ``does not hold`` or ``not enough data``; a claim with several parts holds when every
testable part holds and fails when any part fails.

Verdicts are given only where the data can decide. Comparisons of precisions, block sizes or
data types "at equal total bits" mean nothing when more bits do not buy accuracy, and "no
variant helps" proves nothing on data that cannot show help, so every finding first requires a
*scaling signal* per family (:meth:`ClaimData.gate`): the 16-bit baseline's value (else the
main sweep's best-covered curve) must improve significantly with model size (the paired
bootstrap interval of its slope against log2 total bits excludes 0 in the better direction;
without replicates, the OLS t interval over >= 3 sizes). Finding 10 needs it in accuracy and
in perplexity, finding 11 in its perplexity metric. Families without it are excluded, with the
measured slope; with no family left the verdict is ``not enough data``.

A diverged run (flagged ``diverged`` in the scores, or with a non-finite value) is never part
of a curve; finding 3 counts it as unstable, every other finding lists it
as excluded.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from kbit.analysis.bootstrap import interval, paired_gain
from kbit.analysis.curves import (
    ACCURACY_TARGET,
    BASELINE,
    budget_grid,
    build_curves,
    gptq_metric,
    interp,
    perplexity_target,
    variation_groups,
)
from kbit.analysis.figures import (
    complete_spec_fields,
    describe_run,
    diverged_runs,
    load_laws,
    with_diverged_points,
)
from kbit.analysis.tables import lower_is_better

HOLDS, FAILS, NA = "holds", "does not hold", "not enough data"
VERDICTS = (HOLDS, FAILS, NA)
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
#: finding 11: the paper's Table 1, WikiText-2 perplexity: block size -> (2-bit GPTQ, 3-bit float)
PAPER_TABLE_1 = {64: (9.18, 9.99), 256: (10.00, 10.38), 1024: (11.84, 13.26)}
#: modules whose findings the workflow checks besides these (imported by load_findings)
FINDING_MODULES: tuple[str, ...] = ("kbit.analysis.mixed",)


#: the scaling signal's bootstrap needs at least this many documents per point (fewer, e.g.
#: two WikiText articles, give replicates that barely vary: a zero-width interval proves nothing)
MIN_SIGNAL_DOCS = 10


@dataclass
class Claim:
    """One tested finding: its verdict, the precise test and the numbers behind the verdict."""

    number: int | str
    statement: str
    test: str
    verdict: str = NA
    evidence: list[str] = field(default_factory=list)
    name: str = ""


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


@dataclass
class Signal:
    """Whether a family's ``target`` improves with model size: the scaling-signal gate."""

    family: str
    target: str
    ok: bool
    reason: str
    curve: str = ""
    slope: Est | None = None
    n_models: int = 0

    def __str__(self) -> str:
        return f"{self.family}: {self.reason}"


class Claims(list):
    """The checked claims, plus the context every reader needs: each family's scaling signal
    (``signals``, a table) and the diverged runs (``diverged``)."""

    signals: pd.DataFrame
    diverged: pd.DataFrame


def _combine(parts: list[str]) -> str:
    if FAILS in parts:
        return FAILS
    return HOLDS if HOLDS in parts else NA


def _combine_strict(parts: list[str]) -> str:
    """Fails when any part fails; holds only when every part holds."""
    if FAILS in parts:
        return FAILS
    return HOLDS if parts and all(p == HOLDS for p in parts) else NA


def _lower(target: str) -> bool:
    return lower_is_better(target)


def _sign(target: str) -> float:
    return -1.0 if _lower(target) else 1.0


def _slope(x: np.ndarray, reps: np.ndarray) -> np.ndarray:
    xc = x - x.mean()
    return reps @ xc / float(xc @ xc)


# ----------------------------------------------------------------------------- the data
class ClaimData:
    """Scores, curves, bootstrap replicates and the helpers the findings share.

    ``scores`` and ``curves`` hold finite, non-diverged points only; ``all_scores`` and
    ``all_curves`` keep every row (the latter with a ``diverged`` column); ``diverged`` lists
    the diverged runs; ``tables`` is every table passed in (for findings of other modules).
    """

    def __init__(
        self,
        scores: pd.DataFrame,
        curves: pd.DataFrame,
        boot: pd.DataFrame | None,
        tables: Mapping[str, pd.DataFrame] | None = None,
    ):
        self.all_scores = scores
        self.diverged = diverged_runs(scores)
        bad = set(zip(self.diverged["model"], self.diverged["quant"], strict=True))
        keep = np.array(
            [(m, q) not in bad for m, q in zip(scores["model"], scores["quant"], strict=True)],
            dtype=bool,
        )
        self.scores = scores[keep]
        self.all_curves = with_diverged_points(curves, scores) if len(curves) else curves
        self.curves = (
            self.all_curves[~self.all_curves["diverged"]] if len(curves) else self.all_curves
        )
        self.tables = dict(tables or {})
        pts = None if boot is None or boot.empty else boot[boot["kind"] == "point"]
        self.points = None if pts is None else pts.set_index(["model", "quant", "target"])
        self.ppl = perplexity_target(list(curves["target"].unique())) if len(curves) else None
        self._signals: dict[tuple[str, str], Signal] = {}

    # --------------------------------------------------------------- points and replicates
    def reps(self, model: str, quant: str, target: str, value: float) -> np.ndarray:
        """Bootstrap replicates of one point; without a bootstrap, the point itself."""
        key = (model, quant, target)
        if self.points is not None and key in self.points.index:
            return np.asarray(self.points.loc[key, "replicates"], dtype=float)
        return np.array([value])

    def has_reps(self, models: Iterable[str], quant: str, target: str) -> bool:
        """Whether every (model, quant, target) point has bootstrap replicates."""
        if self.points is None:
            return False
        return all((m, quant, target) in self.points.index for m in models)

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
        est, reps = paired_gain(rc, qa, qb, np.linspace(lo, hi, N_GRID), _sign(target))
        r = np.nanmean(reps, axis=1)
        low, high = interval(r)
        return Est(float(np.nanmean(est)), float(low), float(high))

    def gain_model(self, fam: str, target: str, qa: str, qb: str) -> Est | None:
        """Mean gain of config a over b for the same models (equal parameters, not bits)."""
        a, b = self.curve(fam, target, qa), self.curve(fam, target, qb)
        m = a.merge(b, on="model", suffixes=("_a", "_b"))
        if m.empty:
            return None
        sign = _sign(target)
        ra = [self.reps(r.model, qa, target, r.value_a) for r in m.itertuples()]
        rb = [self.reps(r.model, qb, target, r.value_b) for r in m.itertuples()]
        w = min(len(x) for x in ra + rb)
        reps = sign * np.mean([x[:w] - y[:w] for x, y in zip(ra, rb, strict=True)], axis=0)
        low, high = interval(reps)
        return Est(float(sign * np.mean(m["value_a"] - m["value_b"])), float(low), float(high))

    def main_quants(self, fam: str, target: str = ACCURACY_TARGET) -> dict[int, str]:
        """``{precision: quant}`` of the family's main precision sweep (baseline as 16)."""
        c = self.all_curves
        if not len(c):
            return {}
        m = c[(c["family"] == fam) & (c["target"] == target) & c["main_sweep"]]
        return {int(p): str(g["quant"].iloc[0]) for p, g in m.groupby("precision")}

    def families(self, target: str = ACCURACY_TARGET) -> list[str]:
        c = self.curves
        if not len(c):
            return []
        return sorted(c.loc[c["target"] == target, "family"].unique())

    # --------------------------------------------------------------- the scaling signal
    def target_points(self, fam: str, target: str) -> pd.DataFrame:
        """Finite, non-diverged points of one family and target (from the scores, so targets
        without curves, such as the GPTQ-convention perplexity, work too)."""
        s = self.scores
        g = s[(s["family"] == fam) & (s["target"] == target)]
        g = g[np.isfinite(pd.to_numeric(g["value"], errors="coerce").to_numpy(float))]
        return g.assign(log2_bits=np.log2(g["total_bits"].astype(float)))

    def _signal_curve(self, fam: str, target: str, pts: pd.DataFrame) -> str | None:
        """The baseline when it has >= 2 sizes, else the main-sweep curve with the most sizes
        (ties: the higher precision), else the quant with the most sizes."""
        sizes = pts.groupby("quant")["model"].nunique()
        if sizes.get(BASELINE, 0) >= 2:
            return BASELINE
        main = {q: p for p, q in self.main_quants(fam, target).items()}
        pool = [q for q in sizes.index if q in main] or list(sizes.index)
        pool = [q for q in pool if sizes[q] >= 2]
        if not pool:
            return None
        return max(pool, key=lambda q: (sizes[q], main.get(q, 0), q))

    def signal(self, fam: str, target: str) -> Signal:
        """Does ``target`` improve significantly with model size in family ``fam``?"""
        key = (fam, target)
        if key not in self._signals:
            self._signals[key] = self._compute_signal(fam, target)
        return self._signals[key]

    def _compute_signal(self, fam: str, target: str) -> Signal:
        pts = self.target_points(fam, target)
        q = self._signal_curve(fam, target, pts)
        if q is None:
            return Signal(fam, target, False, f"fewer than 2 model sizes with finite {target}")
        g = pts[pts["quant"] == q].drop_duplicates("model").sort_values("log2_bits")
        x, y = g["log2_bits"].to_numpy(float), g["value"].to_numpy(float)
        name = "16-bit baseline" if q == BASELINE else q
        if np.ptp(x) == 0:
            return Signal(fam, target, False, f"{name}: all sizes have the same total bits", q)
        sign = _sign(target)
        est = float(_slope(x, y[None, :])[0])
        docs = int(g["n_docs"].min()) if "n_docs" in g and g["n_docs"].notna().all() else None
        # a bootstrap over a handful of documents (WikiText's few articles) is no interval
        enough_docs = docs is None or docs >= MIN_SIGNAL_DOCS
        if enough_docs and self.has_reps(g["model"], q, target):
            r = [self.reps(m, q, target, v) for m, v in zip(g["model"], y, strict=True)]
            w = min(len(v) for v in r)
            lo, hi = interval(_slope(x, np.stack([v[:w] for v in r], axis=1)))
            how = "paired bootstrap"
        elif len(x) >= 3:
            fit = stats.linregress(x, y)
            t = stats.t.ppf(0.975, len(x) - 2)
            lo, hi = est - t * fit.stderr, est + t * fit.stderr
            how = "OLS t interval, no bootstrap replicates"
        else:
            return Signal(
                fam,
                target,
                False,
                f"{name} slope {est:+.4f} per doubling of total bits from 2 sizes without "
                f"bootstrap replicates over >= {MIN_SIGNAL_DOCS} documents: a slope cannot be "
                "told from noise",
                q,
                Est(est, est, est),
                len(x),
            )
        slope = Est(est, float(lo), float(hi))
        better = slope.significant_negative if sign < 0 else slope.significant_positive
        verdict = "significant" if better else "not significant"
        reason = (
            f"{name} {target} slope {slope} per doubling of total bits over {len(x)} sizes "
            f"({how}); must {'fall' if sign < 0 else 'rise'} significantly: {verdict}"
        )
        if not better and (slope.value * sign) < 0:
            reason += f" (it {'rises' if sign < 0 else 'falls'} instead)"
        return Signal(fam, target, better, reason, q, slope, len(x))

    def gate(
        self, cl: Claim, target: str = ACCURACY_TARGET, families: Iterable[str] | None = None
    ) -> list[str]:
        """Families with a scaling signal in ``target``; the excluded ones are noted in ``cl``.

        With none left, ``cl`` says so and keeps the verdict ``not enough data``.
        """
        fams = sorted(families) if families is not None else self.all_families(target)
        kept = []
        for fam in fams:
            s = self.signal(fam, target)
            if s.ok:
                kept.append(fam)
            else:
                cl.evidence.append(f"{fam} excluded, no scaling signal: {s.reason}")
        if not kept:
            what = ", ".join(fams) if fams else "no family"
            cl.evidence.append(
                f"not enough data: no family ({what}) has {target} improving significantly "
                "with model size, so bits cannot be said to buy accuracy"
            )
            cl.verdict = NA
        return kept

    def all_families(self, target: str = ACCURACY_TARGET) -> list[str]:
        """Every family with rows of ``target``, diverged runs and all."""
        s = self.all_scores
        return sorted(s.loc[s["target"] == target, "family"].dropna().unique())


# ----------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class Finding:
    """A registered finding: a descriptive name, its number, what it states and how it is
    tested, and ``check(data, claim)`` which fills the claim's evidence and verdict."""

    name: str
    number: int | str
    statement: str
    test: str
    check: Callable[[ClaimData, Claim], None]

    def run(self, d: ClaimData) -> Claim:
        cl = Claim(self.number, self.statement, self.test, name=self.name)
        self.check(d, cl)
        if cl.verdict not in VERDICTS:
            raise ValueError(f"finding {self.name} set verdict {cl.verdict!r}, not {VERDICTS}")
        return cl


REGISTRY: dict[str, Finding] = {}


def register(f: Finding, replace: bool = False) -> Finding:
    """Add a finding to the registry (names and numbers are unique unless ``replace``)."""
    clash = [g for g in REGISTRY.values() if g.name != f.name and str(g.number) == str(f.number)]
    if clash and not replace:
        raise ValueError(f"finding number {f.number!r} is taken by {clash[0].name!r}")
    if f.name in REGISTRY and not replace and REGISTRY[f.name].check is not f.check:
        raise ValueError(f"a finding named {f.name!r} is already registered")
    for g in clash:
        REGISTRY.pop(g.name)
    REGISTRY[f.name] = f
    return f


def finding(
    name: str, number: int | str, statement: str, test: str, replace: bool = False
) -> Callable[[Callable[[ClaimData, Claim], None]], Callable[[ClaimData, Claim], None]]:
    """Decorator: register ``check(data, claim)`` as finding ``name`` numbered ``number``."""

    def wrap(check: Callable[[ClaimData, Claim], None]):
        register(Finding(name, number, statement, test, check), replace=replace)
        return check

    return wrap


def _order(number: int | str) -> tuple:
    """Paper findings (ints) first in order, then string numbers naturally (M1 < M2 < M10)."""
    if isinstance(number, int):
        return (0, "", number)
    s = str(number)
    head = s.rstrip("0123456789")
    tail = s[len(head) :]
    return (1, head, int(tail) if tail else -1)


def load_findings(modules: Iterable[str] = FINDING_MODULES) -> None:
    """Import the modules that register findings (each registers itself at import)."""
    for m in modules:
        importlib.import_module(m)


def findings(select: Iterable[int | str] | None = None) -> list[Finding]:
    """Registered findings in number order; ``select`` keeps those named or numbered in it."""
    out = sorted(REGISTRY.values(), key=lambda f: _order(f.number))
    if select is None:
        return out
    want = {str(s) for s in select}
    unknown = want - {f.name for f in out} - {str(f.number) for f in out}
    if unknown:
        known = ", ".join(f"{f.number} ({f.name})" for f in out)
        raise ValueError(f"no finding named or numbered {sorted(unknown)}; registered: {known}")
    return [f for f in out if f.name in want or str(f.number) in want]


# ----------------------------------------------------------------------------- the findings
@finding(
    "four_bit_optimal",
    number=1,
    statement="4-bit is optimal for total model bits in nearly all families and sizes; "
    "3-bit reverses the trend.",
    test=f"Families with a scaling signal; main precision sweep, mean zero-shot accuracy, "
    f"interpolated in log2(total bits) on a grid of {N_GRID * 2 - 1} budgets per family. (a) At "
    f"each budget covered by the 4-bit curve and >= 1 other, 4-bit counts as optimal when it is "
    f"the best curve or its paired-bootstrap deficit to the best is not significant; holds when "
    f"this is so at >= {MIN_SHARE_4BIT:.0%} of budgets pooled over families, 4-bit is the best "
    f"point estimate at >= {MIN_SHARE_4BIT_BEST:.0%} of them (ties alone prove nothing) and >= "
    f"{MIN_BUDGETS} such budgets exist. (b) At budgets shared by 3- and 4-bit, 4-bit is higher "
    f"at >= {MIN_SHARE_3BIT_REVERSAL:.0%}.",
)
def four_bit_optimal(d: ClaimData, cl: Claim) -> None:
    fams = d.gate(cl)
    if not fams:
        return
    ok = total = rev_ok = rev_total = n_best = 0
    for fam in fams:
        mq = d.main_quants(fam)
        rc = d.rc(fam, ACCURACY_TARGET, mq.values())
        if 4 not in mq or mq[4] not in rc or len(rc) < 2:
            cl.evidence.append(f"{fam}: no 4-bit curve and another precision to compare")
            continue
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
        if 3 in mq and mq[3] in rc:
            g = np.array([vals[mq[4]][j] - vals[mq[3]][j] for j in range(len(grid))])
            g = g[~np.isnan(g)]
            rev_ok, rev_total = rev_ok + int((g > 0).sum()), rev_total + len(g)
            gb = d.gain_bits(fam, ACCURACY_TARGET, mq[4], mq[3])
            line += f"; 4-bit minus 3-bit at equal bits {gb} (higher at {(g > 0).sum()}/{len(g)})"
        cl.evidence.append(line)
    if total < MIN_BUDGETS:
        cl.evidence.append(
            f"{total} budgets where 4-bit and another precision overlap; need >= {MIN_BUDGETS}"
        )
        return
    parts = []
    share, best_share = ok / total, n_best / total
    parts.append(HOLDS if share >= MIN_SHARE_4BIT and best_share >= MIN_SHARE_4BIT_BEST else FAILS)
    cl.evidence.append(
        f"(a) pooled: 4-bit best or tied at {ok}/{total} = {share:.0%} of budgets, "
        f"strictly best at {n_best}/{total} = {best_share:.0%}"
    )
    if rev_total >= MIN_BUDGETS:
        share = rev_ok / rev_total
        parts.append(HOLDS if share >= MIN_SHARE_3BIT_REVERSAL else FAILS)
        cl.evidence.append(f"(b) 4-bit above 3-bit at {rev_ok}/{rev_total} = {share:.0%}")
    cl.verdict = _combine(parts)


@finding(
    "parallel_curves",
    number=2,
    statement="Curves for different precisions are nearly parallel (except 3-bit).",
    test="Families with a scaling signal: the OLS slope of mean accuracy on log2(total bits) of "
    "each main-sweep curve with >= 2 points, per bootstrap replicate. A curve of >= 4 bits is "
    "parallel to the reference (the highest precision) when the interval of the slope "
    f"difference contains 0 or the difference is <= {SLOPE_TOLERANCE:.0%} of the reference "
    f"slope; holds when >= {MIN_SHARE_PARALLEL:.0%} of curves are parallel. The fit comparison "
    "(shared base + offsets vs free interpolation) is context.",
)
def parallel_curves(d: ClaimData, cl: Claim) -> None:
    n_par = n_all = 0
    for fam in d.gate(cl):
        mq = d.main_quants(fam)
        rc = {p: d.rc(fam, ACCURACY_TARGET, [q]).get(q) for p, q in mq.items()}
        rc = {p: v for p, v in rc.items() if v is not None and len(v[0]) >= 2}
        if len(rc) < 2:
            cl.evidence.append(f"{fam}: fewer than 2 precision curves with >= 2 sizes")
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
        cl.evidence += fit_comparison(d.tables.get("fits"))


def _chance(d: ClaimData, model: str) -> float:
    """Chance accuracy of a model's tasks (the same for every quant of the model)."""
    s = d.all_scores
    rows = s[(s["model"] == model) & (s["target"] == ACCURACY_TARGET)]
    if "chance" not in rows:
        return float("nan")
    vals = rows["chance"].dropna()
    return float(vals.iloc[0]) if len(vals) else float("nan")


def _three_bit_runs(d: ClaimData, fam: str) -> tuple[str | None, pd.DataFrame]:
    """The family's main 3-bit quant and its runs, diverged ones included, smallest first."""
    q3 = d.main_quants(fam).get(3)
    div = d.diverged[d.diverged["family"] == fam]
    if q3 is None:
        three = div[div["bits"] == 3]
        if three.empty:
            return None, pd.DataFrame()
        q3 = str(sorted(three["quant"])[0])
    ok = d.curve(fam, ACCURACY_TARGET, q3)[["model", "n_params", "value"]].assign(diverged=False)
    bad = div[div["quant"] == q3][["model", "n_params"]].assign(value=np.nan, diverged=True)
    runs = pd.concat([ok, bad[~bad["model"].isin(ok["model"])]], ignore_index=True)
    return q3, runs.sort_values("n_params", kind="stable").reset_index(drop=True)


@finding(
    "three_bit_unstable",
    number=3,
    statement="3-bit OPT and Pythia become unstable at large sizes (near random accuracy).",
    test=f"For each OPT or Pythia family (by family name) with a scaling signal and >= 2 sizes "
    f"at 3 bits in the main sweep: the largest model is unstable when its 3-bit run diverged, "
    f"its 3-bit mean accuracy is within {NEAR_CHANCE} of chance (the mean over tasks of "
    f"1/choices, 0 for LAMBADA) or is significantly below the next smaller model's. Holds when "
    f"every such family is unstable.",
)
def three_bit_unstable(d: ClaimData, cl: Claim) -> None:
    named = [
        f for f in d.all_families(ACCURACY_TARGET) if any(k in f.lower() for k in UNSTABLE_FAMILIES)
    ]
    if not named:
        cl.evidence.append("no OPT or Pythia family in this run")
        return
    parts = []
    for fam in d.gate(cl, families=named):
        q3, runs = _three_bit_runs(d, fam)
        if q3 is None or len(runs) < 2:
            cl.evidence.append(f"{fam}: fewer than 2 model sizes at 3 bits")
            continue
        big, prev = runs.iloc[-1], runs.iloc[-2]
        if big["diverged"]:
            parts.append(HOLDS)
            cl.evidence.append(
                f"{fam}: 3-bit {big['model']} ({q3}) diverged -> unstable (a diverged run is "
                "the extreme of instability)"
            )
            continue
        chance = _chance(d, big["model"])
        near = big["value"] - chance <= NEAR_CHANCE
        line = (
            f"{fam}: largest {big['model']} 3-bit accuracy {big['value']:.4f} (chance {chance:.3f})"
        )
        drop = None
        if not prev["diverged"]:
            diff = d.reps(big["model"], q3, ACCURACY_TARGET, big["value"]) - d.reps(
                prev["model"], q3, ACCURACY_TARGET, prev["value"]
            )
            lo, hi = interval(diff)
            drop = Est(float(big["value"] - prev["value"]), float(lo), float(hi))
            line += f"; change from {prev['model']} {drop}"
        unstable = bool(near or (drop is not None and drop.significant_negative))
        parts.append(HOLDS if unstable else FAILS)
        cl.evidence.append(f"{line} -> {'unstable' if unstable else 'stable'}")
    if parts:
        cl.verdict = _combine(parts)


def _rtn(curves: pd.DataFrame) -> pd.DataFrame:
    """Round-to-nearest curves only (GPTQ runs are finding 11's)."""
    if "method" not in curves:
        return curves
    return curves[curves["method"].fillna("rtn") == "rtn"]


def _variant_gains(d: ClaimData, fams: list[str], vary: str, bits, mode: str = "bits"):
    """(family, bits, reference quant, other quant, gain) for every variation group."""
    out = []
    c = _rtn(d.curves)
    c = c[(c["target"] == ACCURACY_TARGET) & c["family"].isin(fams)]
    for g in variation_groups(c, vary, {"bits": list(bits)}):
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


@finding(
    "no_help_at_high_bits",
    number=4,
    statement="At 6-8 bits no data type or block size helps.",
    test="Families with a scaling signal. At each of 6, 7, 8 bits, every curve that differs "
    "from the main-sweep curve only in data type or block size is compared at equal total bits "
    f"(mean interpolated gain over the shared range). It helps when the gain is significantly "
    f"> 0 and > {PRACTICAL_GAIN}. Holds when no variant helps.",
)
def no_help_at_high_bits(d: ClaimData, cl: Claim) -> None:
    fams = d.gate(cl)
    parts = []
    for vary in ("dtype", "block_size"):
        for fam, b, ref, q, est in _variant_gains(d, fams, vary, (6, 7, 8)):
            helps = est.significant_positive and est.value > PRACTICAL_GAIN
            parts.append(FAILS if helps else HOLDS)
            cl.evidence.append(
                f"{fam} {b}-bit: {q} vs {ref}: gain {est}{' helps' if helps else ''}"
            )
    if fams and not parts:
        cl.evidence.append("no 6-8 bit curves varying only data type or block size")
    cl.verdict = _combine(parts)


@finding(
    "small_blocks_help",
    number=5,
    statement="Smaller blocks help below 6 bits: at 4 bits, B 1024 -> 64 (+0.24 bit) gains "
    "about as much as 4 -> 5 bits.",
    test="Families with a scaling signal. (a) At each precision below 6 bits with a block-size "
    "sweep, the smallest block's curve is significantly above the largest block's at equal "
    "total bits. (b) At 4 bits, the same-model gain of the smallest over the largest block "
    "divided by the same-model gain of the 5-bit over the 4-bit main curve lies in "
    f"{RATIO_RANGE}.",
)
def small_blocks_help(d: ClaimData, cl: Claim) -> None:
    fams = d.gate(cl)
    parts = []
    c = _rtn(d.curves)
    c = c[(c["target"] == ACCURACY_TARGET) & c["family"].isin(fams)]
    for g in variation_groups(c, "block_size", {"bits": [2, 3, 4, 5]}):
        fam, b = g["family"].iloc[0], int(g["bits"].iloc[0])
        bs = g.drop_duplicates("quant").assign(_b=lambda x: x["block_size"].fillna(np.inf))
        bs = bs.sort_values("_b")
        small, large = bs["quant"].iloc[0], bs["quant"].iloc[-1]
        est = d.gain_bits(fam, ACCURACY_TARGET, small, large)
        if est is None:
            continue
        parts.append(HOLDS if est.significant_positive else FAILS)
        cl.evidence.append(f"(a) {fam} {b}-bit: {small} over {large} at equal bits: {est}")
        mq = d.main_quants(fam)
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
    if fams and not parts:
        cl.evidence.append("no block-size sweep below 6 bits")
    cl.verdict = _combine(parts)


@finding(
    "data_type_ranking",
    number=6,
    statement="Quantile and float beat int and dynamic exponent (quantile best by perplexity); "
    "int beats float at 5 bits.",
    test="Families with a scaling signal; data-type sweeps (same block size) compared at equal "
    "total bits. (a) At 3-4 bits each of quantile and float is significantly above each of int "
    "and dynamic. (b) At 5 bits int is above float (point estimate). (c) With a perplexity "
    "task, quantile has the lowest perplexity of the data types at 3-4 bits.",
)
def data_type_ranking(d: ClaimData, cl: Claim) -> None:
    fams = d.gate(cl)
    parts = []
    c = _rtn(d.curves)
    acc = c[(c["target"] == ACCURACY_TARGET) & c["family"].isin(fams)]
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
            ppl = c[(c["target"] == d.ppl) & (c["family"] == fam)]
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
    if fams and not parts:
        cl.evidence.append("no data-type sweep at 3-5 bits")
    cl.verdict = _combine(parts)


def _mean_reps(d: ClaimData, g: pd.DataFrame, models: list[str]) -> tuple[float, np.ndarray]:
    """Mean accuracy of one curve over ``models`` and its replicates."""
    g = g[g["model"].isin(models)]
    r = [
        d.reps(m, q, ACCURACY_TARGET, v)
        for m, q, v in zip(g["model"], g["quant"], g["value"], strict=True)
    ]
    w = min(len(x) for x in r)
    return float(g["value"].mean()), np.mean([x[:w] for x in r], axis=0)


@finding(
    "float_exponent_bits",
    number=7,
    statement="Float exponent bits: best at >= ceil(k/2).",
    test="Families with a scaling signal. For each precision k with a float exponent-bit sweep "
    "(same bits, hence equal total bits), over the models every width was run on: the best "
    "width E >= ceil(k/2) against the best width below it, paired bootstrap of the mean "
    "accuracy difference. Holds when it is significantly positive, fails when significantly "
    "negative; with every width >= ceil(k/2) (or every one below), the best one is reported "
    "without a verdict.",
)
def float_exponent_bits(d: ClaimData, cl: Claim) -> None:
    fams = d.gate(cl)
    parts = []
    c = _rtn(d.curves)
    acc = c[(c["target"] == ACCURACY_TARGET) & c["family"].isin(fams)]
    for g in variation_groups(acc, "exponent_bits", {"dtype": "float"}):
        fam, k = g["family"].iloc[0], int(g["bits"].iloc[0])
        models = sorted(set.intersection(*[set(x["model"]) for _, x in g.groupby("quant")]))
        if not models:
            continue
        half = math.ceil(k / 2)
        by_e = {int(e): _mean_reps(d, ge, models) for e, ge in g.groupby("exponent_bits")}
        listing = ", ".join(f"E{e}={m:.4f}" for e, (m, _) in sorted(by_e.items()))
        hi = {e: v for e, v in by_e.items() if e >= half}
        lo = {e: v for e, v in by_e.items() if e < half}
        if not hi or not lo:
            cl.evidence.append(
                f"{fam} {k}-bit: mean accuracy by E {listing}; every width on one side of "
                f"ceil(k/2)={half}: nothing to compare"
            )
            continue
        e_hi = max(hi, key=lambda e: hi[e][0])
        e_lo = max(lo, key=lambda e: lo[e][0])
        w = min(len(hi[e_hi][1]), len(lo[e_lo][1]))
        low, high = interval(hi[e_hi][1][:w] - lo[e_lo][1][:w])
        est = Est(hi[e_hi][0] - lo[e_lo][0], float(low), float(high))
        part = HOLDS if est.significant_positive else FAILS if est.significant_negative else NA
        parts.append(part)
        cl.evidence.append(
            f"{fam} {k}-bit: mean accuracy by E {listing}; best E >= {half} (E{e_hi}) minus "
            f"best E < {half} (E{e_lo}): {est} over {len(models)} models"
            + ("" if part != NA else " (not significant)")
        )
    if fams and not parts:
        cl.evidence.append("no float exponent-bit sweep")
    cl.verdict = _combine(parts)


@finding(
    "proxy_stabilizes_3bit",
    number=8,
    statement="Proxy quantization stabilizes 3-bit but gives no gain at 4-bit.",
    test="Families with a scaling signal; curves that differ only in outlier_fraction (> 0 vs "
    "0), compared at equal total bits (the 16-bit outlier columns count). (a) At 3 bits the "
    "proxy curve is significantly above. (b) At 4 bits it is not both significantly above and "
    f"more than {PRACTICAL_GAIN} above.",
)
def proxy_stabilizes_3bit(d: ClaimData, cl: Claim) -> None:
    fams = d.gate(cl)
    parts = []
    for fam, b, ref, q, est in _variant_gains(d, fams, "outlier_fraction", (3, 4)):
        if b == 3:
            ok = est.significant_positive
        else:
            ok = not (est.significant_positive and est.value > PRACTICAL_GAIN)
        parts.append(HOLDS if ok else FAILS)
        cl.evidence.append(f"({'a' if b == 3 else 'b'}) {fam} {b}-bit: {q} over {ref}: {est}")
    if fams and not parts:
        cl.evidence.append("no 3- or 4-bit curves with and without proxy quantization")
    cl.verdict = _combine(parts)


@finding(
    "centering_never_helps",
    number=9,
    statement="Centering never helps.",
    test="Families with a scaling signal; curves that differ only in centering, same models "
    "(centering adds no bits worth counting): centered helps when its mean gain is "
    f"significantly > 0 and > {PRACTICAL_GAIN}. Holds when it never helps.",
)
def centering_never_helps(d: ClaimData, cl: Claim) -> None:
    fams = d.gate(cl)
    parts = []
    for fam, b, ref, q, est in _variant_gains(d, fams, "center", range(2, 9), mode="model"):
        centered = bool(d.curves.loc[d.curves["quant"] == q, "center"].iloc[0])
        c_q, other = (q, ref) if centered else (ref, q)
        if c_q != q:
            est = Est(-est.value, -est.high, -est.low)
        helps = est.significant_positive and est.value > PRACTICAL_GAIN
        parts.append(FAILS if helps else HOLDS)
        cl.evidence.append(f"{fam} {b}-bit: {c_q} over {other}: {est}")
    if fams and not parts:
        cl.evidence.append("no curves differing only in centering")
    cl.verdict = _combine(parts)


@finding(
    "perplexity_tracks_accuracy",
    number=10,
    statement="Perplexity and mean zero-shot accuracy correlate strongly (r = -0.94).",
    test="Families where both the corpus perplexity and mean zero-shot accuracy improve "
    "significantly with model size (otherwise neither varies beyond sampling noise and a "
    "correlation means nothing). Pearson r between them over every (model, quant) run of those "
    f"families with both, replicate-wise for the interval; holds when r <= {STRONG_R}.",
)
def perplexity_tracks_accuracy(d: ClaimData, cl: Claim) -> None:
    if d.ppl is None:
        cl.evidence.append("no perplexity task in this run")
        return
    fams = d.gate(cl, ACCURACY_TARGET)
    fams = d.gate(cl, d.ppl, fams) if fams else []
    if not fams:
        return
    s = d.scores[d.scores["family"].isin(fams)]
    a = s[s["target"] == ACCURACY_TARGET][["model", "quant", "value"]]
    p = s[s["target"] == d.ppl][["model", "quant", "value"]]
    m = a.merge(p, on=["model", "quant"], suffixes=("_a", "_p"))
    if len(m) < MIN_RUNS_R:
        cl.evidence.append(f"only {len(m)} runs have both metrics; need >= {MIN_RUNS_R}")
        return
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
        f"{len(m)} runs of {', '.join(fams)} (paper: -0.94 on Pile CommonCrawl)"
    )
    cl.verdict = HOLDS if r <= STRONG_R else FAILS


def gptq_target(d: ClaimData) -> str:
    """Finding 11's metric (:func:`kbit.analysis.curves.gptq_metric` over the scores)."""
    return gptq_metric(d.scores["target"], d.ppl)


def _spec_col(df: pd.DataFrame, col: str, default) -> pd.Series:
    return df[col].fillna(default) if col in df else pd.Series(default, index=df.index)


def _same_block(df: pd.DataFrame, b) -> pd.Series:
    return df["block_size"].isna() if pd.isna(b) else df["block_size"] == b


def _gptq_pairs(pts: pd.DataFrame) -> list[tuple[object, pd.DataFrame, pd.DataFrame]]:
    """(block size or NaN, 2-bit GPTQ rows, 3-bit float RTN rows) per block size with both."""
    method = _spec_col(pts, "method", "rtn")
    plain = (_spec_col(pts, "outlier_fraction", 0.0) == 0) & ~_spec_col(
        pts, "center", False
    ).astype(bool)
    gptq = pts[(method == "gptq") & (pts["bits"] == 2)]
    flt = pts[(method == "rtn") & (pts["bits"] == 3) & (pts["dtype"] == "float") & plain]
    out = []
    for b in sorted(gptq["block_size"].unique(), key=lambda v: (pd.isna(v), v)):
        g, f = gptq[_same_block(gptq, b)], flt[_same_block(flt, b)]
        if len(g) and len(f):
            out.append((b, g, f))
    return out


def _gain_scale(target: str) -> Callable[[np.ndarray], np.ndarray]:
    """Log for perplexities (a gain is then a log ratio), identity otherwise."""
    return np.log if "perplexity" in target else (lambda v: np.asarray(v, dtype=float))


def _paired_models(
    d: ClaimData, target: str, g: pd.DataFrame, f: pd.DataFrame
) -> tuple[pd.DataFrame, Est | None, str]:
    """Per-model values of GPTQ (first quant) and float (first quant) and the mean gain of
    GPTQ (positive = better; in log perplexity for perplexities, so models of every size
    weigh alike) with its interval: bootstrap replicates where every point has them, else a
    t interval over models (>= 2), else none."""
    qg, qf = sorted(g["quant"].unique())[0], sorted(f["quant"].unique())[0]
    m = g[g["quant"] == qg][["model", "n_params", "value"]].merge(
        f[f["quant"] == qf][["model", "value"]], on="model", suffixes=("_g", "_f")
    )
    m = m.sort_values("n_params")
    if m.empty:
        return m, None, "no model has both runs"
    sign = _sign(target)
    tf = _gain_scale(target)
    diffs = sign * (tf(m["value_g"].to_numpy(float)) - tf(m["value_f"].to_numpy(float)))
    est = float(np.mean(diffs))
    if d.has_reps(m["model"], qg, target) and d.has_reps(m["model"], qf, target):
        rg = [tf(d.reps(x, qg, target, 0.0)) for x in m["model"]]
        rf = [tf(d.reps(x, qf, target, 0.0)) for x in m["model"]]
        w = min(len(x) for x in rg + rf)
        reps = sign * np.mean([a[:w] - b[:w] for a, b in zip(rg, rf, strict=True)], axis=0)
        lo, hi = interval(reps)
        return m, Est(est, float(lo), float(hi)), "paired bootstrap"
    if len(m) >= 2:
        half = stats.t.ppf(0.975, len(m) - 1) * np.std(diffs, ddof=1) / math.sqrt(len(m))
        return m, Est(est, est - half, est + half), f"t interval over {len(m)} models"
    return m, None, "one model and no bootstrap replicates"


@finding(
    "gptq_needs_blocking",
    number=11,
    statement="GPTQ beats zero-shot methods at low bits only with blocking (WikiText-2: 2-bit "
    "GPTQ vs 3-bit float, B=1024: 11.84 vs 13.26; B=256: 10.00 vs 10.38; B=64: 9.18 vs 9.99).",
    test="Metric: WikiText-2 perplexity in the GPTQ convention (task wikitext2_gptq) when "
    "present, else WikiText word perplexity, else mean zero-shot accuracy. A same-model "
    "comparison (Table 1 is one model), so it needs no scaling signal, only a significant "
    "difference. For each block size with a 2-bit GPTQ run and a "
    "3-bit round-to-nearest float run of the same models, the mean same-model gain of GPTQ "
    "(in log perplexity for perplexities; paired bootstrap, or a t interval over models "
    "without replicates). Holds when GPTQ is "
    "significantly better at every finite block size and not significantly better per tensor; "
    "fails when it is significantly worse at a finite block size or significantly better per "
    "tensor. A model where exactly one of the two runs diverged counts for the other method "
    "(a breakdown needs no interval); where both diverged it decides nothing; a block size "
    "whose models point different ways is undecided.",
)
def gptq_needs_blocking(d: ClaimData, cl: Claim) -> None:
    target = gptq_target(d)
    s = d.all_scores[d.all_scores["target"] == target]
    gp = s[(_spec_col(s, "method", "rtn") == "gptq")]
    if gp.empty:
        cl.evidence.append(f"no GPTQ run with {target}")
        return
    bad = set(zip(d.diverged["model"], d.diverged["quant"], strict=True))
    parts = []
    for fam in sorted(gp["family"].unique()):
        pairs = _gptq_pairs(s[s["family"] == fam])
        if not pairs:
            cl.evidence.append(f"{fam}: no 2-bit GPTQ run with a matching 3-bit float run")
            continue
        for b, g, f in pairs:
            parts.append(_gptq_block_part(d, cl, target, fam, b, g, f, bad))
    if parts:
        cl.verdict = _combine_strict(parts)


def _gptq_block_part(d, cl, target, fam, b, g, f, bad) -> str:
    """Finding 11 at one block size: the paired gain over models where both runs are finite,
    and the models where exactly one of the two diverged (a diverged run is a breakdown, so the
    other method is better there without an interval). They must agree to decide."""
    blocked = not pd.isna(b)
    label = f"B={int(b)}" if blocked else "per tensor"
    qg, qf = sorted(g["quant"].unique())[0], sorted(f["quant"].unique())[0]
    g, f = g[g["quant"] == qg], f[f["quant"] == qf]
    div_g = {m for m in g["model"] if (m, qg) in bad}
    div_f = {m for m in f["model"] if (m, qf) in bad}
    both = set(g["model"]) & set(f["model"])
    worse, better, lost = both & (div_g - div_f), both & (div_f - div_g), both & div_g & div_f
    paper = PAPER_TABLE_1.get(int(b)) if blocked else None
    ref = f" (paper: {paper[0]:.2f} vs {paper[1]:.2f})" if paper else ""
    votes = []
    for models, how in (
        (worse, "GPTQ diverged, float did not"),
        (better, "float diverged, GPTQ did not"),
        (lost, "both diverged: decides nothing"),
    ):
        if not models:
            continue
        vals = "; ".join(
            f"{m} 2-bit GPTQ {_fmt_value(_value_of(g, m), target)} vs 3-bit float "
            f"{_fmt_value(_value_of(f, m), target)}"
            for m in sorted(models)
        )
        cl.evidence.append(f"{fam} {label} ({target}): {vals}{ref}; {how}")
        if models is not lost:
            gptq_better = models is better
            votes.append(
                (HOLDS if gptq_better else FAILS) if blocked else (FAILS if gptq_better else HOLDS)
            )
    finite = both - div_g - div_f
    if finite:
        m, est, how = _paired_models(
            d, target, g[g["model"].isin(finite)], f[f["model"].isin(finite)]
        )
        values = "; ".join(
            f"{r.model} 2-bit GPTQ {_fmt_value(r.value_g, target)} vs 3-bit float "
            f"{_fmt_value(r.value_f, target)}"
            for r in m.itertuples()
        )
        if est is None:
            cl.evidence.append(f"{fam} {label}: {values}{ref}; no interval ({how})")
        else:
            if blocked:
                part = (
                    HOLDS if est.significant_positive else FAILS if est.significant_negative else NA
                )
            else:
                part = FAILS if est.significant_positive else HOLDS
            unit = " in log perplexity" if "perplexity" in target else ""
            cl.evidence.append(
                f"{fam} {label} ({target}): {values}{ref}; GPTQ gain{unit} (positive = better) "
                f"{est} ({how})" + (" not significant" if part == NA else "")
            )
            votes.append(part)
    if not votes:
        return NA
    if len(set(votes)) > 1:
        cl.evidence.append(f"{fam} {label}: the models disagree ({', '.join(votes)}): undecided")
        return NA
    return votes[0]


def _fmt_value(v: float, target: str) -> str:
    """Perplexities with two decimals (``9.18``; ``6.03e+06`` for a breakdown), accuracies four."""
    if not _lower(target):
        return f"{v:.4f}"
    return f"{v:.2f}" if abs(v) < 1e5 else f"{v:.3g}"


def _value_of(rows: pd.DataFrame, model: str) -> float:
    return float(pd.to_numeric(rows.loc[rows["model"] == model, "value"]).iloc[0])


# ----------------------------------------------------------------------------- running
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


def signal_table(d: ClaimData) -> pd.DataFrame:
    """Every family's scaling signal in accuracy and in the perplexity target (if any)."""
    rows = []
    for target in [t for t in (ACCURACY_TARGET, d.ppl) if t]:
        for fam in d.all_families(target):
            s = d.signal(fam, target)
            rows.append(
                {
                    "family": fam,
                    "target": target,
                    "curve": s.curve,
                    "n_models": s.n_models,
                    "slope": np.nan if s.slope is None else s.slope.value,
                    "ci_low": np.nan if s.slope is None else s.slope.low,
                    "ci_high": np.nan if s.slope is None else s.slope.high,
                    "signal": s.ok,
                    "reason": s.reason,
                }
            )
    return pd.DataFrame(rows)


def check_claims(
    scores: pd.DataFrame,
    laws: Mapping[str, pd.DataFrame] | str | Path | None,
    boot: pd.DataFrame | None,
    select: Iterable[int | str] | None = None,
) -> Claims:
    """Test the registered findings (or those ``select`` names or numbers) on ``scores`` with
    the fit step's tables (``laws``: a mapping or directory; curves are built from the scores
    when absent) and the bootstrap table.

    Every table of a ``laws`` mapping reaches the findings as ``ClaimData.tables``, so a
    finding of another module can bring its own (e.g. ``{**laws, "mixed": mixed_table}``).
    """
    tables = load_laws(laws)
    curves = tables.get("curves")
    if curves is None or curves.empty:
        curves = build_curves(scores)
    if len(curves):
        curves = complete_spec_fields(curves)
    d = ClaimData(scores, curves, boot if boot is not None else tables.get("bootstrap"), tables)
    out = Claims(f.run(d) for f in findings(select))
    note = (
        "excluded from every curve (diverged): "
        + ", ".join(describe_run(r) for r in d.diverged.to_dict("records"))
        if len(d.diverged)
        else None
    )
    for cl in out:
        if note:
            cl.evidence.append(note)
        if d.points is None:
            cl.evidence.append("no bootstrap table: intervals collapse to the point estimates")
    out.signals = signal_table(d)
    out.diverged = d.diverged
    return out


def render_claims(claims: list[Claim]) -> str:
    """``claims.md``: a summary table, each family's scaling signal, the diverged runs, then
    each finding's test and evidence."""
    lines = [
        "# The paper's findings on this run",
        "",
        "Intervals are 95% paired document-bootstrap percentile intervals; gains are "
        "positive when the first configuration is better. A finding comparing precisions or "
        "configurations needs a scaling signal: the family's accuracy (or perplexity) must "
        "improve significantly with model size.",
        "",
        "| # | finding | name | verdict |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {c.number} | {c.statement} | {f'`{c.name}`' if c.name else ''} | **{c.verdict}** |"
        for c in claims
    ]
    signals = getattr(claims, "signals", None)
    if signals is not None and len(signals):
        lines += ["", "## Scaling signal per family", ""]
        lines += ["| family | target | curve | sizes | slope per doubling [95% CI] | signal |"]
        lines += ["|---|---|---|---|---|---|"]
        for r in signals.itertuples():
            slope = (
                "" if pd.isna(r.slope) else f"{r.slope:+.4f} [{r.ci_low:+.4f}, {r.ci_high:+.4f}]"
            )
            lines.append(
                f"| {r.family} | {r.target} | {r.curve} | {r.n_models} | {slope} | "
                f"{'yes' if r.signal else 'no'} |"
            )
    diverged = getattr(claims, "diverged", None)
    if diverged is not None and len(diverged):
        lines += ["", "## Diverged runs", "", "| run | family | why |", "|---|---|---|"]
        lines += [
            f"| {describe_run(r)} | {r['family']} | {r['reason']} |"
            for r in diverged.to_dict("records")
        ]
    for c in claims:
        lines += [
            "",
            f"## Finding {c.number}: {c.verdict}",
            "",
            f"`{c.name}`: {c.statement}" if c.name else c.statement,
            "",
            f"*Test.* {c.test}",
            "",
        ]
        lines += [f"- {e}" for e in c.evidence] or ["- no data for this test"]
    return "\n".join(lines) + "\n"
