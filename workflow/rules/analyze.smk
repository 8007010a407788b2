"""Tables, scaling-law fits, the paper's figures and a check of each of its findings."""


localrules:
    lock_models,
    aggregate,
    fit,
    figures,
    claims,


ANALYSIS = STUDY.config["analysis"]


rule lock_models:
    input:
        [STUDY.model_dir(m) for m in MODELS],
    output:
        f"{R}/models.lock.yaml",
    log:
        f"{R}/logs/lock_models.log",
    conda:
        "../../environment.yml"
    params:
        dirs={m: STUDY.model_dir(m) for m in MODELS},
        entries=STUDY.models,
    script:
        "../scripts/lock_models.py"


rule aggregate:
    input:
        evals=ALL_EVALS,
    output:
        scores=report(
            f"{R}/tables/scores.parquet",
            caption="../report/scores.rst",
            category="Tables",
        ),
        runs=report(
            f"{R}/tables/runs.parquet",
            caption="../report/runs.rst",
            category="Tables",
        ),
    log:
        f"{R}/logs/aggregate.log",
    conda:
        "../../environment.yml"
    params:
        accuracy_metrics=ANALYSIS["accuracy_metrics"],
        sweeps=STUDY.sweeps,
        perplexity_cap=ANALYSIS["perplexity_cap"],
    script:
        "../scripts/aggregate.py"


rule fit:
    input:
        scores=f"{R}/tables/scores.parquet",
        evals=ALL_EVALS,
    output:
        curves=f"{R}/laws/curves.parquet",
        fits=f"{R}/laws/fits.parquet",
        optimal=f"{R}/laws/optimal.parquet",
        bootstrap=f"{R}/laws/bootstrap.parquet",
    log:
        f"{R}/logs/fit.log",
    conda:
        "../../environment.yml"
    params:
        n_boot=ANALYSIS["n_boot"],
        seed=ANALYSIS["seed"],
        accuracy_metrics=ANALYSIS["accuracy_metrics"],
    script:
        "../scripts/fit.py"


rule figures:
    input:
        scores=f"{R}/tables/scores.parquet",
        curves=f"{R}/laws/curves.parquet",
        fits=f"{R}/laws/fits.parquet",
        optimal=f"{R}/laws/optimal.parquet",
        bootstrap=f"{R}/laws/bootstrap.parquet",
    output:
        dir=report(
            directory(f"{R}/figures"),
            patterns=["{name}.png"],
            caption="../report/figures.rst",
            category="Figures",
        ),
        index=f"{R}/figures.md",
    log:
        f"{R}/logs/figures.log",
    conda:
        "../../environment.yml"
    script:
        "../scripts/figures.py"


rule claims:
    input:
        scores=f"{R}/tables/scores.parquet",
        curves=f"{R}/laws/curves.parquet",
        fits=f"{R}/laws/fits.parquet",
        optimal=f"{R}/laws/optimal.parquet",
        bootstrap=f"{R}/laws/bootstrap.parquet",
    output:
        report(f"{R}/claims.md", caption="../report/claims.rst", category="Claims"),
    log:
        f"{R}/logs/claims.log",
    conda:
        "../../environment.yml"
    script:
        "../scripts/claims.py"
