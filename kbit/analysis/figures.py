"""The paper's figures regenerated from this run's tables.

Every figure selects its curves by spec fields (e.g. block sizes: 4-bit curves equal in every
field but ``block_size``), never by names. A figure whose data the run did not produce is not
drawn: it is listed in ``SKIPPED.md`` (and ``SKIPPED.html``) with the data it needs. Each
figure is written as PNG and PDF; ``index.md`` lists every figure with its caption.

Readability rules every figure follows: the bits axis is labelled in bytes (total bits / 8) at
readable sizes (``64 MiB``, ``1 GiB``), never at fractional powers of two; perplexity axes carry
plain numbers; legends sit outside the axes, so they never hide points or error bars; each
precision has one colour, marker and line style everywhere (:mod:`kbit.analysis.style`).
A diverged run (flagged ``diverged`` in the scores, or a value that is not finite) is never
part of a curve: it is drawn as an unconnected cross at its total bits, at its measured value
or, when that is not finite, at the axis edge.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import stats

from kbit.analysis import style
from kbit.analysis.curves import (
    ACCURACY_TARGET,
    build_curves,
    curve_label,
    gptq_metric,
    perplexity_target,
    variation_groups,
)
from kbit.analysis.tables import lower_is_better
from kbit.io import atomic_write, write_text

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure as MplFigure

LAW_TABLES = ("curves", "fits", "optimal", "bootstrap")
X_LABEL = "model size: total bits / 8 (log scale)"
DIVERGED_LABEL = "diverged run (in no curve)"
#: binary byte units for the size axis
BYTE_UNITS = ((2.0**40, "TiB"), (2.0**30, "GiB"), (2.0**20, "MiB"), (2.0**10, "KiB"), (1.0, "B"))
#: the perplexity a divergence is described by, first found of these
PERPLEXITY_SHOWN = ("word_perplexity", "perplexity", "byte_perplexity")
#: spec fields as words, for titles
FIELD_NAMES = {"dtype": "data type", "block_size": "block size", "exponent_bits": "exponent bits"}
#: round numbers for ticks of a narrow size axis, coarsest first (times powers of ten)
NICE_SERIES = ((1, 2, 5), (1, 2, 3, 4, 5, 6, 8), (1, 2, 3, 4, 5, 6, 7, 8, 9))
#: at most this many labelled ticks on a size axis
MAX_SIZE_TICKS = 6
#: tick-label characters that fit side by side along the narrowest size axis drawn (4.4 in)
AXIS_LABEL_CHARS = 40


class Skip(Exception):
    """A figure cannot be drawn: the message says which data it needs."""


@dataclass
class Figure:
    """A written figure: its name, caption and files."""

    name: str
    caption: str
    paths: list[Path]


def load_laws(laws: Mapping[str, pd.DataFrame] | str | Path | None) -> dict[str, pd.DataFrame]:
    """The law tables as a dict, from a mapping or a directory of ``{name}.parquet`` files."""
    if laws is None:
        return {}
    if isinstance(laws, Mapping):
        return {k: v for k, v in laws.items() if v is not None}
    root = Path(laws)
    return {
        n: pd.read_parquet(root / f"{n}.parquet")
        for n in LAW_TABLES
        if (root / f"{n}.parquet").exists()
    }


# ----------------------------------------------------------------------------- diverged runs
def diverged_runs(scores: pd.DataFrame) -> pd.DataFrame:
    """One row per diverged (model, quant) run: flagged ``diverged`` or with a non-finite value.

    Columns: family, model, n_params, quant, bits, precision (16 for the baseline), reason.
    A diverged run is a result (the quantized model broke down), so it is listed, never averaged.
    """
    cols = ["family", "model", "n_params", "quant", "bits", "precision", "reason"]
    if scores is None or scores.empty:
        return pd.DataFrame(columns=cols)
    values = pd.to_numeric(scores["value"], errors="coerce").to_numpy(float)
    flagged = (
        scores["diverged"].fillna(False).astype(bool).to_numpy()
        if "diverged" in scores
        else np.zeros(len(scores), dtype=bool)
    )
    bad = scores.assign(_flag=flagged, _nonfinite=~np.isfinite(values))
    bad = bad[bad["_flag"] | bad["_nonfinite"]]
    rows = []
    for (model, quant), g in bad.groupby(["model", "quant"], sort=True):
        first = g.iloc[0]
        bits = first.get("bits", np.nan)
        rows.append(
            {
                "family": first.get("family"),
                "model": model,
                "n_params": first.get("n_params", np.nan),
                "quant": quant,
                "bits": bits,
                "precision": 16 if first.get("dtype") == "fp16" else bits,
                "reason": _divergence_reason(g),
            }
        )
    return pd.DataFrame(rows, columns=cols)


def _divergence_reason(g: pd.DataFrame) -> str:
    """Which tasks diverged and how, compactly: documents with non-finite log-likelihoods,
    the task's perplexity, or "values not finite"."""
    tasks = g[g["task"] != "mean_zeroshot"] if "task" in g else g.iloc[:0]
    if tasks.empty:
        return "diverged: " + ", ".join(sorted(map(str, g["target"].unique())))
    parts = []
    for task, t in tasks.groupby("task", sort=True):
        what = []
        n_bad = int(t["n_nonfinite"].max()) if "n_nonfinite" in t else 0
        if n_bad > 0:
            what.append(f"{n_bad} documents with non-finite log-likelihoods")
        values = dict(zip(t["metric"], pd.to_numeric(t["value"], errors="coerce"), strict=True))
        ppl = next((m for m in PERPLEXITY_SHOWN if m in values), None)
        if ppl is not None:
            what.append(f"{ppl} {values[ppl]:.3g}")
        elif not all(np.isfinite(v) for v in values.values()):
            what.append("values not finite")
        parts.append(f"{task}" + (f" ({', '.join(what)})" if what else ""))
    return "diverged: " + "; ".join(parts)


