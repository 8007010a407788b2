"""All (quant, task) pairs of one model in one job: the model is loaded once, requests reused."""

from kbit.evaluation.batching import read_batch_size
from kbit.evaluation.runner import evaluate_specs, load_prepared_tasks, quant_options
from kbit.logs import setup_logging

log = setup_logging(snakemake.log[0])
settings = dict(snakemake.params.eval)
quants, tasks = list(snakemake.params.quants), list(snakemake.params.tasks)
pairs = [(q, t) for q in quants for t in tasks]
outputs = list(snakemake.output)
if len(outputs) != len(pairs):
    raise ValueError(f"{len(outputs)} outputs for {len(pairs)} (quant, task) pairs")
written = evaluate_specs(
    model_dir=snakemake.input.model,
    specs=quants,
    task_dict=load_prepared_tasks(tasks, snakemake.input.tasks),
    out_paths=dict(zip(pairs, outputs, strict=True)),
    model_meta=dict(snakemake.params.model_meta),
    dtype=settings.get("dtype", "auto"),
    device=settings.get("device", "auto"),
    batch_size=read_batch_size(snakemake.input.batch_size),
    limit=settings.get("limit"),
    quant_kwargs=quant_options(snakemake.params.get("quantize")),
)
log.info("%d of %d files written (the rest existed)", len(written), len(pairs))
