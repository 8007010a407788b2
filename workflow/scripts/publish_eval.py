"""Publish the evaluation files of one (model, quant), every task, from the cache its job's
manifest names (atomic copies)."""

from kbit.logs import job
from kbit.evaluation.resume import publish

with job(snakemake, watch=False):
    w = snakemake.wildcards
    for task, out in zip(snakemake.params.tasks, snakemake.output, strict=True):
        publish(snakemake.input[0], w.quant, task, out)
