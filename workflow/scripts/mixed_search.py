"""The search of one mixed-precision spec: which units of the model go to the low format."""

from kbit.logs import job
from kbit.calibration import read_tokens
from kbit.loading import load_model
from kbit.mixed import search_assignment
from kbit.settings import QuantizeOptions
from kbit.study import build_study

with job(snakemake) as log:
    model_key = snakemake.wildcards.model
    study = build_study(snakemake.config)
    settings = study.eval_settings(model_key)
    model, _ = load_model(snakemake.input.model, settings.dtype, settings.device, what=model_key)
    tokens, _meta = read_tokens(snakemake.input.tokens)
    assignment = search_assignment(
        model,
        snakemake.wildcards.quant,
        tokens,
        batch_size=int(snakemake.params.batch_size),
        log=log,
        **QuantizeOptions.from_config(snakemake.params.quantize).kwargs(),
    )
    assignment.write(snakemake.output[0])
    log.info("assignment: Q_r %.4f, search perplexity %s", assignment.achieved_ratio,
             assignment.score_perplexity)  # fmt: skip