def with_diverged_points(curves: pd.DataFrame, scores: pd.DataFrame | None) -> pd.DataFrame:
    """``curves`` with a bool column ``diverged`` and a row for each diverged run's point of the
    curves' targets (the fit step leaves those out), placed in the main sweep when the run's
    spec matches the family's main sweep. Values of diverged points are as measured."""
    curves = mark_diverged(curves, scores)
    runs = diverged_runs(scores) if scores is not None else pd.DataFrame()
    if curves.empty or runs.empty:
        return curves
    keys = set(zip(runs["model"], runs["quant"], strict=True))
    s = scores[scores["target"].isin(set(curves["target"]))]
    s = s[[(m, q) in keys for m, q in zip(s["model"], s["quant"], strict=True)]]
    have = set(zip(curves["model"], curves["quant"], curves["target"], strict=True))
    s = s[[k not in have for k in zip(s["model"], s["quant"], s["target"], strict=True)]]
    if s.empty:
        return curves
    add = s[[c for c in curves.columns if c in s.columns]].copy()
    add["log2_bits"] = np.log2(add["total_bits"].astype(float))
    add["precision"] = np.where(add["dtype"] == "fp16", 16, add["bits"]).astype(int)
    add["lower_is_better"] = add["target"].map(lower_is_better)
    add["main_sweep"] = [_in_main_sweep(curves, r) for r in add.to_dict("records")]
    add["diverged"] = True
    return pd.concat([curves, add], ignore_index=True)


def _in_main_sweep(curves: pd.DataFrame, row: Mapping) -> bool:
    """Whether a point's quant is, or matches the spec fields of, the family's main sweep."""
    from kbit.analysis.curves import SWEEP_FIXED

    fam = curves[(curves["family"] == row["family"]) & (curves["target"] == row["target"])]
    main = fam[fam["main_sweep"].astype(bool)]
    if row["quant"] in set(main["quant"]):
        return True
    if main.empty or row.get("dtype") == "fp16":
        return row.get("dtype") == "fp16" and not main.empty
    ref = main[main["dtype"] != "fp16"]
    if ref.empty:
        return False
    r0 = ref.iloc[0]
    same = [
        (pd.isna(r0[f]) and pd.isna(row.get(f))) or r0[f] == row.get(f)
        for f in SWEEP_FIXED
        if f in ref.columns
    ]
    return all(same) and int(row["bits"]) not in set(ref["bits"].astype(int))


def mark_diverged(points: pd.DataFrame, scores: pd.DataFrame | None = None) -> pd.DataFrame:
    """``points`` with a bool column ``diverged``: the run diverged (see :func:`diverged_runs`)
    or this point's value is not finite."""
    if points.empty:
        return points.assign(diverged=pd.Series(dtype=bool))
    values = pd.to_numeric(points["value"], errors="coerce").to_numpy(float)
    out = ~np.isfinite(values)
    if "diverged" in points:
        out |= points["diverged"].fillna(False).astype(bool).to_numpy()
    if scores is not None and not scores.empty:
        runs = diverged_runs(scores)
        keys = set(zip(runs["model"], runs["quant"], strict=True))
        out |= np.array(
            [(m, q) in keys for m, q in zip(points["model"], points["quant"], strict=True)],
            dtype=bool,
        )
    return points.assign(diverged=out)


def complete_spec_fields(curves: pd.DataFrame) -> pd.DataFrame:
    """``curves`` with every spec field of :data:`kbit.analysis.curves.SPEC_FIELDS` as a
    column: a table written before a field existed gets it as missing (the field's "unset")."""
    from kbit.analysis.curves import SPEC_FIELDS

    missing = [f for f in SPEC_FIELDS if f not in curves.columns]
    return curves.assign(**dict.fromkeys(missing)) if missing else curves


def describe_run(row: Mapping) -> str:
    """``3-bit pythia-1.4b (float3-e2-b64)``: a run named for a reader."""
    p = row.get("precision", row.get("bits"))
    prec = "16-bit" if row.get("quant") == "fp16" else f"{int(p)}-bit" if pd.notna(p) else ""
    return f"{prec} {row['model']} ({row['quant']})".strip()


# ----------------------------------------------------------------------------- axes
def y_label(target: str) -> str:
    """Axis label with units for a target."""
    task, metric = target.split(":", 1)
    if task == "mean_zeroshot":
        return f"mean zero-shot accuracy ({metric}, fraction)"
    names = {
        "word_perplexity": "word perplexity",
        "bits_per_byte": "bits per byte",
        "byte_perplexity": "byte perplexity",
        "perplexity": "perplexity",
    }
    corpus = {"wikitext": "WikiText-2", "wikitext2_gptq": "WikiText-2 (GPTQ protocol)"}.get(
        task, task
    )
    return f"{corpus} {names.get(metric, metric)} (lower is better)"


def format_bytes(n_bytes: float) -> str:
    """``64 MiB``, ``1.5 GiB``: a size in binary units with at most three significant digits."""
    for scale, unit in BYTE_UNITS:
        if n_bytes >= scale or unit == "B":
            return f"{n_bytes / scale:.3g} {unit}"
    raise AssertionError("unreachable")


