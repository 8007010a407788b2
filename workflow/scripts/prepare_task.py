"""Convert one task's original files (or a corpus) and render its lm-eval definition."""

from pathlib import Path

from kbit.logs import job
from kbit.evaluation.tasks import prepare_task

with job(snakemake) as log:
    data_dir = snakemake.params.data_dir
    out = prepare_task(
        snakemake.params.task,
        Path(data_dir) if data_dir else None,
        Path(snakemake.output.yaml).parent.parent,
        corpus=snakemake.params.corpus,
    )
    log.info("task ready at %s", out)
