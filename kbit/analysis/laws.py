"""The fit step in one call: curves, the paired bootstrap, the three fits and optimal precision."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd

from kbit.analysis.bootstrap import DOC_COLUMNS, bootstrap_points, bootstrap_table
from kbit.analysis.curves import build_curves, curve_targets
from kbit.analysis.fits import fit_all, optimal_precision
from kbit.analysis.tables import read_evals
from kbit.io import write_parquet

LAW_NAMES = ("curves", "fits", "optimal", "bootstrap")


def fit_laws(
    scores: pd.DataFrame,
    eval_files: Iterable[str | Path | pd.DataFrame],
    accuracy_metrics: Mapping[str, str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    degree: int = 2,
) -> dict[str, pd.DataFrame]:
    """``{"curves", "fits", "optimal", "bootstrap"}`` tables from the scores and the documents."""
    curves = build_curves(scores)
    docs = read_evals(eval_files, columns=list(DOC_COLUMNS))
    points = bootstrap_points(docs, accuracy_metrics, n_boot, seed, targets=curve_targets(scores))
    boot = bootstrap_table(points, curves)
    return {
        "curves": curves,
        "fits": fit_all(curves, boot, degree),
        "optimal": optimal_precision(curves, boot),
        "bootstrap": boot,
    }


def write_laws(laws: Mapping[str, pd.DataFrame], paths: Mapping[str, str | Path]) -> None:
    """Write each law table to its path (atomically)."""
    missing = [n for n in LAW_NAMES if n not in paths]
    if missing:
        raise ValueError(f"no output path for law tables {missing}")
    for name in LAW_NAMES:
        write_parquet(laws[name], paths[name])
