"""Packed artifacts of one model: one spec (a large model's job) or every GPTQ spec of a small
model (loaded once, its weights restored between specs)."""

from kbit.logs import job
from kbit.artifact import write_artifact
from kbit.calibration import read_tokens
from kbit.loading import load_model
from kbit.mixed import Assignment
from kbit.model_quant import WeightSnapshot
from kbit.settings import QuantizeOptions
from kbit.study import build_study

with job(snakemake) as log:
    model_key = snakemake.wildcards.model
    study = build_study(snakemake.config)
    settings = study.eval_settings(model_key)
    trust = bool(study.models[model_key].get("trust_remote_code", False))
    model, _ = load_model(snakemake.input.model, settings.dtype, settings.device, trust, model_key)
    tokens_file = snakemake.input.get("tokens")
    tokens = read_tokens(tokens_file)[0] if tokens_file else None
    assignment_file = snakemake.input.get("assignment")
    assignment = Assignment.read(assignment_file) if assignment_file else None
    original = WeightSnapshot(model)
    for quant, out in zip(snakemake.params.quants, snakemake.output, strict=True):
        original.restore(model)
        meta = write_artifact(
            model,
            snakemake.input.model,
            quant,
            out,
            options=QuantizeOptions.from_config(snakemake.params.quantize),
            calibration=tokens,
            gptq=snakemake.params.gptq,
            assignment=assignment,
            settings={"load_dtype": str(model.dtype), "device": str(model.device)},
        )
        log.info("wrote %s: %s", out, meta["summary"])