def size_ticks(lo_bits: float, hi_bits: float) -> tuple[np.ndarray, np.ndarray]:
    """Major and minor tick positions (in bits) for a size axis spanning ``[lo, hi]`` bits.

    Majors sit at whole powers of two bytes, thinned to at most ``MAX_SIZE_TICKS`` (the rest
    become minor ticks). A range holding fewer than three powers of two gets round sizes
    instead (``4 MiB, 5 MiB, 6 MiB``; ``800 MiB, 1 GiB, 2 GiB``): whole numbers of a unit from
    the coarsest of the series 1-2-5, 1-2-3-4-5-6-8 and 1..9 (times 1, 10, 100) that gives
    three ticks whose labels do not touch (``AXIS_LABEL_CHARS``); the powers of two inside
    stay as minor ticks.
    """
    lo, hi = math.log2(lo_bits / 8), math.log2(hi_bits / 8)
    whole = np.arange(math.ceil(lo - 1e-9), math.floor(hi + 1e-9) + 1)
    if len(whole) >= 3:
        step = math.ceil(len(whole) / MAX_SIZE_TICKS)
        major = whole[whole % step == 0]
        minor = whole[whole % step != 0]
        return 8 * 2.0**major, 8 * 2.0**minor
    lo_b, hi_b = 2.0**lo * (1 - 1e-9), 2.0**hi * (1 + 1e-9)
    per_char = (hi - lo) / AXIS_LABEL_CHARS  # log2 width of one character of a label
    for series in NICE_SERIES:
        inside = sorted(v for v in _round_sizes(series) if lo_b <= v <= hi_b)
        kept: list[float] = []
        for v in inside:  # 80 MiB next to 100 MiB on a 78-270 MiB axis: drop the second
            chars = (len(format_bytes(v)) + len(format_bytes(kept[-1])) if kept else 0) / 2 + 1
            if not kept or math.log2(v / kept[-1]) >= chars * per_char:
                kept.append(v)
        if len(kept) >= 3:
            return 8 * np.array(kept), 8 * 2.0**whole
    # narrower still: three evenly spaced sizes, rounded to two digits of their unit
    unit = next(scale for scale, _ in BYTE_UNITS if lo_b >= scale or scale == 1.0)
    mid = np.exp2(np.linspace(lo, hi, 3))
    return 8 * unit * np.array([float(f"{v / unit:.2g}") for v in mid]), np.array([])


def _round_sizes(series) -> Iterator[float]:
    """Sizes in bytes that read as a whole number of one unit: ``m * 10^d`` units, 1..999."""
    for scale, _ in BYTE_UNITS:
        for d in range(3):
            for m in series:
                yield m * 10.0**d * scale


def size_axis(ax: Axes, axis: str = "x") -> None:
    """Label a log-scaled total-bits axis in bytes at readable sizes (see :func:`size_ticks`)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    a = ax.xaxis if axis == "x" else ax.yaxis
    lo, hi = sorted(ax.get_xlim() if axis == "x" else ax.get_ylim())
    major, minor = size_ticks(lo, hi)
    a.set_major_locator(FixedLocator(major))
    a.set_minor_locator(FixedLocator(minor))
    a.set_major_formatter(FuncFormatter(lambda v, _: format_bytes(v / 8)))
    a.set_minor_formatter(NullFormatter())
    ax.grid(True, which="minor", axis=axis, lw=0.5, alpha=0.4)  # the unlabelled sizes


def plain_log_axis(ax: Axes, axis: str = "y") -> None:
    """Plain numbers (``20``, ``50``, ``100``) on a log axis, at least three labelled ticks:
    powers of ten, else 1-2-5 or 1-1.5-2-3-5-7 times them, else evenly spaced round values
    (matplotlib's log locator falls back to dense linear ticks on narrow ranges)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    a = ax.yaxis if axis == "y" else ax.xaxis
    lo, hi = sorted(ax.get_ylim() if axis == "y" else ax.get_xlim())
    decades = range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
    for subs in ((1.0,), (1.0, 2.0, 5.0), (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)):
        ticks = [m * 10.0**d for d in decades for m in subs if lo <= m * 10.0**d <= hi]
        if len(ticks) >= 3:
            break
    else:
        ticks = list(linear_ticks(lo, hi))
    a.set_major_locator(FixedLocator(ticks))
    a.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    a.set_minor_formatter(NullFormatter())


def linear_ticks(lo: float, hi: float, at_least: int = 3) -> np.ndarray:
    """Evenly spaced round ticks inside ``[lo, hi]``: the largest step of 1, 2, 2.5 or 5 times
    a power of ten that leaves ``at_least`` of them (for a log axis spanning a narrow range)."""
    span = hi - lo
    if not span > 0:
        return np.array([lo])
    top = 10.0 ** math.ceil(math.log10(span))
    for step in sorted({m * top / 10**k for k in range(4) for m in (1, 2, 2.5, 5)}, reverse=True):
        ticks = np.arange(math.ceil(lo / step) * step, hi + step * 1e-9, step)
        if len(ticks) >= at_least:
            return ticks
    return np.linspace(lo, hi, at_least)


def _pad_log_limits(ax: Axes, values: np.ndarray, axis: str = "x", pad: float = 0.04) -> None:
    """Limits of a log axis: the values' range widened by ``pad`` of its log span each side."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    if not len(v):
        return
    lo, hi = np.log2(v.min()), np.log2(v.max())
    span = max(hi - lo, 0.25)
    lim = (2 ** (lo - pad * span), 2 ** (hi + pad * span))
    (ax.set_xlim if axis == "x" else ax.set_ylim)(*lim)


def legend_outside(ax: Axes, handles=None, labels=None, title: str | None = None) -> None:
    """The axes' legend to the right of it, outside the data area."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(
            handles,
            labels,
            title=title,
            loc="upper left",
            bbox_to_anchor=(1.02, 1.0),
            borderaxespad=0.0,
        )


def figure_legend(fig: MplFigure, handles, labels, title: str | None = None) -> None:
    """One legend for every panel, outside the panels on the right."""
    if handles:
        fig.legend(handles, labels, title=title, loc="outside right upper")


def precision_handles(precisions) -> tuple[list, list[str]]:
    """Legend entries (line + marker) for the given precisions, lowest first, baseline last."""
    from matplotlib.lines import Line2D

    ps = sorted({int(p) for p in precisions})
    handles = [Line2D([], [], lw=1.4, ms=5, **style.precision_style(p)) for p in ps]
    return handles, ["16-bit baseline" if p == 16 else f"{p}-bit" for p in ps]


