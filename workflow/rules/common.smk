"""Shared helpers of the rules: model lists, wildcard constraints, job sizing, inputs."""


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
#: tasks with local definitions prepared from files (the others are lm-eval's hub tasks)
LOCAL_TASKS = STUDY.local_tasks
QUANTIZE = STUDY.quantize_options.science()
GPTQ_QUANTS = STUDY.gptq_quants
MIXED_QUANTS = STUDY.mixed_quants


wildcard_constraints:
    model=_alternatives(MODELS),
    quant=_alternatives(QUANTS),
    task=_alternatives(TASKS),


def model_dir(wildcards):
    return STUDY.model_dir(wildcards.model)


def task_sources(wildcards):
    """The original files a local task is prepared from (a data-dir task or a corpus), as
    ancient inputs: new timestamps alone (a copied data folder) redo nothing; a change of
    their contents stops the run before any job (``kbit.study._source_problems``)."""
    return [ancient(p) for p in STUDY.task_sources(wildcards.task)]


def task_inputs(tasks):
    """The prepared files of the local ``tasks`` (one folder per task)."""
    return [f"{RES}/tasks/{t}/{t}.yaml" for t in tasks if t in LOCAL_TASKS]


def gpu_count(wildcards, weight_copies=2):
    """GPUs of a job: none when pinned to the CPU, else what the model's weights need (the
    evaluation keeps a copy of the original weights to restore between specs)."""
    if STUDY.config["eval"]["device"] == "cpu":
        return 0
    from kbit.devices import gpus_needed

    return gpus_needed(
        STUDY.params(wildcards.model),
        STUDY.config["eval"]["dtype"],
        int(STUDY.config["eval"]["gpu_memory_gb"] * 2**30),
        weight_copies=weight_copies,
    )


def gpu_count_quantize(wildcards):
    return gpu_count(wildcards, weight_copies=1)


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


def eval_params(wildcards, tasks=TASKS):
    """What changes an evaluation's scores: model identity, eval settings, quantize options."""
    return {
        "model_meta": STUDY.model_meta(wildcards.model),
        "eval": STUDY.eval_settings(wildcards.model).science(tasks),
        "quantize": QUANTIZE,
        "trust_remote_code": STUDY.models[wildcards.model]["trust_remote_code"],
    }


def artifact_input(wildcards):
    if wildcards.quant == "fp16":
        return {}
    return {"artifact": f"{R}/quantized/{wildcards.model}/{wildcards.quant}"}


def method_inputs(wildcards):
    """What quantizing a spec needs beyond the model: GPTQ's calibration tokens, or the
    assignment a mixed spec's search chose."""
    if wildcards.quant in GPTQ_QUANTS:
        return {"tokens": f"{R}/tokens/{wildcards.model}/gptq.safetensors"}
    if wildcards.quant in MIXED_QUANTS:
        return {"assignment": f"{R}/mixed/{wildcards.model}/{wildcards.quant}.json"}
    return {}


def batched_inputs(wildcards):
    """Inputs of a small model's batched evaluation beyond the model: its GPTQ artifacts and the
    assignments of its mixed specs (round-to-nearest specs are quantized in the job)."""
    m = wildcards.model
    return {
        "artifacts": [f"{R}/quantized/{m}/{q}" for q in GPTQ_QUANTS],
        "assignments": [f"{R}/mixed/{m}/{q}.json" for q in MIXED_QUANTS],
    }


def batch_size_input(wildcards):
    return f"{R}/batch/{wildcards.model}.json"


def manifest_of(wildcards):
    """The evaluation job whose manifest lists this (model, quant, task) file."""
    if STUDY.batched(wildcards.model):
        return f"{R}/jobs/{wildcards.model}/all-specs.json"
    return f"{R}/jobs/{wildcards.model}/{wildcards.quant}.json"
