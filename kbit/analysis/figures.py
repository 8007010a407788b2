"""The paper's figures regenerated from this run's tables.

Every figure selects its curves by spec fields (e.g. block sizes: 4-bit curves equal in every
field but ``block_size``), never by names. A figure whose data the run did not produce is not
drawn: it is listed in ``SKIPPED.md`` with the data it needs. Each figure is written as PNG and
PDF; ``index.md`` lists every figure with its caption.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
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
    perplexity_target,
    variation_groups,
)
from kbit.io import atomic_write, write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure as MplFigure

LAW_TABLES = ("curves", "fits", "optimal", "bootstrap")
X_LABEL = "total model bits (log2 scale)"


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
    corpus = {"wikitext": "WikiText-2"}.get(task, task)
    return f"{corpus} {names.get(metric, metric)} (lower is better)"


def _with_ci(curves: pd.DataFrame, boot: pd.DataFrame | None) -> pd.DataFrame:
    if boot is None or boot.empty or "kind" not in boot:
        return curves.assign(ci_low=np.nan, ci_high=np.nan)
    pts = boot.loc[boot["kind"] == "point", ["model", "quant", "target", "ci_low", "ci_high"]]
    return curves.merge(pts, on=["model", "quant", "target"], how="left")


def _draw(ax, pts: pd.DataFrame, by: str, label: Callable, colors: Mapping, order=None) -> None:
    """One line per value of ``by`` with bootstrap error bars; x log2-scaled total bits."""
    keys = order or sorted(pts[by].unique(), key=lambda v: (pd.isna(v), v))
    for i, k in enumerate(keys):
        g = pts[pts[by] == k] if not pd.isna(k) else pts[pts[by].isna()]
        if g.empty:
            continue
        g = g.sort_values("total_bits")
        y = g["value"].to_numpy(float)
        err = None
        if g["ci_low"].notna().all():
            err = np.vstack([y - g["ci_low"].to_numpy(float), g["ci_high"].to_numpy(float) - y])
            err = np.clip(err, 0, None)
        ax.errorbar(
            g["total_bits"],
            y,
            yerr=err,
            marker=style.MARKERS[i % len(style.MARKERS)],
            ms=4,
            lw=1.4,
            capsize=2,
            color=colors.get(k),
            label=label(g.iloc[0]),
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel(X_LABEL)


def _main(c: pd.DataFrame, target: str) -> pd.DataFrame:
    return c[(c["target"] == target) & c["main_sweep"]]


def _skip(what: str):
    raise Skip(what)


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise Skip(what)


def _log2_ticks(ax) -> None:
    """Ticks at powers of two on the bits axis, at fractional exponents when the range is narrow
    (a single family often spans less than a doubling per precision)."""
    from matplotlib.ticker import FixedLocator, NullLocator

    lo, hi = np.log2(ax.get_xlim())
    span = hi - lo
    step = next((s for s, need in ((1.0, 4), (0.5, 2), (0.25, 1)) if span >= need), 0.1)
    ticks = np.arange(np.ceil(lo / step) * step, hi + 1e-9, step)
    ax.xaxis.set_major_locator(FixedLocator(2.0**ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"$2^{{{t:g}}}$" for t in ticks])


def _finish(ax, target: str) -> None:
    """Y label with units (log scale for perplexities) and power-of-two ticks on x."""
    if "perplexity" in target:
        ax.set_yscale("log")
    ax.set_ylabel(y_label(target))
    _log2_ticks(ax)


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


def fig_precision_one(c: pd.DataFrame, target: str) -> MplFigure:
    main = _main(c, target)
    _need(
        not main.empty and main["quant"].nunique() >= 2,
        f"a precision sweep (>= 2 bit widths of one data type and block size) on {target}",
    )
    fam = _largest_family(main)
    fig, (ax,) = _subplots(1, w=6, h=4.4)
    pts = main[main["family"] == fam]
    _draw(ax, pts, "precision", lambda r: curve_label(r), style.precision_colors())
    ax.set_title(f"{fam}: bit-level scaling")
    _finish(ax, target)
    ax.legend(title="precision", fontsize=8)
    return fig


def fig_precision_all(c: pd.DataFrame, target: str) -> MplFigure:
    main = _main(c, target)
    _need(
        not main.empty and main["quant"].nunique() >= 2,
        f"a precision sweep (>= 2 bit widths) on {target}",
    )
    fams = sorted(main["family"].unique())
    fig, axes = _subplots(len(fams))
    for ax, fam in zip(axes, fams, strict=True):
        _draw(ax, main[main["family"] == fam], "precision", curve_label, style.precision_colors())
        ax.set_title(fam)
        _finish(ax, target)
    axes[0].legend(title="precision", fontsize=7)
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
    fig, axes = _subplots(len(panels))
    for ax, g in zip(axes, panels, strict=True):
        vals = sorted(g[vary].unique(), key=lambda v: (pd.isna(v), v))
        colors = dict(zip(vals, style.series_colors(len(vals)), strict=True))
        _draw(ax, g, vary, lambda r: curve_label(r, vary), colors, order=vals)
        ax.set_title(title_fn(g.iloc[0]))
        _finish(ax, target)
        ax.legend(fontsize=7)
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
    fig, axes = _subplots(len(groups))
    for ax, g in zip(axes, groups, strict=True):
        vary = "dtype" if g["dtype"].nunique() > 1 else "block_size"
        vals = sorted(g[vary].unique(), key=lambda v: (pd.isna(v), v))
        colors = dict(zip(vals, style.series_colors(len(vals)), strict=True))
        _draw(ax, g, vary, lambda r, v=vary: curve_label(r, v), colors, order=vals)
        ax.set_title(f"{g['family'].iloc[0]}: 6-bit, varying {vary.replace('_', ' ')}")
        _finish(ax, target)
        ax.legend(fontsize=7)
    return fig


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


def fig_ppl_vs_acc(scores: pd.DataFrame, ppl: str | None) -> MplFigure:
    _need(ppl is not None, "a perplexity task (e.g. wikitext word_perplexity) and mean accuracy")
    a = scores[scores["target"] == ACCURACY_TARGET][["model", "quant", "family", "value"]]
    p = scores[scores["target"] == ppl][["model", "quant", "value"]]
    m = a.merge(p, on=["model", "quant"], suffixes=("_acc", "_ppl"))
    _need(len(m) >= 3, "at least 3 runs with both perplexity and mean zero-shot accuracy")
    r = stats.pearsonr(m["value_ppl"], m["value_acc"]).statistic
    fig, (ax,) = _subplots(1, w=5.5, h=4.4)
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
    ax.set_xlabel(y_label(ppl).replace(" (lower is better)", " (log scale)"))
    ax.set_ylabel(y_label(ACCURACY_TARGET))
    ax.set_title(f"Pearson r = {r:.3f} over {len(m)} runs")
    ax.legend(fontsize=7)
    return fig


def fig_optimal(optimal: pd.DataFrame | None, target: str) -> MplFigure:
    from matplotlib.ticker import MaxNLocator

    o = None if optimal is None or optimal.empty else optimal
    if o is not None:
        o = o[(o["target"] == target) & (o["n_curves"] >= 2)]
    _need(
        o is not None and not o.empty,
        f"the optimal-precision table with >= 2 precisions overlapping on {target}",
    )
    fams = sorted(o["family"].unique())
    fig, axes = _subplots(len(fams))
    colors = style.precision_colors()
    for ax, fam in zip(axes, fams, strict=True):
        g = o[o["family"] == fam].sort_values("budget_bits")
        ax.step(g["budget_bits"], g["best_precision"], where="mid", color="0.6", lw=1)
        freq = g["freq_best"] if "freq_best" in g else pd.Series(1.0, index=g.index)
        for p, gp in g.groupby("best_precision"):
            ax.scatter(
                gp["budget_bits"],
                gp["best_precision"],
                s=12 + 40 * freq[gp.index],
                color=colors.get(int(p)),
                label=f"{int(p)}-bit",
                zorder=3,
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel(X_LABEL)
        ax.set_ylabel("optimal precision (bits)")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{fam}: best precision per budget")
        _log2_ticks(ax)
        ax.legend(fontsize=7, title="marker size: bootstrap share")
    return fig


# ----------------------------------------------------------------------------- driver
CAPTIONS = {
    "fig1_bit_scaling": "Bit-level scaling of the family with the most model sizes: mean zero-shot "
    "accuracy against total model bits, one curve per precision, 95% bootstrap intervals.",
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
    "fig_optimal_precision": "The precision whose interpolated curve is highest at each total-bit "
    "budget; marker size is the share of bootstrap replicates in which it is highest.",
}


def _jobs(
    scores: pd.DataFrame, curves: pd.DataFrame, optimal: pd.DataFrame | None = None
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
            "fig_optimal_precision",
            CAPTIONS["fig_optimal_precision"],
            lambda: fig_optimal(optimal, acc),
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
    style.apply()
    tables = load_laws(laws)
    curves = tables.get("curves")
    if curves is None or curves.empty:
        curves = build_curves(scores)
    curves = _with_ci(curves, tables.get("bootstrap"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, skipped = [], []
    for name, caption, build in _jobs(scores, curves, tables.get("optimal")):
        try:
            fig = build()
        except Skip as e:
            skipped.append((name, str(e)))
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
    """Write every figure (PNG + PDF), ``SKIPPED.md`` and ``index.md``; returns the figure files.

    ``laws`` is the mapping (or directory) of the fit step's tables: ``curves`` (built from
    ``scores`` when absent), ``bootstrap`` (error bars), ``fits``, ``optimal``.
    """
    written, skipped = render_figures(scores, laws, out_dir)
    out = Path(out_dir)
    write_text(skipped_markdown(skipped), out / "SKIPPED.md")
    index_path = Path(index) if index else out / "index.md"
    write_text(index_markdown(written, skipped, index_path.parent), index_path)
    return [p for f in written for p in f.paths]