def _diverged_handle():
    from matplotlib.lines import Line2D

    return Line2D([], [], marker="x", linestyle="none", color="0.25", ms=6)


def _with_ci(curves: pd.DataFrame, boot: pd.DataFrame | None) -> pd.DataFrame:
    if boot is None or boot.empty or "kind" not in boot:
        return curves.assign(ci_low=np.nan, ci_high=np.nan)
    pts = boot.loc[boot["kind"] == "point", ["model", "quant", "target", "ci_low", "ci_high"]]
    return curves.merge(pts, on=["model", "quant", "target"], how="left")


def _draw(
    ax: Axes,
    pts: pd.DataFrame,
    by: str,
    label: Callable,
    styles: Mapping,
    order=None,
    lower_is_better: bool = False,
) -> int:
    """One line per value of ``by`` with bootstrap error bars on a log2 total-bits axis.

    Diverged points are crosses, unconnected (see :func:`_diverged_marks`). Returns how many
    diverged points were drawn.
    """
    keys = order or sorted(pts[by].unique(), key=lambda v: (pd.isna(v), v))
    n_diverged = 0
    clean = pts[~pts["diverged"]] if "diverged" in pts else pts
    y_max = float(pd.to_numeric(clean["value"], errors="coerce").max()) if len(clean) else np.nan
    for i, k in enumerate(keys):
        g = pts[pts[by] == k] if not pd.isna(k) else pts[pts[by].isna()]
        if g.empty:
            continue
        st = {"marker": style.MARKERS[i % len(style.MARKERS)], **styles.get(k, {})}
        bad = g[g["diverged"]] if "diverged" in g else g.iloc[:0]
        ok = g.drop(bad.index).sort_values("total_bits")
        if len(ok):
            y = ok["value"].to_numpy(float)
            err = None
            if ok["ci_low"].notna().all():
                err = np.vstack(
                    [y - ok["ci_low"].to_numpy(float), ok["ci_high"].to_numpy(float) - y]
                )
                err = np.clip(np.nan_to_num(err, nan=0.0), 0, None)
            ax.errorbar(
                ok["total_bits"], y, yerr=err, ms=4, lw=1.4, capsize=2, label=label(g.iloc[0]), **st
            )
        if len(bad):
            n_diverged += len(bad)
            _diverged_marks(ax, bad, st.get("color", "0.25"), lower_is_better, y_max)
    ax.set_xscale("log", base=2)
    _pad_log_limits(ax, pts["total_bits"].to_numpy(float))
    ax.set_xlabel(X_LABEL)
    return n_diverged


def _diverged_marks(
    ax: Axes, bad: pd.DataFrame, color, lower_is_better: bool, y_max: float
) -> None:
    """Crosses for diverged points: at the measured value when it is finite and within the
    axis' range of the curves, else at the bottom edge (top for lower-is-better metrics)."""
    kw = {"marker": "x", "ms": 7, "mew": 1.6, "linestyle": "none", "color": color, "zorder": 5}
    y = pd.to_numeric(bad["value"], errors="coerce").to_numpy(float)
    finite = np.isfinite(y)
    if lower_is_better and np.isfinite(y_max):  # far beyond the curves: the edge instead
        finite &= y <= 2 * y_max
    if finite.any():
        ax.plot(bad["total_bits"].to_numpy(float)[finite], y[finite], **kw)
    if (~finite).any():
        edge = 0.97 if lower_is_better else 0.03
        ax.plot(
            bad["total_bits"].to_numpy(float)[~finite],
            np.full(int((~finite).sum()), edge),
            transform=ax.get_xaxis_transform(),
            clip_on=False,
            **kw,
        )


def _precision_styles(pts: pd.DataFrame) -> dict:
    return {p: style.precision_style(p) for p in pts["precision"].unique()}


def _main(c: pd.DataFrame, target: str) -> pd.DataFrame:
    return c[(c["target"] == target) & c["main_sweep"]]


def _skip(what: str):
    raise Skip(what)


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise Skip(what)


def _finish(ax: Axes, target: str) -> None:
    """Y label with units (log scale with plain numbers for perplexities), size ticks on x."""
    if "perplexity" in target:
        ax.set_yscale("log")
        plain_log_axis(ax, "y")
    ax.set_ylabel(y_label(target))
    size_axis(ax, "x")


def _subplots(n: int, ncols: int = 3, w: float = 4.4, h: float = 3.6):
    import matplotlib.pyplot as plt

    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(w * ncols, h * nrows), squeeze=False, layout="constrained"
    )
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    return fig, list(axes.ravel()[:n])


# ----------------------------------------------------------------------------- figure builders
def _largest_family(main: pd.DataFrame) -> str:
    counts = main.groupby("family")["model"].nunique()
    return str(counts.sort_values(ascending=False, kind="stable").index[0])


def _precision_legend(fig, axes, pts: pd.DataFrame, n_diverged: int) -> None:
    handles, labels = precision_handles(pts["precision"].unique())
    if n_diverged:
        handles.append(_diverged_handle())
        labels.append(DIVERGED_LABEL)
    if len(axes) == 1:
        legend_outside(axes[0], handles, labels, title="precision")
    else:
        figure_legend(fig, handles, labels, title="precision")


def fig_precision_one(c: pd.DataFrame, target: str) -> MplFigure:
    main = _main(c, target)
    _need(
        not main.empty and main["quant"].nunique() >= 2,
        f"a precision sweep (>= 2 bit widths of one data type and block size) on {target}",
    )
    fam = _largest_family(main)
    fig, (ax,) = _subplots(1, w=6.4, h=4.4)
    pts = main[main["family"] == fam]
    lower = lower_is_better(target)
    n_div = _draw(ax, pts, "precision", curve_label, _precision_styles(pts), lower_is_better=lower)
    ax.set_title(f"{fam}: bit-level scaling")
    _finish(ax, target)
    _precision_legend(fig, [ax], pts, n_div)
    return fig


