"""Predictors of post-quantization quality: validation, importances, laws, ranking check."""

import pandas as pd

from kbit.logs import job
from kbit.analysis.predict import (
    build_feature_table,
    plot_not_enough_data,
    plot_predicted_vs_measured,
    prediction_study,
)
from kbit.io import write_parquet, write_text

with job(snakemake) as log:
    scores = pd.read_parquet(snakemake.input.scores)
    specs = pd.concat([pd.read_parquet(p) for p in snakemake.input.specs], ignore_index=True)
    land = pd.concat([pd.read_parquet(p) for p in snakemake.input.landscape], ignore_index=True)
    table = build_feature_table(scores, specs, land, models=pd.DataFrame(snakemake.params.models))
    write_parquet(table, snakemake.output.table)
    study = prediction_study(
        table, seed=int(snakemake.params.seed), n_estimators=int(snakemake.params.n_estimators)
    )
    out = snakemake.output.table.rsplit("/", 1)[0]
    for name, df in study.tables().items():
        write_parquet(df, f"{out}/{name}.parquet")
    usable = [v for v in study.validations.values() if len(v.predictions)]
    if usable:
        plot_predicted_vs_measured(usable[0], snakemake.output.figure, "forest", False)
    else:
        plot_not_enough_data(snakemake.output.figure, "too few models or families to validate")
    write_text(study.markdown(), snakemake.output.summary)
    log.info("prediction study: %s", study.markdown().splitlines()[:3])
