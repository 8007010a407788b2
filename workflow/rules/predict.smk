"""Features of every (model, spec) and of every model's loss landscape, and the predictors of
post-quantization quality fitted on them (kbit.features, kbit.analysis.predict)."""

PREDICT = STUDY.config["predict"]


rule quant_features:
    input:
        unpack(batched_inputs),
        model=model_dir,
        single=lambda wildcards: (
            []
            if STUDY.batched(wildcards.model)
            else [
                f"{R}/quantized/{wildcards.model}/{q}" for q in QUANTS if q != "fp16"
            ]
        ),
    output:
        f"{R}/features/{{model}}/specs.parquet",
    log:
        f"{R}/logs/features/{{model}}/specs.log",
    conda:
        "../../environment.yml"
    resources:
        gpu=gpu_count,
        mem_mb=mem_mb,
    params:
        quants=QUANTS,
        quantize=QUANTIZE,
    script:
        "../scripts/quant_features.py"


rule landscape:
    input:
        model=model_dir,
        tokens=f"{R}/tokens/{{model}}/landscape.safetensors",
    output:
        summary=f"{R}/features/{{model}}/landscape.parquet",
        profile=f"{R}/features/{{model}}/radial_profile.parquet",
    log:
        f"{R}/logs/features/{{model}}/landscape.log",
    conda:
        "../../environment.yml"
    resources:
        gpu=gpu_count,
        mem_mb=mem_mb,
        runtime=runtime_min,
    params:
        landscape=PREDICT["landscape"],
        eval=lambda wildcards: STUDY.eval_settings(wildcards.model).science(),
    script:
        "../scripts/landscape.py"


localrules:
    predict,


rule predict:
    input:
        scores=f"{R}/tables/scores.parquet",
        specs=[f"{R}/features/{m}/specs.parquet" for m in MODELS],
        landscape=[f"{R}/features/{m}/landscape.parquet" for m in MODELS],
    output:
        table=f"{R}/predict/features.parquet",
        summary=report(
            f"{R}/predict/summary.md",
            caption="../report/predict.rst",
            category="Prediction",
        ),
        figure=report(
            f"{R}/predict/predicted_vs_measured.png",
            caption="../report/predict.rst",
            category="Prediction",
        ),
    log:
        f"{R}/logs/predict.log",
    conda:
        "../../environment.yml"
    params:
        models=STUDY.model_table,
        n_estimators=PREDICT["n_estimators"],
        seed=PREDICT["seed"],
    script:
        "../scripts/predict.py"