def fig_precision_all(c: pd.DataFrame, target: str) -> MplFigure:
    main = _main(c, target)
    _need(
        not main.empty and main["quant"].nunique() >= 2,
        f"a precision sweep (>= 2 bit widths) on {target}",
    )
    fams = sorted(main["family"].unique())
    fig, axes = _subplots(len(fams))
    n_div = 0
    lower = lower_is_better(target)
    for ax, fam in zip(axes, fams, strict=True):
        pts = main[main["family"] == fam]
        n_div += _draw(
            ax, pts, "precision", curve_label, _precision_styles(pts), lower_is_better=lower
        )
        ax.set_title(fam)
        _finish(ax, target)
    _precision_legend(fig, axes, main, n_div)
    return fig


def _variation_panels(c, target, vary, require, what, title_fn, panels_by="bits", family=None):
    cc = c[c["target"] == target]
    if family is not None:
        cc = cc[cc["family"] == family]
    groups = variation_groups(cc, vary, require)
    # one panel per (family, panel key): the largest group wins
    seen, panels = set(), []
    for g in groups:
        key = (g["family"].iloc[0], g[panels_by].iloc[0])
        if key not in seen:
            seen.add(key)
            panels.append(g)
    _need(bool(panels), what)
    panels.sort(key=lambda g: (g["family"].iloc[0], g[panels_by].iloc[0]))
    return _panels(panels, target, lambda g: vary, lambda r, v: title_fn(r))


def _panels(panels: list[pd.DataFrame], target: str, vary_of: Callable, title_fn) -> MplFigure:
    """One panel per group of curves, each with its own legend outside on the right."""
    fig, axes = _subplots(len(panels), w=5.6)
    for ax, g in zip(axes, panels, strict=True):
        vary = vary_of(g)
        vals = sorted(g[vary].unique(), key=lambda v: (pd.isna(v), v))
        colors = dict(zip(vals, style.series_colors(len(vals)), strict=True))
        styles = {v: {"color": colors[v]} for v in vals}
        n_div = _draw(
            ax,
            g,
            vary,
            lambda r, v=vary: curve_label(r, v),
            styles,
            order=vals,
            lower_is_better=lower_is_better(target),
        )
        ax.set_title(title_fn(g.iloc[0], vary))
        _finish(ax, target)
        handles, labels = ax.get_legend_handles_labels()
        if n_div:
            handles, labels = [*handles, _diverged_handle()], [*labels, DIVERGED_LABEL]
        legend_outside(ax, handles, labels)
    return fig


def fig_block_size(
    c: pd.DataFrame, target: str, bits: int = 4, family: str | None = None
) -> MplFigure:
    return _variation_panels(
        c,
        target,
        "block_size",
        {"bits": bits},
        f"{bits}-bit curves equal in every spec field but block_size (>= 2 block sizes)",
        lambda r: f"{r['family']}: {bits}-bit {r['dtype']}, block sizes",
        family=family,
    )


def fig_data_type(
    c: pd.DataFrame, target: str, bits: int = 4, family: str | None = None
) -> MplFigure:
    return _variation_panels(
        c,
        target,
        "dtype",
        {"bits": bits},
        f"{bits}-bit curves equal in every spec field but dtype (>= 2 data types)",
        lambda r: f"{r['family']}: {bits}-bit data types",
        family=family,
    )


def fig_appendix(c: pd.DataFrame, target: str, vary: str, family: str) -> MplFigure:
    what = {"block_size": "block sizes", "dtype": "data types"}[vary]
    return _variation_panels(
        c,
        target,
        vary,
        None,
        f"curves of family {family} equal in every spec field but {vary}",
        lambda r: f"{family}: {int(r['bits'])}-bit {what}",
        family=family,
    )


def fig_null_6bit(c: pd.DataFrame, target: str) -> MplFigure:
    cc = c[c["target"] == target]
    groups = (
        variation_groups(cc, "dtype", {"bits": 6})[:1]
        + variation_groups(cc, "block_size", {"bits": 6})[:1]
    )
    _need(bool(groups), "6-bit curves varying dtype or block_size (the 6-bit null result)")

    def vary_of(g):
        return "dtype" if g["dtype"].nunique() > 1 else "block_size"

    return _panels(
        groups,
        target,
        vary_of,
        lambda r, v: f"{r['family']}: 6-bit, varying {FIELD_NAMES.get(v, v)}",
    )


def fig_exponent(c: pd.DataFrame, target: str) -> MplFigure:
    return _variation_panels(
        c,
        target,
        "exponent_bits",
        {"dtype": "float"},
        "float curves equal in every spec field but exponent_bits (>= 2 exponent widths)",
        lambda r: f"{r['family']}: {int(r['bits'])}-bit float, exponent bits",
    )


def fig_proxy(c: pd.DataFrame, target: str) -> MplFigure:
    return _variation_panels(
        c,
        target,
        "outlier_fraction",
        {"bits": [3, 4]},
        "3- or 4-bit curves with and without proxy quantization (outlier_fraction > 0 vs 0)",
        lambda r: f"{r['family']}: {int(r['bits'])}-bit, proxy quantization",
    )


def _gptq_curve(row: Mapping) -> str:
    """``GPTQ int2``, ``RTN float3 (E2)``, ``16-bit baseline``: one curve of Figure 5."""
    if row["dtype"] == "fp16":
        return "16-bit baseline"
    name = f"{str(row['method']).upper()} {row['dtype']}{int(row['bits'])}"
    e = row.get("exponent_bits")
    return name + (f" (E{int(e)})" if row["dtype"] == "float" and pd.notna(e) else "")


