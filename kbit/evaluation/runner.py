"""Zero-shot evaluation of (quantized) models with lm-eval, written as per-document Parquet.

Fidelity first: for the unquantized baseline the in-process path gives, digit for digit, what
the command line gives::

    lm_eval --model hf --model_args pretrained=<dir>,dtype=<dtype> --device <device> \\
        --tasks <tasks> --include_path <prepared> --batch_size <N> --log_samples --output_path <out>

The settings that make the two identical (each checked by ``tests/test_fidelity.py``):

- weights: ``AutoModelForCausalLM.from_pretrained(dir, dtype=<dtype>)`` from safetensors, the
  same call ``HFLM`` makes for a path; ``dtype`` names the same torch dtype on both sides
  ("auto" here means float16 on CUDA and float32 on the CPU, so pass that dtype to the CLI);
- tokenizer: ``AutoTokenizer.from_pretrained(dir, use_fast=True)`` (HFLM's default), handed to
  ``HFLM(pretrained=model, tokenizer=tok, batch_size=N)``; HFLM then sets the pad token the same
  way (``configure_pad_token``), and leaves ``add_bos_token``/``prefix_token_id`` at None;
- the context window: ``eval.max_length`` is HFLM's ``max_length`` model argument (null: HFLM's
  own choice from the model config; pass the same ``max_length=N`` in ``--model_args``);
- HFLM defaults everywhere else: ``truncation=False``,
  ``logits_cache=True`` (one forward row for choices that differ only in their last token),
  no mixed precision, right padding of the length-sorted batches;
- the log-softmax dtype: ``eval.softmax_dtype`` (default ``float32``, so that 16-bit models
  score in float32 like the paper's evaluation; pass ``softmax_dtype=float32`` in the CLI's
  ``--model_args``) or ``auto`` (the model's dtype, HFLM's default);
- the same integer batch size (never "auto": the batch composition changes the padded shapes
  and with them the last bits of the matrix products);
- the same set of tasks in one ``evaluate`` call (lm-eval pools the requests of all tasks of one
  request type into one sorted list, so batches mix tasks); one task per job matches
  ``lm_eval --tasks <task>`` by construction (per-task runs also matched a five-task CLI run on
  the CPU and on an H100, but padded shapes could differ in the last bit elsewhere);
- ``simple_evaluate``'s task set-up: ``num_fewshot`` 0 where unset, fewshot seed 1234, and the
  seeds random 0 / numpy 1234 / torch 1234 (none of which changes a zero-shot log-likelihood).

Speed: :func:`evaluate_specs` loads a base model once and evaluates many quantization configs,
restoring the original weights before each, building lm-eval's requests once per task and
tokenizing each request once, in batches, before any scoring starts
(:class:`~kbit.evaluation.lm.ScoringLM`), and planning its batches once. Host work the device would
wait for is kept small: prompt templates compile once (:mod:`~kbit.evaluation.speed.templates`),
documents are read once per task, and the long-lived objects are frozen out of the garbage
collector's scans (``benchmarks/bench_host.py`` measures each). Both paths score either through
HFLM's own ``_loglikelihood_tokens`` (``eval.fast_scoring: false``) or through its
re-implementation in :mod:`kbit.evaluation.speed`: the same batches, forward passes and per-request
arithmetic (so the same bits), with the log-softmax taken only on scored rows and no host sync per
request. The settings that decide the bits on a given device: the batch size (fixed per model;
``auto`` searches once per model for the largest that lm-eval's own HFLM fits, so the command line
can reproduce it), the model dtype, the log-softmax dtype (HFLM's ``softmax_dtype``, default: the
model's dtype) and the task pooling of one ``evaluate`` call (above).

FLOP convention: ``flops = 2 * P_matmul * T`` where ``P_matmul`` counts the weights of every
linear layer (attention, MLP and the LM head; not the embedding lookups, biases or norms) and
``T`` the unpadded tokens fed through the model; attention-score FLOPs are not counted.
"""

from __future__ import annotations

import gc
import logging
import os
import random
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import transformers

