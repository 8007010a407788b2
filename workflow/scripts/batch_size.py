"""The evaluation batch size of one model, chosen once and read by all its evaluation jobs."""

from kbit.logs import job
from kbit.evaluation.batch_size import choose_batch_size, write_batch_size
from kbit.study import build_study

with job(snakemake) as log:
    model = snakemake.wildcards.model
    study = build_study(snakemake.config)
    info = choose_batch_size(
        snakemake.input.model,
        requested=snakemake.params.requested,
        settings=study.eval_settings(model),
        trust_remote_code=snakemake.params.trust_remote_code,
        what=model,
    )
    write_batch_size(snakemake.output[0], info)
    log.info("batch size %s", info)
