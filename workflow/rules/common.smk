"""Shared helpers of the rules: model lists, wildcard constraints, job sizing."""


def _alternatives(names):
    """A regex matching exactly ``names`` (one that matches nothing when the list is empty)."""
    import re

    return "|".join(re.escape(n) for n in names) if names else "(?!x)x"


MODELS = list(STUDY.models)
BATCHED = [m for m in MODELS if STUDY.batched(m)]
SINGLE = [m for m in MODELS if not STUDY.batched(m)]
FETCHED = [m for m in MODELS if "path" not in STUDY.models[m]]
QUANTS = STUDY.quant_ids
TASKS = STUDY.tasks


wildcard_constraints:
    quant=_alternatives(QUANTS),
    task=_alternatives(TASKS),


def model_dir(wildcards):
    return STUDY.model_dir(wildcards.model)


def gpu_count(wildcards):
    """GPU rules ask for one GPU unless the study is pinned to the CPU."""
    return 0 if STUDY.config["eval"]["device"] == "cpu" else 1


def mem_mb(wildcards, attempt):
    """Memory grows with the model (fp32 copy plus the original weights) and with retries."""
    gb = 4 + 12 * STUDY.params(wildcards.model) / 1e9
    return int(1024 * gb * attempt)


def runtime_min(wildcards, attempt):
    """Runtime grows with the model and the number of specs evaluated in the job."""
    n_specs = len(QUANTS) if STUDY.batched(wildcards.model) else 1
    minutes = 20 + 60 * STUDY.params(wildcards.model) / 1e9 * n_specs
    return int(minutes * attempt)


def eval_path(model, quant, task):
    return f"{R}/evals/{model}/{quant}/{task}.parquet"


ALL_EVALS = [eval_path(m, q, t) for m in MODELS for q in QUANTS for t in TASKS]


def quantized_output(path):
    """Artifacts are large and cheap to rebuild: temporary unless the config keeps them."""
    if STUDY.config["quantize"]["keep_artifacts"]:
        return directory(path)
    return temp(directory(path))


def eval_settings():
    keys = ("dtype", "softmax_dtype", "device", "limit", "task_limits")
    return {k: STUDY.config["eval"][k] for k in keys}


def batch_size_input(wildcards):
    return f"{R}/batch/{wildcards.model}.json"


def artifact_input(wildcards):
    if wildcards.quant == "fp16":
        return {}
    return {"artifact": f"{R}/quantized/{wildcards.model}/{wildcards.quant}"}
