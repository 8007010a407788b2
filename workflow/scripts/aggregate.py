"""Per-document evaluation files -> the score table and the run table."""

from kbit.analysis.tables import aggregate
from kbit.io import write_parquet
from kbit.logs import setup_logging

log = setup_logging(snakemake.log[0])
scores, runs = aggregate(
    list(snakemake.input.evals),
    dict(snakemake.params.get("accuracy_metrics") or {}) or None,
    sweeps=dict(snakemake.params.get("sweeps") or {}),
)
write_parquet(scores, snakemake.output.scores)
write_parquet(runs, snakemake.output.runs)
log.info("%d score rows, %d runs", len(scores), len(runs))