from kbit.evaluation.lm import ScoringLM, make_lm
from kbit.evaluation.metrics import task_metrics
from kbit.evaluation.progress import Progress
from kbit.evaluation.records import samples_frame, write_parquet
from kbit.evaluation.speed import templates
from kbit.loading import load_model
from kbit.settings import EvalSettings, QuantizeOptions
from kbit.spec import QuantSpec

log = logging.getLogger("kbit.evaluation")

#: seeds simple_evaluate (and so the CLI) sets before evaluating
CLI_SEEDS = {"random": 0, "numpy": 1234, "torch": 1234, "fewshot": 1234}


def matmul_params(model: torch.nn.Module) -> int:
    """Weights of every linear layer (incl. the LM head): the P of ``flops = 2 * P * tokens``."""
    from transformers.pytorch_utils import Conv1D

    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear | Conv1D) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            total += module.weight.numel()
    return total


def versions() -> dict[str, str]:
    """Versions of the software that produced a result (stored with every row)."""
    import lm_eval

    import kbit

    return {
        "kbit_version": kbit.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
    }


def lm_for(
    model: torch.nn.Module, tokenizer: Any, batch_size: int, settings: EvalSettings, **options: Any
) -> ScoringLM:
    """The scoring LM of ``settings`` (log-softmax dtype, context window, fast or plain path)."""
    return make_lm(
        model,
        tokenizer,
        batch_size,
        settings.softmax_dtype,
        max_length=settings.max_length,
        fast=settings.fast_scoring,
        **options,
    )


# ---------------------------------------------------------------------- task set-up
def configure_like_cli(task_dict: Mapping[str, Any]) -> None:
    """Apply simple_evaluate's task set-up and seeds, so ``evaluate`` matches the CLI.

    Also makes lm-eval compile each prompt template once (:mod:`kbit.evaluation.speed.templates`;
    same prompts, less host time per document).
    """
    templates.install()
    random.seed(CLI_SEEDS["random"])
    np.random.seed(CLI_SEEDS["numpy"])
    torch.manual_seed(CLI_SEEDS["torch"])
    for task in task_dict["tasks"].values():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=CLI_SEEDS["fewshot"])


#: documents per task: one number for every task, or task name -> number (None: all of them)
Limit = int | Mapping[str, int | None] | None


def limit_for(limit: Limit, task: str) -> int | None:
    """The document limit of one task under ``limit`` (see :data:`Limit`)."""
    return limit.get(task) if isinstance(limit, Mapping) else limit


def _check_tasks(task_dict: Mapping[str, Any]) -> None:
    if "tasks" not in task_dict:
        raise ValueError("task_dict must be lm-eval's TaskManager.load() result (key 'tasks')")
    bad = {
        name: t.OUTPUT_TYPE
        for name, t in task_dict["tasks"].items()
        if t.OUTPUT_TYPE not in ("multiple_choice", "loglikelihood", "loglikelihood_rolling")
    }
    if bad:
        raise ValueError(
            f"tasks {bad} are generative; supported output types are multiple_choice, "
            "loglikelihood, loglikelihood_rolling"
        )


@dataclass
class TaskResult:
    """Per-document rows of one task (without run metadata) and how long they took."""

    name: str
    output_type: str
    docs: pd.DataFrame
    wall_time_s: float
    forward_tokens: int
    forward_time_s: float = 0.0
    reported: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------- path A: lm-eval's evaluate
