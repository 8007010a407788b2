"""All (quant, task) pairs of one model in one job: the model is loaded once, requests reused.

Each finished file goes to a cache keyed by the settings (kbit.evaluation.resume) before it is
copied to its output, so a killed job resumes where it stopped although Snakemake deletes the
outputs of the jobs it restarts.
"""

from pathlib import Path

from kbit.evaluation.batching import read_batch_size
from kbit.evaluation.resume import cache_key, publish
from kbit.evaluation.runner import evaluate_specs, load_prepared_tasks, quant_options, task_limits
from kbit.logs import setup_logging

log = setup_logging(snakemake.log[0])
settings = dict(snakemake.params.eval)
quants, tasks = list(snakemake.params.quants), list(snakemake.params.tasks)
pairs = [(q, t) for q in quants for t in tasks]
outputs = list(snakemake.output)
if len(outputs) != len(pairs):
    raise ValueError(f"{len(outputs)} outputs for {len(pairs)} (quant, task) pairs")
batch_size = read_batch_size(snakemake.input.batch_size)
quant_kwargs = quant_options(snakemake.params.get("quantize"))
meta = dict(snakemake.params.model_meta)
key = cache_key(
    {"meta": meta, "eval": settings, "batch_size": batch_size, "quantize": quant_kwargs},
    snakemake.input.tasks,
)
cache = Path(snakemake.params.cache) / key
written = evaluate_specs(
    model_dir=snakemake.input.model,
    specs=quants,
    task_dict=load_prepared_tasks(tasks, snakemake.input.tasks),
    out_paths={(q, t): cache / q / f"{t}.parquet" for q, t in pairs},
    model_meta=meta,
    dtype=settings.get("dtype", "auto"),
    device=settings.get("device", "auto"),
    softmax_dtype=settings.get("softmax_dtype", "float32"),
    batch_size=batch_size,
    limit=task_limits(settings, tasks),
    quant_kwargs=quant_kwargs,
)
for (q, t), out in zip(pairs, outputs, strict=True):
    publish(cache / q / f"{t}.parquet", out)
log.info("%d of %d files evaluated, the rest found in %s", len(written), len(pairs), cache)
