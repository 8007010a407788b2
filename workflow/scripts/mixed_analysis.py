"""Mixed precision: Delta-PPL against Q_r, Q_r,max per loss budget, both laws, claims, figures."""

import pandas as pd

from kbit.logs import job
from kbit.analysis.claims import render_claims
from kbit.analysis.mixed import check_mixed_claims, make_mixed_figures, mixed_tables
from kbit.io import write_parquet, write_text

with job(snakemake) as log:
    boot = pd.read_parquet(snakemake.input.bootstrap)
    points = boot[boot["kind"] == "point"] if "kind" in boot else None
    tables = mixed_tables(pd.read_parquet(snakemake.input.scores), points)
    out = snakemake.output
    for name, path in (("mixed_curves", out.curves), ("mixed_qrmax", out.qrmax),
                       ("mixed_law1", out.law1), ("mixed_law2", out.law2)):  # fmt: skip
        write_parquet(tables[name], path)
    claims = check_mixed_claims(tables)
    write_text(render_claims(claims), out.claims)
    paths, skipped = make_mixed_figures(tables, out.figures)
    log.info("mixed: %d figure files, skipped %s, claims %s", len(paths), skipped,
             {c.number: c.verdict for c in claims})  # fmt: skip