def _gptq_panels(cc: pd.DataFrame) -> list[tuple[object, pd.DataFrame]]:
    """(block size or NaN, points) per block size with GPTQ runs, per tensor first: the GPTQ
    curves, the round-to-nearest curves of the same block size from the lowest GPTQ precision
    to one bit above the highest (Table 1 sets 2-bit GPTQ against 3-bit float), the baseline."""
    plain = (cc["outlier_fraction"].fillna(0) == 0) & ~cc["center"].fillna(False).astype(bool)
    plain &= cc["mixed_ratio"].isna() if "mixed_ratio" in cc else True
    method = cc["method"].fillna("rtn")
    gptq = cc[(method == "gptq") & plain]
    base = cc[cc["dtype"] == "fp16"]
    out = []
    for b in sorted(gptq["block_size"].unique(), key=lambda v: (not pd.isna(v), v)):
        same = cc["block_size"].isna() if pd.isna(b) else cc["block_size"] == b
        g = gptq[same.loc[gptq.index]]
        lo, hi = int(g["bits"].min()), int(g["bits"].max()) + 1
        r = cc[same & plain & (method == "rtn") & cc["bits"].between(lo, hi)]
        r = r[r["dtype"] != "fp16"]
        if len(r):
            out.append((b, pd.concat([g, r, base])))
    return out


def fig_gptq(c: pd.DataFrame, target: str) -> MplFigure:
    """Figure 5: bit-level scaling of GPTQ against round-to-nearest, one panel per block size
    (per tensor first). Colour = bits, solid = GPTQ, dashed = round-to-nearest."""
    from matplotlib.lines import Line2D

    cc = c[c["target"] == target]
    panels = _gptq_panels(cc) if "method" in cc else []
    _need(
        bool(panels),
        f"GPTQ runs (method gptq) and round-to-nearest runs of the same block size within one "
        f"bit of them on {target}",
    )
    fig, axes = _subplots(len(panels), ncols=2, w=5.8, h=4.4)
    lower = lower_is_better(target)
    for ax, (b, pts) in zip(axes, panels, strict=True):
        pts = pts.assign(curve=[_gptq_curve(r) for r in pts.to_dict("records")])
        keys, styles = [], {}
        for r in pts.drop_duplicates("curve").to_dict("records"):
            st = style.precision_style(16 if r["dtype"] == "fp16" else int(r["bits"]))
            if r["dtype"] != "fp16":
                st["linestyle"] = "-" if r["method"] == "gptq" else "--"
                st["marker"] = "o" if r["method"] == "gptq" else "s"
            styles[r["curve"]] = st
            keys.append(r["curve"])
        order = sorted(keys, key=lambda k: (k.startswith("16"), not k.startswith("GPTQ"), k))
        n_div = _draw(ax, pts, "curve", lambda r: r["curve"], styles, order, lower)
        ax.set_title("no blocking (per tensor / row)" if pd.isna(b) else f"blocks of {int(b)}")
        _finish(ax, target)
        handles, labels = ax.get_legend_handles_labels()
        for k in order:  # a curve whose every run diverged still needs its colour named
            if k not in labels:
                st = styles[k]
                handles.append(Line2D([], [], marker="x", linestyle="none", color=st["color"]))
                labels.append(f"{k}: every run diverged")
        if n_div:
            handles, labels = [*handles, _diverged_handle()], [*labels, DIVERGED_LABEL]
        legend_outside(ax, handles, labels)
    return fig


def fig_ppl_vs_acc(scores: pd.DataFrame, ppl: str | None) -> MplFigure:
    _need(ppl is not None, "a perplexity task (e.g. wikitext word_perplexity) and mean accuracy")
    marked = mark_diverged(scores, scores)
    a = marked[marked["target"] == ACCURACY_TARGET]
    p = marked[marked["target"] == ppl]
    cols = ["model", "quant", "family", "value", "diverged"]
    m = a[cols].merge(p[["model", "quant", "value", "diverged"]], on=["model", "quant"])
    m = m.rename(columns={"value_x": "value_acc", "value_y": "value_ppl"})
    gone = m["diverged_x"] | m["diverged_y"]
    n_diverged = int(gone.sum())
    m = m[~gone]
    _need(len(m) >= 3, "at least 3 runs with both perplexity and mean zero-shot accuracy")
    r = stats.pearsonr(m["value_ppl"], m["value_acc"]).statistic
    fig, (ax,) = _subplots(1, w=6.0, h=4.4)
    fams = sorted(m["family"].unique())
    colors = dict(zip(fams, style.series_colors(len(fams)), strict=True))
    for i, f in enumerate(fams):
        g = m[m["family"] == f]
        ax.scatter(
            g["value_ppl"],
            g["value_acc"],
            s=16,
            color=colors[f],
            marker=style.MARKERS[i % len(style.MARKERS)],
            label=f,
        )
    ax.set_xscale("log")
    _pad_log_limits(ax, m["value_ppl"].to_numpy(float))
    plain_log_axis(ax, "x")
    ax.set_xlabel(y_label(ppl).replace(" (lower is better)", " (log scale)"))
    ax.set_ylabel(y_label(ACCURACY_TARGET))
    title = f"Pearson r = {r:.3f} over {len(m)} runs"
    if n_diverged:
        title += f"\n({n_diverged} diverged runs not shown)"
    ax.set_title(title)
    legend_outside(ax, title="family")
    return fig


def _optimal_shares(boot: pd.DataFrame | None, fam: str, target: str) -> pd.DataFrame | None:
    """Budget x precision table of the share of replicates in which each precision is best."""
    if boot is None or boot.empty or "kind" not in boot:
        return None
    s = boot[(boot["kind"] == "optimal") & (boot["family"] == fam) & (boot["target"] == target)]
    if s.empty:
        return None
    t = s.pivot_table(index="budget_log2", columns="precision", values="freq", aggfunc="sum")
    return t.fillna(0.0).sort_index()


