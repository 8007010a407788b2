"""Convert one task's original files (or a corpus) and render its lm-eval definition."""

from pathlib import Path

from kbit.evaluation.tasks import prepare_task
from kbit.io import write_json
from kbit.logs import job
from kbit.study import SOURCE_DIGESTS, source_digests

with job(snakemake) as log:
    data_dir = snakemake.params.data_dir
    out = prepare_task(
        snakemake.params.task,
        Path(data_dir) if data_dir else None,
        Path(snakemake.output.yaml).parent.parent,
        corpus=snakemake.params.corpus,
    )
    # what the sources held, so that a later change of their bytes is noticed (their
    # timestamps are ignored: the rule takes them as ancient inputs)
    write_json(
        source_digests(list(snakemake.input)), Path(snakemake.output.yaml).parent / SOURCE_DIGESTS
    )
    log.info("task ready at %s", out)
