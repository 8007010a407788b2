"""Model weights: a pinned hub snapshot (safetensors only), a GGUF conversion or a tiny model."""


localrules:
    download,
    prepare_tasks,


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
        entry=lambda wildcards: STUDY.models[wildcards.model],
    script:
        "../scripts/download.py"


rule prepare_tasks:
    output:
        directory(f"{RES}/tasks"),
    log:
        f"{RES}/logs/prepare_tasks.log",
    conda:
        "../../environment.yml"
    params:
        tasks=STUDY.config["tasks"],
        data_dir=STUDY.config["data_dir"],
        corpora=STUDY.config["corpora"],
    script:
        "../scripts/prepare_tasks.py"
