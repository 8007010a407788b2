"""Loss-landscape features of one model: calibration loss, radial profile, Hessian trace."""

import pandas as pd

from kbit.logs import job
from kbit.calibration import read_tokens
from kbit.features import landscape_features
from kbit.io import write_parquet
from kbit.loading import load_model
from kbit.study import build_study

with job(snakemake) as log:
    model_key = snakemake.wildcards.model
    study = build_study(snakemake.config)
    settings = study.eval_settings(model_key)
    # float32: the perturbations are small against the weights; 16-bit would round them away
    model, _ = load_model(snakemake.input.model, "float32", settings.device, what=model_key)
    tokens, _meta = read_tokens(snakemake.input.tokens)
    p = dict(snakemake.params.landscape)
    land = landscape_features(
        model,
        tokens,
        radii=p["radii"],
        seeds=p["seeds"],
        n_probes=p["n_probes"],
        batch_size=p["batch_size"],
    )
    write_parquet(pd.DataFrame([{"model": model_key, **land.summary}]), snakemake.output.summary)
    write_parquet(land.profile.assign(model=model_key), snakemake.output.profile)
    log.info("landscape of %s: %s", model_key, land.summary)
