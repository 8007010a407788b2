"""Analysis of evaluation results: tables, scaling curves, fits, bootstrap, figures, claims, advice.

Everything here works on plain DataFrames read from Parquet, so it is importable and testable
without Snakemake; the workflow scripts only read inputs, call these functions and write outputs.

==============  ===========================================================================
``tables``      per-document files -> ``scores`` (per metric, plus mean zero-shot) and ``runs``
``curves``      bit-level scaling curves, the main precision sweep, sweeps found by spec fields
``bootstrap``   paired document bootstrap (one resample per task, shared by every run)
``fits``        interpolation, shared base + offsets, bivariate power law; optimal precision
``laws``        the fit step in one call (curves, bootstrap, fits, optimal)
``figures``     the paper's figures (PNG + PDF), ``SKIPPED.md`` and the figure index
``claims``      findings 1-11 tested on the run's data, rendered as ``claims.md``
``advise``      best evaluated configuration for a memory budget / fewest bits for an accuracy
==============  ===========================================================================
"""
