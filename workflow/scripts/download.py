"""Materialise one model entry as a safetensors model directory (hub, GGUF or tiny)."""

from pathlib import Path

from kbit.logs import setup_logging
from kbit.sources import build_tiny_model, convert_gguf, download_hub_model

log = setup_logging(snakemake.log[0])
entry = snakemake.params.entry
out = Path(snakemake.output[0])
if "hf_id" in entry:
    log.info("downloading %s@%s", entry["hf_id"], entry["revision"])
    download_hub_model(entry["hf_id"], entry["revision"], out)
elif "gguf" in entry:
    log.info("converting GGUF %s", entry["gguf"])
    convert_gguf(entry["gguf"], out)  # a path or pkg://<package>/<file>
else:
    tiny = dict(entry["tiny"])
    log.info("building tiny %s model", tiny["arch"])
    build_tiny_model(
        tiny.pop("arch"),
        out,
        tokenizer=Path(tiny.pop("tokenizer")) if tiny.get("tokenizer") else None,
        seed=tiny.pop("seed", 0),
        **tiny,
    )
log.info("model ready at %s", out)
