"""Scores + law tables -> claims.md: each finding of the paper tested on this run."""

import pandas as pd

from kbit.analysis.claims import check_claims, render_claims
from kbit.analysis.laws import LAW_NAMES
from kbit.io import write_text
from kbit.logs import setup_logging

log = setup_logging(snakemake.log[0])
laws = {name: pd.read_parquet(snakemake.input[name]) for name in LAW_NAMES}
claims = check_claims(pd.read_parquet(snakemake.input.scores), laws, laws["bootstrap"])
write_text(render_claims(claims), snakemake.output[0])
log.info("claims: %s", {c.number: c.verdict for c in claims})
