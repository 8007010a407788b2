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
        # per-(model, spec) features (SQNR per layer type, counts) joined onto the runs
        features=(
            [f"{R}/features/{m}/specs.parquet" for m in MODELS]
            if STUDY.config["predict"]["enabled"]
            else []
        ),
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
        scores_html=report(
            f"{R}/tables/scores.html",
            caption="../report/scores.rst",
            category="Tables",
        ),
        runs_html=report(
            f"{R}/tables/runs.html",
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
            patterns=["{name}.png", "{name}.html"],
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
        # the mixed-precision tables, for findings M1-M3
        extra=(
            [
                f"{R}/mixed/{name}.parquet"
                for name in ("mixed_curves", "mixed_qrmax", "mixed_law1", "mixed_law2")
            ]
            if MIXED_QUANTS
            else []
        ),
    output:
        md=report(f"{R}/claims.md", caption="../report/claims.rst", category="Claims"),
        html=report(
            f"{R}/claims.html", caption="../report/claims.rst", category="Claims"
        ),
    log:
        f"{R}/logs/claims.log",
    conda:
        "../../environment.yml"
    script:
        "../scripts/claims.py"


if MIXED_QUANTS:

    localrules:
        mixed_analysis,

    rule mixed_analysis:
        input:
            scores=f"{R}/tables/scores.parquet",
            bootstrap=f"{R}/laws/bootstrap.parquet",
        output:
            curves=f"{R}/mixed/mixed_curves.parquet",
            qrmax=f"{R}/mixed/mixed_qrmax.parquet",
            law1=f"{R}/mixed/mixed_law1.parquet",
            law2=f"{R}/mixed/mixed_law2.parquet",
            claims=report(
                f"{R}/mixed/claims.md",
                caption="../report/mixed.rst",
                category="Mixed precision",
            ),
            figures=report(
                directory(f"{R}/mixed/figures"),
                patterns=["{name}.png"],
                caption="../report/mixed.rst",
                category="Mixed precision",
            ),
        log:
            f"{R}/logs/mixed_analysis.log",
        conda:
            "../../environment.yml"
        script:
            "../scripts/mixed_analysis.py"