def fig_optimal(
    optimal: pd.DataFrame | None, target: str, boot: pd.DataFrame | None = None
) -> MplFigure:
    """Top row: the best precision at each budget; bottom row (with the bootstrap table): the
    share of bootstrap replicates in which each precision is best, stacked."""
    import matplotlib.pyplot as plt

    o = None if optimal is None or optimal.empty else optimal
    if o is not None:
        o = o[(o["target"] == target) & (o["n_curves"] >= 2)]
    _need(
        o is not None and not o.empty,
        f"the optimal-precision table with >= 2 precisions overlapping on {target}",
    )
    fams = sorted(o["family"].unique())
    shares = {f: _optimal_shares(boot, f, target) for f in fams}
    rows = 2 if any(s is not None for s in shares.values()) else 1
    fig, axes = plt.subplots(
        rows,
        len(fams),
        figsize=(4.8 * len(fams) + 1.2, 2.8 * rows + 0.6),
        squeeze=False,
        sharex="col",
        layout="constrained",
    )
    present: set[int] = set()
    for j, fam in enumerate(fams):
        g = o[o["family"] == fam].sort_values("budget_bits")
        levels = sorted({int(p) for p in g["best_precision"]})
        share = shares[fam]
        if share is not None:
            levels = sorted(set(levels) | {int(p) for p in share.columns})
        present |= set(levels)
        pos = {p: i for i, p in enumerate(levels)}
        ax = axes[0, j]
        y = g["best_precision"].astype(int).map(pos)
        ax.step(g["budget_bits"], y, where="mid", color="0.7", lw=1, zorder=1)
        for p, gp in g.groupby("best_precision"):
            st = style.precision_style(int(p))
            ax.scatter(
                gp["budget_bits"],
                gp["best_precision"].astype(int).map(pos),
                s=22,
                color=st["color"],
                marker=st["marker"],
                zorder=3,
            )
        ax.set_yticks(range(len(levels)))
        ax.set_yticklabels(["16" if p == 16 else str(p) for p in levels])
        ax.set_ylim(-0.5, len(levels) - 0.5)
        ax.set_ylabel("best precision (bits)")
        ax.set_title(f"{fam}: optimal precision per bit budget")
        ax.set_xscale("log", base=2)
        _pad_log_limits(ax, g["budget_bits"].to_numpy(float), pad=0.02)
        if rows == 2:
            bx = axes[1, j]
            if share is None:
                bx.set_visible(False)
            else:
                ps = [p for p in levels if p in share.columns]
                bx.stackplot(
                    np.exp2(share.index.to_numpy(float)),
                    [share[p].to_numpy(float) for p in ps],
                    colors=[style.precision_style(p)["color"] for p in ps],
                    alpha=0.75,
                    lw=0,
                )
                bx.set_ylim(0, 1)
                bx.set_ylabel("share of bootstrap\nreplicates where best")
                bx.set_xscale("log", base=2)
            axes[0, j].tick_params(labelbottom=False)
        bottom = axes[rows - 1, j] if axes[rows - 1, j].get_visible() else axes[0, j]
        bottom.set_xlabel(X_LABEL)
        size_axis(bottom, "x")
    handles, labels = precision_handles(present)
    figure_legend(fig, handles, labels, title="precision")
    return fig


# ----------------------------------------------------------------------------- driver
CAPTIONS = {
    "fig1_bit_scaling": "Bit-level scaling of the family with the most model sizes: mean zero-shot "
    "accuracy against total model bits (shown in bytes), one curve per precision, 95% bootstrap "
    "intervals.",
    "fig2_bit_scaling_families": "Bit-level scaling for every family (one panel each).",
    "fig3a_block_size_4bit": "4-bit quantization with different block sizes (block constants "
    "counted in the total bits).",
    "fig3b_data_type_4bit": "4-bit quantization with different data types at the same block size.",
    "fig4_proxy_quantization": "Proxy (outlier-dependent) quantization at 3 and 4 bits against the "
    "same precision without it.",
    "fig_6bit_null": "6-bit quantization with different data types and block sizes (the paper "
    "finds no difference at 6 bits).",
    "fig_float_exponent_bits": "Float data types with different exponent bits at each precision.",
    "fig1_perplexity": "Perplexity version of Figure 1.",
    "fig2_perplexity_families": "Perplexity version of Figure 2.",
    "fig_perplexity_vs_accuracy": "Perplexity against mean zero-shot accuracy over all runs.",
    "fig5_gptq_blocking": "Bit-level scaling of GPTQ (solid) against round-to-nearest "
    "(dashed) without and with blocking, one panel per block size; colour = bits. WikiText-2 "
    "perplexity in the GPTQ convention where the run has it (the paper's Table 1 metric).",
    "fig_optimal_precision": "Top: the precision whose interpolated curve is highest at each "
    "total-bit budget. Bottom: the share of bootstrap replicates in which each precision is "
    "highest (stacked, sums to 1).",
}


