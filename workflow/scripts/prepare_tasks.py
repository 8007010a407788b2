"""Convert the original task files and render the local lm-eval task definitions, once."""

from pathlib import Path

from kbit.evaluation.tasks import prepare_tasks
from kbit.logs import setup_logging

log = setup_logging(snakemake.log[0])
data_dir = snakemake.params.data_dir
out = prepare_tasks(
    list(snakemake.params.tasks),
    Path(data_dir) if data_dir else None,
    Path(snakemake.output[0]),
    corpora=dict(snakemake.params.corpora),
)
log.info("task definitions ready at %s", out)
