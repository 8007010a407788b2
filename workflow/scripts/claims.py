"""Scores + law tables -> claims.md (and claims.html): each finding of the paper tested.

Findings of other modules listed in ``kbit.analysis.claims.FINDING_MODULES`` are loaded first;
``params.findings`` (optional) restricts the check to those names or numbers.
"""

from pathlib import Path

import pandas as pd

from kbit.logs import job
from kbit.analysis.claims import check_claims, load_findings
from kbit.analysis.laws import LAW_NAMES
from kbit.analysis.report import write_claims

with job(snakemake) as log:
    load_findings()
    laws = {name: pd.read_parquet(snakemake.input[name]) for name in LAW_NAMES}
    # tables of other systems (mixed precision), named by their file stems
    for path in snakemake.input.get("extra", []):
        laws[Path(path).stem] = pd.read_parquet(path)
    claims = check_claims(
        pd.read_parquet(snakemake.input.scores),
        laws,
        laws["bootstrap"],
        select=snakemake.params.get("findings") or None,
    )
    write_claims(
        claims, snakemake.output.get("md", snakemake.output[0]), snakemake.output.get("html")
    )
    log.info("claims: %s", {c.number: c.verdict for c in claims})