def _jobs(
    scores: pd.DataFrame,
    curves: pd.DataFrame,
    optimal: pd.DataFrame | None = None,
    boot: pd.DataFrame | None = None,
) -> list[tuple[str, str, Callable]]:
    acc = ACCURACY_TARGET
    ppl = perplexity_target(list(curves["target"].unique())) if not curves.empty else None
    jobs: list[tuple[str, str, Callable]] = [
        ("fig1_bit_scaling", CAPTIONS["fig1_bit_scaling"], lambda: fig_precision_one(curves, acc)),
        (
            "fig2_bit_scaling_families",
            CAPTIONS["fig2_bit_scaling_families"],
            lambda: fig_precision_all(curves, acc),
        ),
        (
            "fig3a_block_size_4bit",
            CAPTIONS["fig3a_block_size_4bit"],
            lambda: fig_block_size(curves, acc, 4),
        ),
        (
            "fig3b_data_type_4bit",
            CAPTIONS["fig3b_data_type_4bit"],
            lambda: fig_data_type(curves, acc, 4),
        ),
        (
            "fig4_proxy_quantization",
            CAPTIONS["fig4_proxy_quantization"],
            lambda: fig_proxy(curves, acc),
        ),
        ("fig_6bit_null", CAPTIONS["fig_6bit_null"], lambda: fig_null_6bit(curves, acc)),
        (
            "fig_float_exponent_bits",
            CAPTIONS["fig_float_exponent_bits"],
            lambda: fig_exponent(curves, acc),
        ),
        (
            "fig5_gptq_blocking",
            CAPTIONS["fig5_gptq_blocking"],
            lambda: fig_gptq(curves, gptq_metric(curves.get("target", []), ppl)),
        ),
        (
            "fig_optimal_precision",
            CAPTIONS["fig_optimal_precision"],
            lambda: fig_optimal(optimal, acc, boot),
        ),
    ]
    for fam in sorted(curves["family"].unique()) if not curves.empty else []:
        for vary, what in (("block_size", "block sizes"), ("dtype", "data types")):
            jobs.append(
                (
                    f"appendix_{vary}_{fam}",
                    f"Appendix: {what} at every precision for {fam}.",
                    lambda v=vary, f=fam: fig_appendix(curves, acc, v, f),
                )
            )
    if ppl is None:
        missing = "a perplexity task (e.g. wikitext) evaluated for the precision sweep"
        for name in ("fig1_perplexity", "fig2_perplexity_families"):
            jobs.append((name, CAPTIONS[name], lambda m=missing: _skip(m)))
    else:
        jobs += [
            (
                "fig1_perplexity",
                CAPTIONS["fig1_perplexity"],
                lambda: fig_precision_one(curves, ppl),
            ),
            (
                "fig2_perplexity_families",
                CAPTIONS["fig2_perplexity_families"],
                lambda: fig_precision_all(curves, ppl),
            ),
        ]
    jobs.append(
        (
            "fig_perplexity_vs_accuracy",
            CAPTIONS["fig_perplexity_vs_accuracy"],
            lambda: fig_ppl_vs_acc(scores, ppl),
        )
    )
    return jobs


def draw_figures(
    scores: pd.DataFrame, laws: Mapping[str, pd.DataFrame] | str | Path | None
) -> Iterator[tuple[str, str, MplFigure | Skip]]:
    """``(name, caption, figure or Skip)`` for every figure, drawn but not saved (the caller
    closes each figure); diverged points are marked from ``scores``."""
    style.apply()
    tables = load_laws(laws)
    curves = tables.get("curves")
    if curves is None or curves.empty:
        curves = build_curves(scores)
    if not curves.empty:
        curves = complete_spec_fields(curves)
        curves = with_diverged_points(_with_ci(curves, tables.get("bootstrap")), scores)
    for name, caption, build in _jobs(
        scores, curves, tables.get("optimal"), tables.get("bootstrap")
    ):
        try:
            yield name, caption, build()
        except Skip as e:
            yield name, caption, e


def _save(fig, out_dir: Path, name: str) -> list[Path]:
    import matplotlib.pyplot as plt

    paths = []
    for ext in ("png", "pdf"):
        paths.append(
            atomic_write(out_dir / f"{name}.{ext}", lambda p, e=ext: fig.savefig(p, format=e))
        )
    plt.close(fig)
    return paths


def render_figures(
    scores: pd.DataFrame, laws: Mapping[str, pd.DataFrame] | str | Path | None, out_dir: str | Path
) -> tuple[list[Figure], list[tuple[str, str]]]:
    """Draw every figure the data allows: ``(written figures, [(skipped name, data needed)])``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, skipped = [], []
    for name, caption, fig in draw_figures(scores, laws):
        if isinstance(fig, Skip):
            skipped.append((name, str(fig)))
            continue
        written.append(Figure(name, caption, _save(fig, out, name)))
    return written, skipped


def index_markdown(
    written: list[Figure], skipped: list[tuple[str, str]], base: str | Path = "."
) -> str:
    """The index: each figure with its caption, then the skipped ones and what they need.

    Links are relative to ``base``, the directory the index is written to.
    """

    def rel(p: Path) -> str:
        return Path(os.path.relpath(Path(p).resolve(), Path(base).resolve())).as_posix()

    lines = ["# Figures", ""]
    for f in written:
        files = ", ".join(f"[{p.suffix[1:].upper()}]({rel(p)})" for p in f.paths)
        lines += [
            f"## {f.name}",
            "",
            f"![{f.name}]({rel(f.paths[0])})",
            "",
            f.caption,
            "",
            f"Files: {files}",
            "",
        ]
    lines += [skipped_markdown(skipped)]
    return "\n".join(lines)


def skipped_markdown(skipped: list[tuple[str, str]]) -> str:
    """``SKIPPED.md``: each figure not drawn and the data it needs."""
    lines = ["# Skipped figures", ""]
    if not skipped:
        return "\n".join([*lines, "None: every figure had its data.", ""])
    lines += ["| figure | data it needs |", "|---|---|"]
    lines += [f"| {n} | {why} |" for n, why in skipped]
    return "\n".join([*lines, ""])


def make_figures(
    scores: pd.DataFrame,
    laws: Mapping[str, pd.DataFrame] | str | Path | None,
    out_dir: str | Path,
    index: str | Path | None = None,
) -> list[Path]:
    """Write every figure (PNG + PDF), ``SKIPPED.md`` (and as ``SKIPPED.html`` for the HTML
    report) and ``index.md``; returns the figure files.

    ``laws`` is the mapping (or directory) of the fit step's tables: ``curves`` (built from
    ``scores`` when absent), ``bootstrap`` (error bars, optimal-precision shares), ``fits``,
    ``optimal``.
    """
    from kbit.analysis.report import skipped_html  # the report module imports this one

    written, skipped = render_figures(scores, laws, out_dir)
    out = Path(out_dir)
    write_text(skipped_markdown(skipped), out / "SKIPPED.md")
    write_text(skipped_html(skipped), out / "SKIPPED.html")
    index_path = Path(index) if index else out / "index.md"
    write_text(index_markdown(written, skipped, index_path.parent), index_path)
    return [p for f in written for p in f.paths]
