"""Scores + law tables -> the paper's figures (PNG + PDF), SKIPPED.md and the figure index."""

import pandas as pd

from kbit.logs import job
from kbit.analysis.figures import make_figures
from kbit.analysis.laws import LAW_NAMES

with job(snakemake) as log:
    laws = {name: pd.read_parquet(snakemake.input[name]) for name in LAW_NAMES}
    paths = make_figures(
        pd.read_parquet(snakemake.input.scores), laws, snakemake.output.dir, snakemake.output.index
    )
    log.info("%d figure files written to %s", len(paths), snakemake.output.dir)