def evaluate_tasks(
    lm: ScoringLM,
    task_dict: Mapping[str, Any],
    limit: Limit = None,
    together: bool = False,
    progress: Progress | None = None,
) -> dict[str, TaskResult]:
    """Run ``lm_eval.evaluator.evaluate(..., log_samples=True)``; return per-document rows.

    ``together=True`` evaluates all tasks in one call, as one ``lm_eval --tasks a,b,c`` does
    (batches then mix tasks, and each task's wall time is that of the whole call); otherwise
    each task is evaluated on its own, as ``lm_eval --tasks a`` does.
    """
    from lm_eval.evaluator import evaluate

    _check_tasks(task_dict)
    configure_like_cli(task_dict)
    tasks = dict(task_dict["tasks"])
    groups = [list(tasks)] if together else [[name] for name in tasks]
    out: dict[str, TaskResult] = {}
    lm.progress = progress
    for names in groups:
        sub = {"tasks": {n: tasks[n] for n in names}, "groups": {}, "group_map": {}}
        if progress is not None:
            progress.start_task(",".join(names))
        lm.reset_counters()
        t0 = time.perf_counter()
        limits = {limit_for(limit, n) for n in names}
        if len(limits) > 1:
            raise ValueError(f"tasks evaluated together need one limit, got {limit}")
        res = evaluate(
            lm=lm, task_dict=sub, limit=limits.pop(), bootstrap_iters=0, log_samples=True
        )
        _sync(lm)
        wall = time.perf_counter() - t0
        if progress is not None:
            progress.end_task()
        for n in names:
            task = tasks[n]
            docs = samples_frame(task, res["samples"][n], {}, lm.request_tokens)
            reported = {
                k.split(",")[0]: float(v)
                for k, v in res["results"][n].items()
                if k.endswith(",none") and "_stderr" not in k
            }
            out[n] = TaskResult(
                n, task.OUTPUT_TYPE, docs, wall, lm.forward_tokens, lm.forward_time_s, reported
            )
    lm.progress = None
    return out


def _sync(lm: ScoringLM) -> None:
    if lm.device.type == "cuda":
        torch.cuda.synchronize(lm.device)


# ---------------------------------------------------------------------- path B: request reuse
class PreparedTask:
    """One lm-eval task whose requests are built once and scored for many weight configs."""

    def __init__(
        self, name: str, task: Any, limit: int | None, lm: ScoringLM | None = None
    ) -> None:
        """Build the requests of the first ``limit`` documents; with ``lm``, tokenize them."""
        from lm_eval.evaluator_utils import get_sample_size

        self.name = name
        self.task = task
        self.limit = get_sample_size(task, limit)
        task.build_all_requests(limit=self.limit, rank=0, world_size=1)
        self.by_doc: dict[int, list[Any]] = defaultdict(list)
        for inst in task.instances:
            self.by_doc[inst.doc_id].append(inst)
        for insts in self.by_doc.values():
            insts.sort(key=lambda x: x.idx)
        # the documents themselves, read once (iterating the dataset re-formats every row)
        self.docs = list(task.doc_iterator(rank=0, limit=self.limit, world_size=1))
        if lm is not None:
            lm.pretokenize(task.instances)

    def score(self, lm: ScoringLM) -> list[dict[str, Any]]:
        """Score every request with ``lm`` and return lm-eval-style logged samples."""
        task = self.task
        by_type: dict[str, list[Any]] = defaultdict(list)
        for inst in task.instances:
            inst.resps = []
            inst.filtered_resps = {}
            by_type[inst.request_type].append(inst)
        with lm.reuse_plans(self):  # same requests every time: collate and plan them once
            for reqtype, reqs in by_type.items():
                cloned = [req for req in reqs for _ in range(req.repeats)]
                for x, req in zip(getattr(lm, reqtype)(cloned), cloned, strict=True):
                    req.resps.append(x)
        task.apply_filters()
        keys = list(task.instances[0].filtered_resps)
        if keys != ["none"]:
            raise ValueError(f"task {self.name!r} has filters {keys}; only 'none' is supported")
        samples = []
        for doc_id, doc in self.docs:
            reqs = self.by_doc[doc_id]
            resps = [req.filtered_resps["none"] for req in reqs]
            metrics = task.process_results(doc, resps)
            samples.append(
                {
                    "doc_id": doc_id,
                    "doc": doc,
                    "arguments": [req.args for req in reqs],
                    "filtered_resps": resps,
                    **metrics,
                }
            )
        return samples


