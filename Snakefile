"""k-bit inference scaling laws: download -> quantize -> evaluate -> aggregate -> fit -> figures."""

import sys

from snakemake.exceptions import WorkflowError

from kbit.study import ConfigError, build_study, check_inputs
from kbit.workdir import claim

# The default study, unless the command line names its own (--configfile replaces it rather
# than being merged into it, so a smaller study never inherits the default's models).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


# A run that executes jobs (not a dry run, lint or report) also checks the hub can be reached
# when the study needs it.
_NO_JOBS = {"--dry-run", "--dryrun", "--report", "--lint", "--unlock", "--summary",
            "--detailed-summary", "--list-rules", "--dag", "--rulegraph", "--filegraph",
            "--touch", "--cleanup-metadata", "--list-changes", "--containerize"}  # fmt: skip
_dry = (
    any(
        a in _NO_JOBS or (a[:1] == "-" and a[1:2] != "-" and "n" in a)
        for a in sys.argv[1:]
    )
    and "--report-after-run" not in sys.argv
)

try:
    STUDY = build_study(config)
    check_inputs(STUDY, network=workflow.is_main_process and not _dry)
except ConfigError as err:
    raise WorkflowError(str(err)) from None
# jobs read the validated config, defaults filled from the schema (the one place they live)
config.clear()
config.update(STUDY.config)

R = STUDY.results
RES = STUDY.resources

# A run that executes jobs owns the working directory: a lock left by a killed run is cleared,
# with its partial files; a live run's lock stops this one (kbit/workdir.py).
if workflow.is_main_process and not _dry:
    try:
        for line in claim(".", [R, RES]):
            print(f"kbit: {line}", file=sys.stderr)
    except RuntimeError as err:
        raise WorkflowError(str(err)) from None


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/methods.smk"
include: "workflow/rules/quantize.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/analyze.smk"
include: "workflow/rules/predict.smk"


rule all:
    default_target: True
    input:
        f"{R}/tables/scores.parquet",
        f"{R}/tables/runs.parquet",
        f"{R}/figures.md",
        f"{R}/claims.md",
        f"{R}/models.lock.yaml",
        STUDY.extra_targets,
