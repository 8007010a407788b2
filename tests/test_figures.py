"""Figures: written as PNG + PDF, skipped and listed without their data, and readable.

Readability is checked on the drawn figures, not trusted: size ticks are round byte sizes
(never fractional powers of two), tick labels do not touch, legends sit where no point or error
bar is, precision colours stay apart (also under simulated colour-vision deficiencies), and a
diverged run is a cross outside every curve.
"""

from __future__ import annotations

import itertools
import re

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.collections import LineCollection, PathCollection
from synthetic import analysed

from kbit.analysis import style
from kbit.analysis.figures import (
    CAPTIONS,
    DIVERGED_LABEL,
    Skip,
    draw_figures,
    format_bytes,
    make_figures,
    size_ticks,
)
from kbit.io import write_parquet

SIZE_LABEL = re.compile(r"^\d+(\.\d+)? (B|KiB|MiB|GiB|TiB)$")
PLAIN_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


@pytest.fixture(scope="module")
def drawn():
    """Every figure of the paper world, drawn once: {name: figure}, plus the skipped ones."""
    a = analysed("paper")
    figs, skipped = {}, {}
    for name, _, fig in draw_figures(a.scores, a.laws):
        if isinstance(fig, Skip):
            skipped[name] = str(fig)
        else:
            fig.canvas.draw()
            figs[name] = fig
    yield figs, skipped
    for fig in figs.values():
        plt.close(fig)


def _visible_labels(fig, axis, lo, hi):
    """(text, window bbox) of the labelled ticks inside the view interval."""
    renderer = fig.canvas.get_renderer()
    out = []
    for loc, lab in zip(axis.get_majorticklocs(), axis.get_majorticklabels(), strict=False):
        if lab.get_visible() and lab.get_text() and lo <= loc <= hi:
            out.append((lab.get_text(), lab.get_window_extent(renderer)))
    return out


def _data_points(ax) -> np.ndarray:
    """Display coordinates of every drawn point and error-bar end of an axes."""
    pts = []
    for line in ax.lines:
        xy = np.asarray(line.get_xydata(), dtype=float)
        if len(xy):
            pts.append(line.get_transform().transform(xy))
    for coll in ax.collections:
        if isinstance(coll, LineCollection):
            for seg in coll.get_segments():
                pts.append(coll.get_transform().transform(np.asarray(seg, dtype=float)))
        elif isinstance(coll, PathCollection) and len(coll.get_offsets()):
            pts.append(coll.get_offset_transform().transform(coll.get_offsets()))
    pts = [p[np.isfinite(p).all(axis=1)] for p in pts]
    return np.concatenate(pts) if pts else np.empty((0, 2))


def test_every_figure_of_a_full_study_is_drawn(drawn):
    figs, skipped = drawn
    assert set(CAPTIONS) <= set(figs), skipped
    assert {"appendix_block_size_pythia", "appendix_dtype_pythia"} <= set(figs)
    assert not skipped


def test_size_axes_read_as_round_byte_sizes(drawn):
    figs, _ = drawn
    n_axes = 0
    for name, fig in figs.items():
        for ax in fig.axes:
            if not ax.get_visible() or name == "fig_perplexity_vs_accuracy":
                continue
            labels = _visible_labels(fig, ax.xaxis, *sorted(ax.get_xlim()))
            if not labels:  # the upper panel of a shared axis
                continue
            n_axes += 1
            texts = [t for t, _ in labels]
            assert len(texts) >= 3, (name, texts)
            for t in texts:
                assert SIZE_LABEL.match(t), (name, t)
                assert "^" not in t and "$" not in t, (name, t)
    assert n_axes >= 10


def test_tick_labels_never_touch(drawn):
    figs, _ = drawn
    for name, fig in figs.items():
        for ax in fig.axes:
            if not ax.get_visible():
                continue
            for axis, lim, coord in ((ax.xaxis, ax.get_xlim(), 0), (ax.yaxis, ax.get_ylim(), 1)):
                boxes = sorted(
                    (b for _, b in _visible_labels(fig, axis, *sorted(lim))),
                    key=lambda b: (b.x0, b.y0)[coord],
                )
                for a, b in itertools.pairwise(boxes):
                    gap = b.x0 - a.x1 if coord == 0 else b.y0 - a.y1
                    assert gap > 1.0, (name, axis.axis_name, gap)


def test_perplexity_axes_carry_plain_numbers(drawn):
    figs, _ = drawn
    checked = 0
    for name in ("fig1_perplexity", "fig_perplexity_vs_accuracy"):
        fig = figs[name]
        ax = fig.axes[0]
        axis = ax.yaxis if name == "fig1_perplexity" else ax.xaxis
        lim = ax.get_ylim() if name == "fig1_perplexity" else ax.get_xlim()
        texts = [t for t, _ in _visible_labels(fig, axis, *sorted(lim))]
        assert len(texts) >= 3, (name, texts)
        assert all(PLAIN_NUMBER.match(t) for t in texts), (name, texts)
        checked += 1
    assert checked == 2


