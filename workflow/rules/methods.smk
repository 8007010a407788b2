"""Inputs of the methods beyond round-to-nearest: calibration tokens, GPTQ, mixed assignments."""


localrules:
    tokens,


rule tokens:
    input:
        model=model_dir,
    output:
        f"{R}/tokens/{{model}}/{{purpose}}.safetensors",
    log:
        f"{R}/logs/tokens/{{model}}/{{purpose}}.log",
    wildcard_constraints:
        purpose="gptq|mixed|landscape",
    conda:
        "../../environment.yml"
    params:
        settings=lambda wildcards: STUDY.token_settings(wildcards.purpose),
        data_dir=STUDY.config["data_dir"],
    script:
        "../scripts/tokens.py"


rule mixed_search:
    input:
        model=model_dir,
        tokens=f"{R}/tokens/{{model}}/mixed.safetensors",
    output:
        f"{R}/mixed/{{model}}/{{quant}}.json",
    log:
        f"{R}/logs/mixed_search/{{model}}/{{quant}}.log",
    wildcard_constraints:
        quant=_alternatives(MIXED_QUANTS),
    conda:
        "../../environment.yml"
    resources:
        gpu=gpu_count,
        mem_mb=mem_mb,
        runtime=runtime_min,
    params:
        quantize=QUANTIZE,
        eval=lambda wildcards: STUDY.eval_settings(wildcards.model).science(),
        batch_size=STUDY.config["quant"]
        .get("mixed", {})
        .get("scoring", {})
        .get("batch_size", 8),
    script:
        "../scripts/mixed_search.py"


if GPTQ_QUANTS and BATCHED:

    rule quantize_batched:
        input:
            model=model_dir,
            tokens=f"{R}/tokens/{{model}}/gptq.safetensors",
        output:
            [quantized_output(f"{R}/quantized/{{model}}/{q}") for q in GPTQ_QUANTS],
        log:
            f"{R}/logs/quantize/{{model}}/gptq-all-specs.log",
        wildcard_constraints:
            model=_alternatives(BATCHED),
        conda:
            "../../environment.yml"
        resources:
            gpu=gpu_count,
            mem_mb=mem_mb,
            runtime=runtime_min,
        params:
            quants=GPTQ_QUANTS,
            quantize=QUANTIZE,
            gptq=STUDY.config["quant"]["gptq"],
            eval=lambda wildcards: STUDY.eval_settings(wildcards.model).science(),
        script:
            "../scripts/quantize.py"
