"""Materialise one model entry as a safetensors model directory (hub, GGUF or tiny)."""

from pathlib import Path

from kbit.logs import job
from kbit.sources import materialise

with job(snakemake) as log:
    out = materialise(snakemake.params.entry, Path(snakemake.output[0]))
    log.info("model ready at %s", out)