def score_prepared(
    lm: ScoringLM, prepared: PreparedTask, progress: Progress | None = None
) -> TaskResult:
    """Score one prepared task (same numerics as :func:`evaluate_tasks` on that task alone)."""
    lm.progress = progress
    if progress is not None:
        progress.start_task(prepared.name)
    lm.reset_counters()
    t0 = time.perf_counter()
    samples = prepared.score(lm)
    _sync(lm)
    wall = time.perf_counter() - t0
    if progress is not None:
        progress.end_task()
    lm.progress = None
    docs = samples_frame(prepared.task, samples, {}, lm.request_tokens)
    return TaskResult(
        prepared.name, prepared.task.OUTPUT_TYPE, docs, wall, lm.forward_tokens, lm.forward_time_s
    )


# ---------------------------------------------------------------------- metadata + files
def run_metadata(
    model_meta: Mapping[str, Any],
    spec: QuantSpec,
    summary: Mapping[str, Any],
    lm: ScoringLM,
    result: TaskResult,
    n_matmul_params: int,
) -> dict[str, Any]:
    """The run-metadata columns of one (model, quant, task) Parquet file."""
    flops = 2.0 * n_matmul_params * result.forward_tokens
    meta: dict[str, Any] = {
        "model": model_meta.get("model"),
        "hf_id": model_meta.get("hf_id"),
        "revision": model_meta.get("revision"),
        "commit": model_meta.get("commit", ""),
        "family": model_meta.get("family"),
        "n_params": int(summary["n_params"]),
        "n_params_quantized": int(summary["n_params_quantized"]),
        "total_bits": int(summary["total_bits"]),
        **spec.to_dict(),
        "task": result.name,
        "output_type": result.output_type,
        **versions(),
        "eval_dtype": str(lm.model.dtype).removeprefix("torch."),
        "softmax_dtype": (
            "float32"  # windows always take a float32 log-softmax
            if result.output_type == "perplexity_windows"
            else str(lm.softmax_dtype or lm.model.dtype).removeprefix("torch.")
        ),
        "device": str(lm.device),
        "batch_size": int(lm.batch_size),
        "max_length": int(lm.max_length),
        "wall_time_s": float(result.wall_time_s),
        "forward_time_s": float(result.forward_time_s),
        "task_n_tokens": int(result.forward_tokens),
        "flops": flops,
        "flop_per_s": flops / result.wall_time_s if result.wall_time_s > 0 else float("nan"),
    }
    return meta


def task_frame(result: TaskResult, meta: Mapping[str, Any]) -> pd.DataFrame:
    """Per-document rows with the run metadata broadcast into columns."""
    df = result.docs.copy()
    for key, value in meta.items():
        df[key] = [value] * len(df)
    return df


@dataclass
class MethodInputs:
    """What methods other than round-to-nearest need: GPTQ's calibration tokens and settings,
    and the assignment file of each mixed spec (quant id -> JSON path)."""

    calibration: torch.Tensor | None = None
    gptq: Mapping[str, Any] = field(default_factory=dict)
    assignments: Mapping[str, str | os.PathLike] = field(default_factory=dict)

    def quantize(self, model: torch.nn.Module, spec: QuantSpec, options: QuantizeOptions) -> dict:
        """Quantize ``model`` in place with ``spec``; its bit summary."""
        from kbit.methods import quantize_with

        assignment = None
        if spec.id in self.assignments:
            from kbit.mixed import Assignment

            assignment = Assignment.read(self.assignments[spec.id])
        done = quantize_with(
            model,
            spec,
            options,
            calibration=self.calibration,
            gptq=self.gptq,
            assignment=assignment,
        )
        return done.summary


