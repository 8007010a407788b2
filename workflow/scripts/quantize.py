"""Quantize one model with one spec into a packed artifact with its bit accounting."""

from pathlib import Path

from kbit import QuantSpec
from kbit.artifact import quantize_to_artifact
from kbit.logs import setup_logging

log = setup_logging(snakemake.log[0])
settings = snakemake.params.settings
device = snakemake.params.device
if device == "auto":
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
summary = quantize_to_artifact(
    Path(snakemake.input.model),
    QuantSpec.parse(snakemake.params.spec),
    Path(snakemake.output[0]),
    device=device,
    include=settings["include"],
    exclude=settings["exclude"],
    quantize_embeddings=settings["quantize_embeddings"],
    quantize_lm_head=settings["quantize_lm_head"],
)
log.info("wrote %s: %s", snakemake.output[0], summary)
