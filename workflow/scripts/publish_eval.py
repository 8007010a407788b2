"""Publish one (model, quant, task) evaluation file from the cache its job's manifest names."""

from kbit.evaluation.resume import publish
from kbit.logs import job

with job(snakemake, watch=False):
    w = snakemake.wildcards
    publish(snakemake.input[0], w.quant, w.task, snakemake.output[0])