def test_legends_hide_no_data(drawn):
    figs, _ = drawn
    n_legends = 0
    for name, fig in figs.items():
        renderer = fig.canvas.get_renderer()
        legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
        assert legends, name
        for leg in legends:
            n_legends += 1
            box = leg.get_window_extent(renderer)
            for ax in fig.axes:
                if not ax.get_visible():
                    continue
                pts = _data_points(ax)
                inside = (
                    (pts[:, 0] > box.x0)
                    & (pts[:, 0] < box.x1)
                    & (pts[:, 1] > box.y0)
                    & (pts[:, 1] < box.y1)
                )
                assert not inside.any(), (name, "legend covers data")
                assert not box.overlaps(ax.get_window_extent(renderer)), (name, "legend on axes")
    assert n_legends >= len(figs)


def test_optimal_precision_figure_keys_its_encoding(drawn):
    figs, _ = drawn
    fig = figs["fig_optimal_precision"]
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 2  # best precision + shares
    shares = fig.axes[1]
    assert shares.get_ylim() == (0.0, 1.0) and "bootstrap" in shares.get_ylabel()
    (leg,) = fig.legends
    assert leg.get_title().get_text() == "precision"
    labels = [t.get_text() for t in leg.get_texts()]
    assert "4-bit" in labels and "16-bit baseline" in labels
    assert all(ax.get_legend() is None for ax in fig.axes)  # one key for the whole figure


def test_precision_colours_stay_apart_for_every_vision():
    colors = style.precision_colors()
    pairs = [(3, 4), (4, 5), (5, 6), (6, 7), (7, 8), (4, 8)]
    for vision in style.CVD_MATRICES:
        for a, b in pairs:
            assert style.color_distance(colors[a], colors[b], vision) >= 40, (vision, a, b)
        for a, b in itertools.combinations(range(3, 9), 2):
            assert style.color_distance(colors[a], colors[b], vision) >= 15, (vision, a, b)
    markers = [style.precision_style(p)["marker"] for p in range(3, 9)]
    assert len(set(markers)) == 6
    assert style.precision_style(16)["linestyle"] == "--"
    # the distance is a real measure: similar colours are close, black and white far apart
    assert style.color_distance("#0072B2", "#0073B3") < 2
    assert style.color_distance("#000000", "#FFFFFF") > 99


def test_size_ticks_are_round_at_every_range():
    def labels(lo_bytes, hi_bytes):
        major, _ = size_ticks(8 * lo_bytes, 8 * hi_bytes)
        return [format_bytes(v / 8) for v in major]

    # a smoke study spans less than a doubling: ticks at round MiB values, not 2^22.5
    assert labels(5.3 * 2**20, 9.8 * 2**20) == ["6 MiB", "7 MiB", "8 MiB", "9 MiB"]
    assert labels(3.3 * 2**20, 6.5 * 2**20) == ["4 MiB", "5 MiB", "6 MiB"]
    assert labels(6.1 * 2**20, 12.3 * 2**20) == ["7 MiB", "8 MiB", "9 MiB"]  # 10 MiB: too close
    # one model and its 16-bit baseline: 80 MiB and 100 MiB would touch, so evenly spaced sizes
    assert labels(78 * 2**20, 270 * 2**20) == ["78 MiB", "150 MiB", "270 MiB"]
    assert labels(700 * 2**20, 2.2 * 2**30) == ["800 MiB", "1 GiB", "2 GiB"]  # across units
    assert labels(1.1 * 2**30, 1.3 * 2**30) == ["1.1 GiB", "1.2 GiB", "1.3 GiB"]
    # a wide range: whole powers of two, thinned to at most six labels
    wide = labels(2**20, 2**40)
    assert len(wide) <= 6 and all(SIZE_LABEL.match(t) for t in wide)
    assert {"1 MiB", "1 TiB"} & set(wide)
    assert labels(2**26, 2**31) == ["64 MiB", "128 MiB", "256 MiB", "512 MiB", "1 GiB", "2 GiB"]
    assert labels(2**26, 2**32) == ["64 MiB", "256 MiB", "1 GiB", "4 GiB"]  # every other one
    assert format_bytes(1.5 * 2**30) == "1.5 GiB" and format_bytes(512) == "512 B"


