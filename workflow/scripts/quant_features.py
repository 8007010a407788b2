"""Features of every quantized spec of one model: counts, SQNR per layer type, format fields."""

from pathlib import Path

import pandas as pd

from kbit.logs import job
from kbit.features import spec_feature_rows
from kbit.io import write_parquet
from kbit.loading import load_model
from kbit.settings import QuantizeOptions
from kbit.study import build_study

with job(snakemake) as log:
    model_key = snakemake.wildcards.model
    study = build_study(snakemake.config)
    settings = study.eval_settings(model_key)
    model, _ = load_model(snakemake.input.model, settings.dtype, settings.device, what=model_key)
    folders = [*snakemake.input.get("artifacts", []), *snakemake.input.get("single", [])]
    rows = spec_feature_rows(
        model,
        list(snakemake.params.quants),
        QuantizeOptions.from_config(snakemake.params.quantize).kwargs(),
        artifacts={Path(p).name: p for p in folders},
        assignments={Path(p).stem: p for p in snakemake.input.get("assignments", [])},
    )
    write_parquet(pd.DataFrame(rows).assign(model=model_key), snakemake.output[0])
    log.info("%d spec feature rows", len(rows))
