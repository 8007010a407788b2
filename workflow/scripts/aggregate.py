"""Per-document evaluation files -> the score table and the run table."""

import pandas as pd

from kbit.logs import job
from kbit.analysis.report import write_tables_html
from kbit.analysis.tables import aggregate
from kbit.io import write_parquet

with job(snakemake) as log:
    feature_files = list(snakemake.input.get("features", []))
    features = (
        pd.concat([pd.read_parquet(p) for p in feature_files], ignore_index=True)
        if feature_files
        else None
    )
    scores, runs = aggregate(
        list(snakemake.input.evals),
        dict(snakemake.params.accuracy_metrics),
        sweeps=dict(snakemake.params.sweeps),
        perplexity_cap=float(snakemake.params.perplexity_cap),
        features=features,
    )
    write_parquet(scores, snakemake.output.scores)
    write_parquet(runs, snakemake.output.runs)
    write_tables_html(scores, runs, snakemake.output.scores_html, snakemake.output.runs_html)
    log.info("%d score rows, %d runs", len(scores), len(runs))