@pytest.mark.parametrize(("value", "in_curves"), [(np.nan, False), (np.nan, True), (0.3, False)])
def test_diverged_runs_are_crosses_outside_the_curves(value, in_curves):
    """The fit step drops diverged points (in_curves False); older tables kept them as NaN.
    A measured value is drawn where it is, a missing one at the axis edge."""
    a = analysed("paper")
    scores = a.scores.copy()
    bad = (scores["model"] == "pythia-3") & (scores["quant"] == "float4-e3-b64")
    scores.loc[bad, "value"] = value
    scores["diverged"] = bad
    laws = dict(a.laws)
    c = laws["curves"]
    hit = (c["model"] == "pythia-3") & (c["quant"] == "float4-e3-b64")
    laws["curves"] = c.assign(value=c["value"].mask(hit, value)) if in_curves else c[~hit]
    name, _, fig = next(iter(draw_figures(scores, laws)))  # drawn lazily: the first only
    assert name == "fig1_bit_scaling"
    try:
        ax = fig.axes[0]
        crosses = [ln for ln in ax.lines if ln.get_marker() == "x"]
        assert len(crosses) == 1 and len(crosses[0].get_xdata()) == 1
        y = crosses[0].get_ydata()[0]
        assert y == (0.3 if value == 0.3 else 0.03)  # data value, or the axes-fraction edge
        four = style.precision_style(4)["color"]
        curve = [
            ln
            for ln in ax.lines
            if ln.get_marker() == "s" and ln.get_linestyle() == "-" and ln.get_color() == four
        ]
        assert curve and len(curve[0].get_xdata()) == 3  # 4 sizes, one diverged
        assert DIVERGED_LABEL in [t.get_text() for t in ax.get_legend().get_texts()]
    finally:
        plt.close(fig)


def test_gptq_figure_sets_gptq_against_rtn_per_block_size(drawn):
    """Figure 5: a panel per block size (per tensor first), GPTQ solid, round-to-nearest dashed,
    each with the colour of its bits; 2-bit GPTQ sits beside 3-bit float as in Table 1."""
    figs, _ = drawn
    fig = figs["fig5_gptq_blocking"]
    axes = [ax for ax in fig.axes if ax.get_visible()]
    titles = [ax.get_title() for ax in axes]
    assert titles == ["no blocking (per tensor / row)", "blocks of 64", "blocks of 256",
                      "blocks of 1024"]  # fmt: skip
    for ax in axes:
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels[:2] == ["GPTQ int2", "RTN float3 (E2)"] and "16-bit baseline" in labels
        lines = {c.get_label(): c.lines[0] for c in ax.containers}  # errorbar: (line, caps, bars)
        styles = {k: (ln.get_linestyle(), ln.get_color()) for k, ln in lines.items()}
        assert styles["GPTQ int2"] == ("-", style.precision_style(2)["color"])
        assert styles["RTN float3 (E2)"] == ("--", style.precision_style(3)["color"])


def test_gptq_figure_names_a_curve_whose_every_run_diverged():
    a = analysed("paper")
    scores = a.scores.copy()
    bad = (scores["method"] == "gptq") & (scores["block_size"] == 64)
    scores.loc[bad, "value"] = np.nan
    scores["diverged"] = bad
    laws = dict(a.laws)
    c = laws["curves"]
    laws["curves"] = c[~((c["method"] == "gptq") & (c["block_size"] == 64))]
    fig = None
    for name, _, f in draw_figures(scores, laws):
        if name == "fig5_gptq_blocking":
            fig = f
        elif not isinstance(f, Skip):
            plt.close(f)
    try:
        ax = next(ax for ax in fig.axes if ax.get_title() == "blocks of 64")
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert "GPTQ int2: every run diverged" in labels and DIVERGED_LABEL in labels
        crosses = [ln for ln in ax.lines if ln.get_marker() == "x"]
        assert sum(len(ln.get_xdata()) for ln in crosses) == 4  # one per model size
    finally:
        plt.close(fig)


def test_figures_without_data_are_skipped_and_listed(tmp_path):
    a = analysed(extras=False, with_wikitext=False, n_docs=60, n_boot=20)
    laws_dir = tmp_path / "laws"
    for name, df in a.laws.items():
        write_parquet(df, laws_dir / f"{name}.parquet")
    out = tmp_path / "figs"
    paths = make_figures(a.scores, laws_dir, out, index=tmp_path / "figures.md")
    names = {p.stem for p in paths}
    assert names == {"fig1_bit_scaling", "fig2_bit_scaling_families", "fig_optimal_precision"}
    for name in names:
        for ext in ("png", "pdf"):
            f = out / f"{name}.{ext}"
            assert f.exists() and f.stat().st_size > 1000, f
    skipped = (out / "SKIPPED.md").read_text()
    for name in (
        "fig3a_block_size_4bit",
        "fig3b_data_type_4bit",
        "fig4_proxy_quantization",
        "fig_6bit_null",
        "fig_float_exponent_bits",
        "fig1_perplexity",
        "fig_perplexity_vs_accuracy",
        "appendix_block_size_pythia",
        "fig5_gptq_blocking",
    ):
        assert f"| {name} |" in skipped
        assert not (out / f"{name}.png").exists()
    assert "block_size" in skipped and "perplexity" in skipped
    page = (out / "SKIPPED.html").read_text()
    assert "<code>fig3a_block_size_4bit</code>" in page and "<table>" in page
    index = (tmp_path / "figures.md").read_text()
    assert "](figs/fig1_bit_scaling.png)" in index and "fig3a_block_size_4bit" in index
    assert CAPTIONS["fig1_bit_scaling"] in index
    for p in paths:
        if p.suffix == ".png":
            assert f"](figs/{p.name})" in index
