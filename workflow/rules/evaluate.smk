"""Zero-shot evaluation: one Parquet file per (model, quant, task), one row per document.

Small models (``eval.batched_max_params``) evaluate every spec in one job that loads the model
once; larger ones get one job per (model, spec) that reads the packed artifact and evaluates
every task. Both write each finished (quant, task) file into a cache keyed by everything that
determines it, then a manifest; the per-(model, quant, task) files are published from the cache
by a local rule. So a failed or killed job loses no finished file of any other (model, quant,
task), and a restarted one computes only what is missing.
"""


rule batch_size:
    input:
        model=model_dir,
    output:
        f"{R}/batch/{{model}}.json",
    log:
        f"{R}/logs/batch_size/{{model}}.log",
    conda:
        "../../environment.yml"
    resources:
        gpu=gpu_count,
        mem_mb=mem_mb,
    params:
        eval=lambda wildcards: STUDY.eval_settings(wildcards.model).science(),
        requested=lambda wildcards: STUDY.models[wildcards.model].get(
            "batch_size", STUDY.config["eval"]["batch_size"]
        ),
        trust_remote_code=lambda wildcards: STUDY.models[wildcards.model][
            "trust_remote_code"
        ],
    script:
        "../scripts/batch_size.py"


rule evaluate:
    input:
        unpack(artifact_input),
        model=model_dir,
        tasks=task_inputs(TASKS),
        batch_size=batch_size_input,
    output:
        f"{R}/jobs/{{model}}/{{quant}}.json",
    log:
        f"{R}/logs/evaluate/{{model}}/{{quant}}.log",
    wildcard_constraints:
        model=_alternatives(SINGLE),
    conda:
        "../../environment.yml"
    resources:
        gpu=gpu_count,
        mem_mb=mem_mb,
        runtime=runtime_min,
    params:
        quants=lambda wildcards: [wildcards.quant],
        tasks=TASKS,
        settings=eval_params,
        tasks_dir=f"{RES}/tasks",
        cache=lambda wildcards: f"{R}/cache/evals/{wildcards.model}",
    script:
        "../scripts/evaluate.py"


rule evaluate_batched:
    input:
        unpack(batched_inputs),
        model=model_dir,
        tasks=task_inputs(TASKS),
        batch_size=batch_size_input,
    output:
        f"{R}/jobs/{{model}}/all-specs.json",
    log:
        f"{R}/logs/evaluate/{{model}}/all-specs.log",
    wildcard_constraints:
        model=_alternatives(BATCHED),
    conda:
        "../../environment.yml"
    resources:
        gpu=gpu_count,
        mem_mb=mem_mb,
        runtime=runtime_min,
    params:
        quants=QUANTS,
        tasks=TASKS,
        settings=eval_params,
        tasks_dir=f"{RES}/tasks",
        cache=lambda wildcards: f"{R}/cache/evals/{wildcards.model}",
    script:
        "../scripts/evaluate.py"


localrules:
    publish_eval,


rule publish_eval:
    input:
        manifest_of,
    output:
        [f"{R}/evals/{{model}}/{{quant}}/{t}.parquet" for t in TASKS],
    log:
        f"{R}/logs/publish/{{model}}/{{quant}}.log",
    conda:
        "../../environment.yml"
    params:
        tasks=TASKS,
    script:
        "../scripts/publish_eval.py"
