"""Per-document evaluation files -> the score table and the run table."""

from kbit.analysis.tables import aggregate
from kbit.io import write_parquet
from kbit.logs import job

with job(snakemake) as log:
    scores, runs = aggregate(
        list(snakemake.input.evals),
        dict(snakemake.params.accuracy_metrics),
        sweeps=dict(snakemake.params.sweeps),
        perplexity_cap=float(snakemake.params.perplexity_cap),
    )
    write_parquet(scores, snakemake.output.scores)
    write_parquet(runs, snakemake.output.runs)
    log.info("%d score rows, %d runs", len(scores), len(runs))
