"""An evaluation job: the (quant, task) pairs of one model into the cache, then its manifest.

Used by both `evaluate` (one spec of a large model, from its packed artifact) and
`evaluate_batched` (every spec of a small model, loaded once).
"""

from pathlib import Path

from kbit.logs import job
from kbit.evaluation.jobs import evaluate_job
from kbit.study import build_study

with job(snakemake) as log:
    quants = list(snakemake.params.quants)
    artifact = snakemake.input.get("artifact")
    # a small model's GPTQ artifacts and mixed assignments (folders and files named by quant id)
    artifacts = {Path(p).name: p for p in snakemake.input.get("artifacts", [])}
    assignments = {Path(p).stem: p for p in snakemake.input.get("assignments", [])}
    if artifact:
        artifacts[quants[0]] = artifact
    evaluate_job(
        build_study(snakemake.config),
        snakemake.wildcards.model,
        quants,
        list(snakemake.params.tasks),
        model_dir=snakemake.input.model,
        batch_size_file=snakemake.input.batch_size,
        tasks_dir=snakemake.params.tasks_dir,
        cache_root=snakemake.params.cache,
        manifest=snakemake.output[0],
        artifacts=artifacts,
        assignments=assignments,
    )