def evaluate_one(
    model_dir: str | os.PathLike,
    quant: str | QuantSpec,
    task_dict: Mapping[str, Any],
    out_path: str | os.PathLike,
    model_meta: Mapping[str, Any],
    *,
    batch_size: int,
    settings: EvalSettings | None = None,
    options: QuantizeOptions | None = None,
    artifact_dir: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
) -> pd.DataFrame:
    """One job: one (model, quant) on the task(s) of ``task_dict`` through lm-eval's evaluate.

    The quantized weights come from ``artifact_dir`` when given (``kbit.artifact``), else from
    quantizing the loaded base model in place with ``options``. With one task the result goes to
    ``out_path``; with several, ``out_path`` is a directory and each task goes to
    ``<task>.parquet``. ``settings`` default to the schema's (:class:`kbit.settings.EvalSettings`).
    """
    settings = settings or EvalSettings.from_config()
    options = options or QuantizeOptions.from_config()
    spec = QuantSpec.parse(quant)
    model, tok = load_model(
        model_dir, settings.dtype, settings.device, trust_remote_code, model_meta.get("model")
    )
    if artifact_dir is not None:
        from kbit.artifact import load_artifact

        summary = dict(load_artifact(artifact_dir, model)["summary"])
    else:
        summary = MethodInputs().quantize(model, spec, options)
    lm = lm_for(model, tok, batch_size, settings)
    n_mm = matmul_params(model)
    names = list(task_dict["tasks"])
    progress = Progress(len(names), label=f"{model_meta.get('model')}/{spec.id}")
    results = evaluate_tasks(lm, task_dict, limit=settings.limits(names), progress=progress)
    frames = []
    for name, res in results.items():
        df = task_frame(res, run_metadata(model_meta, spec, summary, lm, res, n_mm))
        path = Path(out_path) if len(names) == 1 else Path(out_path) / f"{name}.parquet"
        write_parquet(df, path)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def _nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _graph_key(model: torch.nn.Module, batch_size: int) -> str:
    """What CUDA-graph costs depend on: the GPU, the model's shape, dtype and the batch size."""
    cfg = model.config
    gpu = torch.cuda.get_device_name(next(model.parameters()).device)
    shape = [getattr(cfg, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers")]
    vocab = model.get_output_embeddings().weight.shape[0]
    return f"{gpu}|{shape}|vocab {vocab}|{next(model.parameters()).dtype}|batch {batch_size}"


def evaluate_specs(
    model_dir: str | os.PathLike,
    specs: Sequence[str | QuantSpec],
    task_dict: Mapping[str, Any],
    out_paths: Mapping[tuple[str, str], str | os.PathLike],
    model_meta: Mapping[str, Any],
    *,
    batch_size: int,
    settings: EvalSettings | None = None,
    options: QuantizeOptions | None = None,
    trust_remote_code: bool = False,
    artifacts: Mapping[str, str | os.PathLike] | None = None,
    inputs: MethodInputs | None = None,
    lm_options: Mapping[str, Any] | None = None,
    scored_tasks: Mapping[str, Any] | None = None,
) -> dict[tuple[str, str], Path]:
    """Many quantization configs of one model: load once, quantize in place, reuse requests.

    ``out_paths`` maps (quant id, task) to the Parquet file to write. Pairs whose file exists
    are skipped (the run is resumable); a spec with nothing left to do is not even quantized.
    The original weights are restored before each spec, so the order of specs does not matter
    and every file equals what :func:`evaluate_one` writes for that (quant, task). A spec in
    ``artifacts`` takes its weights from that packed artifact (:mod:`kbit.artifact`) instead of
    quantizing in place (GPTQ, mixed assignments, large models quantized in their own job);
    the others are quantized in place with ``inputs`` (calibration tokens, mixed assignments).
    ``scored_tasks`` are tasks that score themselves beside lm-eval's (name -> an object with
    ``score(lm, progress) -> TaskResult``, e.g. :class:`kbit.evaluation.windows.WindowTask`).
    ``lm_options`` go to the fast scoring path (:class:`~kbit.evaluation.speed.scoring.FastLM`).
    On CUDA ``settings.cuda_graphs`` decides whether batches captured as CUDA graphs are replayed
    for later specs: ``auto`` measures what capture costs and saves on this machine
    (:class:`~kbit.evaluation.speed.graphs.GraphPolicy`); every capture is checked against its
    eager pass (exact either way).
    """
    settings = settings or EvalSettings.from_config()
    options = options or QuantizeOptions.from_config()
    _check_tasks(task_dict)
    parsed = [QuantSpec.parse(s) for s in specs]
    scored = dict(scored_tasks or {})
    names = list(task_dict["tasks"]) + [n for n in scored if n not in task_dict["tasks"]]
    missing = [(s.id, t) for s in parsed for t in names if (s.id, t) not in out_paths]
    if missing:
        raise ValueError(f"out_paths has no entry for (quant, task) pairs {missing}")
    todo = {s.id: [t for t in names if not Path(out_paths[(s.id, t)]).exists()] for s in parsed}
    written: dict[tuple[str, str], Path] = {}
    if not any(todo.values()):
        log.info("all %d outputs exist; nothing to evaluate", len(parsed) * len(names))
        return written
    model, tok = load_model(
        model_dir, settings.dtype, settings.device, trust_remote_code, model_meta.get("model")
    )
    from kbit.model_quant import WeightSnapshot

    original = WeightSnapshot(model)  # weights and tying as loaded, restored before each spec
    n_specs = sum(bool(v) for v in todo.values())
    options_lm = dict(lm_options or {})
    from kbit.loading import model_devices

    if len(model_devices(model)) > 1 and settings.fast_scoring:
        options_lm["cuda_graphs"] = False  # a model placed across GPUs is scored eagerly
    lm = lm_for(model, tok, batch_size, settings, **options_lm)
    policy = None
    if settings.fast_scoring and lm.device.type == "cuda" and "cuda_graphs" not in options_lm:
        from kbit.evaluation.speed.graphs import GraphPolicy

        policy = GraphPolicy(settings.cuda_graphs, n_specs, _graph_key(model, batch_size))
    n_mm = matmul_params(model)
    configure_like_cli(task_dict)
    prepared: dict[str, PreparedTask] = {}
    n_jobs = sum(len(v) for v in todo.values())
    progress = Progress(n_jobs, label=str(model_meta.get("model")))
    done_specs = 0
    try:
        for spec in parsed:
            if not todo[spec.id]:
                log.info("%s: all tasks done, skipped", spec.id)
                continue
            graphs = {}
            if policy is not None:
                lm.cuda_graphs = policy.use(done_specs, not lm.graphs_broken)
                if not lm.cuda_graphs:
                    lm.release_graphs()
            t_spec = time.perf_counter()
            original.restore(model)
            if spec.id in (artifacts or {}):
                from kbit.artifact import load_artifact

                summary = dict(load_artifact((artifacts or {})[spec.id], model)["summary"])
            else:
                summary = (inputs or MethodInputs()).quantize(model, spec, options)
            for name in todo[spec.id]:
                progress.label = f"{model_meta.get('model')}/{spec.id}"
                if name in scored:
                    res = scored[name].score(lm, progress)
                else:
                    if name not in prepared:
                        task = task_dict["tasks"][name]
                        prepared[name] = PreparedTask(name, task, settings.limit_for(name), lm)
                        # the model, tasks, requests and token memos live until the end: keep
                        # the garbage collector from rescanning them (0.3 s per spec)
                        gc.freeze()
                    res = score_prepared(lm, prepared[name], progress)
                meta = run_metadata(model_meta, spec, summary, lm, res, n_mm)
                if policy is not None:
                    graphs = {
                        "cuda_graphs": bool(getattr(lm, "cuda_graphs", False)),
                        "graph_capture_s": _nan(policy.capture_s),
                        "graph_saving_s": _nan(policy.saving_s),
                    }
                df = task_frame(res, {**meta, **graphs})
                written[(spec.id, name)] = write_parquet(df, out_paths[(spec.id, name)])
                log.info(
                    "%s %s: %s in %.1f s",
                    spec.id,
                    name,
                    task_metrics(res.docs, res.output_type),
                    res.wall_time_s,
                )
            if policy is not None:
                policy.record(done_specs, time.perf_counter() - t_spec, lm.cuda_graphs)
            done_specs += 1
    finally:
        gc.unfreeze()
    return written
