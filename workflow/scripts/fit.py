"""Scores + documents -> curves, fits, optimal precision and the paired bootstrap."""

import pandas as pd

from kbit.logs import job
from kbit.analysis.laws import LAW_NAMES, fit_laws, write_laws

with job(snakemake) as log:
    laws = fit_laws(
        pd.read_parquet(snakemake.input.scores),
        list(snakemake.input.evals),
        accuracy_metrics=dict(snakemake.params.accuracy_metrics),
        n_boot=int(snakemake.params.n_boot),
        seed=int(snakemake.params.seed),
    )
    write_laws(laws, {name: snakemake.output[name] for name in LAW_NAMES})
    log.info("law tables: %s", {k: len(v) for k, v in laws.items()})
