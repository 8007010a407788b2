"""Zero-shot evaluation: one Parquet file per (model, quant, task), one row per document.

Small models (``eval.batched_max_params``) evaluate every spec in one job that loads the model
once; larger ones get one job per (model, quant, task) that reads the packed artifact. Both write
the same files with identical contents.
"""


rule batch_size:
    input:
        model=model_dir,
        tasks=f"{RES}/tasks",
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
        tasks=TASKS,
        eval=eval_settings(),
        requested=lambda wildcards: STUDY.models[wildcards.model].get(
            "batch_size", STUDY.config["eval"]["batch_size"]
        ),
    script:
        "../scripts/batch_size.py"


rule evaluate:
    input:
        unpack(artifact_input),
        model=model_dir,
        tasks=f"{RES}/tasks",
        batch_size=batch_size_input,
    output:
        f"{R}/evals/{{model}}/{{quant}}/{{task}}.parquet",
    log:
        f"{R}/logs/evaluate/{{model}}/{{quant}}/{{task}}.log",
    wildcard_constraints:
        model=_alternatives(SINGLE),
    conda:
        "../../environment.yml"
    resources:
        gpu=gpu_count,
        mem_mb=mem_mb,
        runtime=runtime_min,
    params:
        task=lambda wildcards: wildcards.task,
        quant=lambda wildcards: wildcards.quant,
        model_meta=lambda wildcards: STUDY.model_meta(wildcards.model),
        eval=eval_settings(),
        quantize=STUDY.config["quantize"],
    script:
        "../scripts/evaluate.py"


rule evaluate_batched:
    input:
        model=model_dir,
        tasks=f"{RES}/tasks",
        batch_size=batch_size_input,
    output:
        [f"{R}/evals/{{model}}/{q}/{t}.parquet" for q in QUANTS for t in TASKS],
    log:
        f"{R}/logs/evaluate/{{model}}/batched.log",
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
        cache=lambda wildcards: f"{R}/cache/evals/{wildcards.model}",
        model_meta=lambda wildcards: STUDY.model_meta(wildcards.model),
        eval=eval_settings(),
        quantize=STUDY.config["quantize"],
    script:
        "../scripts/evaluate_batched.py"
