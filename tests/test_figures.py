"""Figures are written as PNG + PDF; figures without their data are skipped and listed."""

from __future__ import annotations

import pytest
from synthetic import analysed

from kbit.analysis.figures import CAPTIONS, make_figures
from kbit.io import write_parquet


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    a = analysed()
    out = tmp_path_factory.mktemp("figures")
    return out, make_figures(a.scores, a.laws, out)


def test_every_figure_is_written_as_png_and_pdf(full):
    out, paths = full
    names = {p.stem for p in paths}
    assert set(CAPTIONS) <= names
    assert {"appendix_block_size_pythia", "appendix_dtype_pythia"} <= names
    for name in names:
        for ext in ("png", "pdf"):
            f = out / f"{name}.{ext}"
            assert f.exists() and f.stat().st_size > 1000, f
    assert (out / "SKIPPED.md").read_text().count("None: every figure had its data") == 1


def test_index_lists_each_figure_with_its_caption(full):
    out, paths = full
    index = (out / "index.md").read_text()
    for p in paths:
        assert f"]({p.name})" in index
    assert CAPTIONS["fig1_bit_scaling"] in index


def test_figures_without_data_are_skipped_and_listed(tmp_path):
    a = analysed(extras=False, with_wikitext=False, n_docs=60, n_boot=20)
    laws_dir = tmp_path / "laws"
    for name, df in a.laws.items():
        write_parquet(df, laws_dir / f"{name}.parquet")
    out = tmp_path / "figs"
    paths = make_figures(a.scores, laws_dir, out, index=tmp_path / "figures.md")
    names = {p.stem for p in paths}
    assert names == {"fig1_bit_scaling", "fig2_bit_scaling_families", "fig_optimal_precision"}
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
    ):
        assert f"| {name} |" in skipped
        assert not (out / f"{name}.png").exists()
    assert "block_size" in skipped and "perplexity" in skipped
    index = (tmp_path / "figures.md").read_text()
    assert "](figs/fig1_bit_scaling.png)" in index and "fig3a_block_size_4bit" in index
