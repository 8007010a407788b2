"""Model weights (a pinned hub snapshot, a GGUF conversion or a tiny model) and task data."""


localrules:
    download,
    prepare_task,


rule download:
    output:
        directory(f"{RES}/models/{{model}}"),
    log:
        f"{RES}/logs/download/{{model}}.log",
    wildcard_constraints:
        model=_alternatives(FETCHED),
    conda:
        "../../environment.yml"
    params:
        entry=lambda wildcards: STUDY.download_entry(wildcards.model),
    script:
        "../scripts/download.py"


rule prepare_task:
    input:
        task_sources,
    output:
        yaml=f"{RES}/tasks/{{task}}/{{task}}.yaml",
        data=f"{RES}/tasks/{{task}}/{{task}}.jsonl",
    log:
        f"{RES}/logs/prepare_task/{{task}}.log",
    wildcard_constraints:
        task=_alternatives(LOCAL_TASKS),
    conda:
        "../../environment.yml"
    params:
        task=lambda wildcards: wildcards.task,
        data_dir=STUDY.config["data_dir"],
        corpus=lambda wildcards: STUDY.config["corpora"].get(wildcards.task),
    script:
        "../scripts/prepare_task.py"
