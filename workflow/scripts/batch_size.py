"""The evaluation batch size of one model, chosen once and read by all its evaluation jobs."""

from kbit.evaluation.batching import write_batch_size
from kbit.evaluation.runner import choose_batch_size
from kbit.logs import setup_logging

log = setup_logging(snakemake.log[0])
settings = dict(snakemake.params.eval)
info = choose_batch_size(
    snakemake.input.model,
    requested=snakemake.params.requested,
    dtype=settings.get("dtype", "auto"),
    device=settings.get("device", "auto"),
    softmax_dtype=settings.get("softmax_dtype", "float32"),
)
write_batch_size(snakemake.output[0], info)
log.info("batch size %s", info)
