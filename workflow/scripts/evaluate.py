"""One evaluation job: one (model, quant, task) -> one Parquet file, one row per document."""

from kbit.evaluation.batching import read_batch_size
from kbit.evaluation.runner import evaluate_one, load_prepared_tasks, quant_options, task_limits
from kbit.logs import setup_logging

log = setup_logging(snakemake.log[0])
settings = dict(snakemake.params.eval)
task = snakemake.params.task
df = evaluate_one(
    model_dir=snakemake.input.model,
    quant=snakemake.params.quant,
    task_dict=load_prepared_tasks([task], snakemake.input.tasks),
    out_path=snakemake.output[0],
    model_meta=dict(snakemake.params.model_meta),
    artifact_dir=snakemake.input.get("artifact"),
    dtype=settings.get("dtype", "auto"),
    device=settings.get("device", "auto"),
    softmax_dtype=settings.get("softmax_dtype", "float32"),
    batch_size=read_batch_size(snakemake.input.batch_size),
    limit=task_limits(settings, [task])[task],
    quant_kwargs=quant_options(snakemake.params.get("quantize")),
)
log.info("%s: %d documents written to %s", task, len(df), snakemake.output[0])
