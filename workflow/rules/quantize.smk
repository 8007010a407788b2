"""Packed k-bit artifacts for models evaluated one job per spec (large models)."""


rule quantize:
    input:
        unpack(method_inputs),
        model=model_dir,
    output:
        quantized_output(f"{R}/quantized/{{model}}/{{quant}}"),
    log:
        f"{R}/logs/quantize/{{model}}/{{quant}}.log",
    wildcard_constraints:
        model=_alternatives(SINGLE),
        quant=_alternatives([q for q in QUANTS if q != "fp16"]),
    conda:
        "../../environment.yml"
    resources:
        gpu=gpu_count_quantize,
        mem_mb=mem_mb,
        runtime=runtime_min,
    params:
        quants=lambda wildcards: [wildcards.quant],
        quantize=QUANTIZE,
        gptq=lambda wildcards: (
            STUDY.config["quant"]["gptq"] if wildcards.quant in GPTQ_QUANTS else None
        ),
        eval=lambda wildcards: STUDY.eval_settings(wildcards.model).science(),
    script:
        "../scripts/quantize.py"
