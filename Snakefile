"""k-bit inference scaling laws: download -> quantize -> evaluate -> aggregate -> fit -> figures."""

from snakemake.exceptions import WorkflowError

from kbit.study import ConfigError, build_study

# The default study, unless the command line names its own (--configfile replaces it rather
# than being merged into it, so a smaller study never inherits the default's models).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


try:
    STUDY = build_study(config)
except ConfigError as err:
    raise WorkflowError(str(err)) from None

R = STUDY.results
RES = STUDY.resources


include: "workflow/rules/common.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/quantize.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/analyze.smk"


rule all:
    default_target: True
    input:
        f"{R}/tables/scores.parquet",
        f"{R}/tables/runs.parquet",
        f"{R}/figures.md",
        f"{R}/claims.md",
