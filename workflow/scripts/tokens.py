"""Calibration (or search-scoring) tokens of one model: its tokenizer over the study's corpus."""

from kbit.logs import job
from kbit.calibration import calibration_tokens, write_tokens
from kbit.loading import load_tokenizer

with job(snakemake) as log:
    settings = dict(snakemake.params.settings)
    tok = load_tokenizer(snakemake.input.model)
    tokens = calibration_tokens(tok, settings, snakemake.params.data_dir)
    write_tokens(tokens, snakemake.output[0], settings)
    log.info("%s tokens %s from %s", snakemake.wildcards.purpose, list(tokens.shape), settings)
