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
- HFLM defaults everywhere else: ``max_length`` from the model config, ``truncation=False``,
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
(:class:`~kbit.evaluation.batching.ReusingHFLM`), and planning its batches once. Host work the
device would wait for is kept small: prompt templates compile once
(:mod:`~kbit.evaluation.templates`), documents are read once per task, and the long-lived objects
are frozen out of the garbage collector's scans (``benchmarks/bench_host.py`` measures each). Both
paths score through ``ReusingHFLM``'s re-implementation of HFLM's ``_loglikelihood_tokens``: the
same batches, forward passes and per-request arithmetic (so the same bits, see
``kbit/evaluation/batching.py``), with the log-softmax taken only on scored rows and no host sync
per request. The settings that decide the bits on a given device: the batch size (fixed per model;
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

from kbit.evaluation import templates
from kbit.evaluation.batching import ReusingHFLM, find_batch_size
from kbit.evaluation.metrics import task_metrics
from kbit.evaluation.progress import Progress
from kbit.evaluation.records import samples_frame, write_parquet
from kbit.spec import QuantSpec

log = logging.getLogger("kbit.evaluation")

EVAL_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
#: seeds simple_evaluate (and so the CLI) sets before evaluating
CLI_SEEDS = {"random": 0, "numpy": 1234, "torch": 1234, "fewshot": 1234}


# ---------------------------------------------------------------------- model loading
def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else is used as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use 'cpu'")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` -> float16 on CUDA (the paper's 16-bit inputs), float32 on the CPU."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in EVAL_DTYPES:
        raise ValueError(f"eval dtype {dtype!r}: allowed are 'auto', {sorted(EVAL_DTYPES)}")
    return EVAL_DTYPES[dtype]


def load_model(
    model_dir: str | os.PathLike,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
) -> tuple[torch.nn.Module, Any]:
    """Load a causal LM (safetensors only) and its tokenizer the way ``HFLM`` loads a path."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no model at {model_dir}: config.json is missing")
    if not any(model_dir.glob("*.safetensors")):
        raise FileNotFoundError(
            f"no *.safetensors weights in {model_dir}; only safetensors are loaded (no pickle)"
        )
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(model_dir),
        dtype=torch_dtype,
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
    )
    model.to(dev)
    model.eval()
    tok = transformers.AutoTokenizer.from_pretrained(
        str(model_dir), use_fast=True, trust_remote_code=trust_remote_code
    )
    return model, tok


#: log-softmax dtypes: "auto" is HFLM's default (the model's dtype)
SOFTMAX_DTYPES = ("float32", "auto")


def make_lm(
    model: torch.nn.Module,
    tokenizer: Any,
    batch_size: int,
    softmax_dtype: str = "auto",
    **options: Any,
) -> ReusingHFLM:
    """lm-eval's HFLM around an in-memory model, with HFLM's defaults (see module docstring).

    ``softmax_dtype`` is HFLM's (``float32`` or ``auto``, the model's dtype: what the command
    line does unless ``softmax_dtype=float32`` is in its ``--model_args``). ``options`` go to
    :class:`ReusingHFLM` (``fast_scoring``, ``positions_only``, ``kv_cache``, ``cuda_graphs``).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be a positive integer (no 'auto')")
    if softmax_dtype not in SOFTMAX_DTYPES:
        raise ValueError(f"softmax_dtype={softmax_dtype!r}: allowed are {list(SOFTMAX_DTYPES)}")
    return ReusingHFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        softmax_dtype=None if softmax_dtype == "auto" else softmax_dtype,
        **options,
    )


def choose_batch_size(
    model_dir: str | os.PathLike,
    requested: int | str = "auto",
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    softmax_dtype: str = "auto",
) -> dict[str, Any]:
    """The batch size of one model (``requested`` integer, or ``auto``).

    ``auto`` sizes full-length sequences (the model's ``max_length``, what WikiText's rolling
    windows use), so the result fits every task: a search on CUDA, the CPU default capped by the
    host memory elsewhere. Returns the JSON the evaluation jobs read.
    """
    dev = resolve_device(device)
    info: dict[str, Any] = {"device": str(dev), "requested": requested}
    if requested != "auto":
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"batch_size={requested!r}: allowed are 'auto' or an integer >= 1")
        return info | {"batch_size": requested, "source": "config"}
    model, tok = load_model(model_dir, dtype, device, trust_remote_code)
    lm = make_lm(model, tok, 1, softmax_dtype)
    bs = find_batch_size(model, lm.max_length, dev, softmax_dtype=lm.softmax_dtype)
    source = "search" if dev.type == "cuda" else "cpu default, memory-capped"
    return info | {"batch_size": bs, "source": source, "max_length": lm.max_length}


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


# ---------------------------------------------------------------------- task set-up
def configure_like_cli(task_dict: Mapping[str, Any]) -> None:
    """Apply simple_evaluate's task set-up and seeds, so ``evaluate`` matches the CLI.

    Also makes lm-eval compile each prompt template once (:mod:`kbit.evaluation.templates`;
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


def load_prepared_tasks(task_names: Sequence[str], tasks_dir: str | os.PathLike) -> dict:
    """lm-eval's task dict for ``task_names`` from a directory made by ``prepare_tasks``.

    Names without a rendered ``<name>.yaml`` there fall back to lm-eval's built-in tasks.
    """
    from lm_eval.tasks import TaskManager

    tasks_dir = Path(tasks_dir).resolve()
    if not tasks_dir.is_dir():
        raise FileNotFoundError(f"prepared task directory {tasks_dir} does not exist")
    builtin = [n for n in task_names if not (tasks_dir / f"{n}.yaml").is_file()]
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=bool(builtin))
    loaded = manager.load(list(task_names))
    absent = [n for n in task_names if n not in loaded["tasks"]]
    if absent:
        raise ValueError(f"tasks {absent} are neither in {tasks_dir} nor built into lm-eval")
    return loaded


def quant_options(quantize_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``quantize_model`` keyword arguments of the workflow's ``quantize`` config section."""
    keys = ("include", "exclude", "quantize_embeddings", "quantize_lm_head")
    return {k: quantize_config[k] for k in keys if quantize_config and k in quantize_config}


#: documents per task: one number for every task, or task name -> number (None: all of them)
Limit = int | Mapping[str, int | None] | None


def limit_for(limit: Limit, task: str) -> int | None:
    """The document limit of one task under ``limit`` (see :data:`Limit`)."""
    return limit.get(task) if isinstance(limit, Mapping) else limit


def task_limits(settings: Mapping[str, Any], tasks: Sequence[str]) -> dict[str, int | None]:
    """Per-task limits of the workflow's ``eval`` settings: ``task_limits`` overrides ``limit``.

    Perplexity tasks such as wikitext have few but long documents; limiting them separately
    keeps a quick study's tasks comparable in cost.
    """
    per_task = dict(settings.get("task_limits") or {})
    return {t: per_task.get(t, settings.get("limit")) for t in tasks}


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
    lm: ReusingHFLM,
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


def _sync(lm: ReusingHFLM) -> None:
    if lm.device.type == "cuda":
        torch.cuda.synchronize(lm.device)


# ---------------------------------------------------------------------- path B: request reuse
class PreparedTask:
    """One lm-eval task whose requests are built once and scored for many weight configs."""

    def __init__(
        self, name: str, task: Any, limit: int | None, lm: ReusingHFLM | None = None
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

    def score(self, lm: ReusingHFLM) -> list[dict[str, Any]]:
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
    lm: ReusingHFLM, prepared: PreparedTask, progress: Progress | None = None
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
    lm: ReusingHFLM,
    result: TaskResult,
    n_matmul_params: int,
) -> dict[str, Any]:
    """The run-metadata columns of one (model, quant, task) Parquet file."""
    flops = 2.0 * n_matmul_params * result.forward_tokens
    meta: dict[str, Any] = {
        "model": model_meta.get("model"),
        "hf_id": model_meta.get("hf_id"),
        "revision": model_meta.get("revision"),
        "family": model_meta.get("family"),
        "n_params": int(summary["n_params"]),
        "n_params_quantized": int(summary["n_params_quantized"]),
        "total_bits": int(summary["total_bits"]),
        **spec.to_dict(),
        "task": result.name,
        "output_type": result.output_type,
        **versions(),
        "eval_dtype": str(lm.model.dtype).removeprefix("torch."),
        "softmax_dtype": str(lm.softmax_dtype or lm.model.dtype).removeprefix("torch."),
        "device": str(lm.device),
        "batch_size": int(lm.batch_size),
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


def _summary_after(model: torch.nn.Module, spec: QuantSpec, **quant_kwargs: Any) -> dict:
    from kbit.accounting import summarize
    from kbit.model_quant import quantize_model

    return summarize(quantize_model(model, spec, **quant_kwargs))


def evaluate_one(
    model_dir: str | os.PathLike,
    quant: str | QuantSpec,
    task_dict: Mapping[str, Any],
    out_path: str | os.PathLike,
    model_meta: Mapping[str, Any],
    artifact_dir: str | os.PathLike | None = None,
    dtype: str = "auto",
    device: str = "auto",
    batch_size: int = 8,
    limit: Limit = None,
    trust_remote_code: bool = False,
    quant_kwargs: Mapping[str, Any] | None = None,
    softmax_dtype: str = "auto",
) -> pd.DataFrame:
    """One job: one (model, quant) on the task(s) of ``task_dict`` through lm-eval's evaluate.

    The quantized weights come from ``artifact_dir`` when given (``kbit.artifact``), else from
    quantizing the loaded base model in place. With one task the result goes to ``out_path``;
    with several, ``out_path`` is a directory and each task goes to ``<task>.parquet``.
    """
    spec = QuantSpec.parse(quant)
    model, tok = load_model(model_dir, dtype, device, trust_remote_code)
    if artifact_dir is not None:
        from kbit.artifact import load_artifact

        summary = dict(load_artifact(artifact_dir, model)["summary"])
    else:
        summary = _summary_after(model, spec, **dict(quant_kwargs or {}))
    lm = make_lm(model, tok, batch_size, softmax_dtype)
    n_mm = matmul_params(model)
    names = list(task_dict["tasks"])
    progress = Progress(len(names), label=f"{model_meta.get('model')}/{spec.id}")
    results = evaluate_tasks(lm, task_dict, limit=limit, progress=progress)
    frames = []
    for name, res in results.items():
        df = task_frame(res, run_metadata(model_meta, spec, summary, lm, res, n_mm))
        path = Path(out_path) if len(names) == 1 else Path(out_path) / f"{name}.parquet"
        write_parquet(df, path)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


#: CUDA graphs pay for their capture (and its check) from this many specs of one model on: on
#: an H100 the first spec took 11.3 s longer with graphs and each later one 1.5 s less
#: (Pythia-1.4B shape, 1500 documents per task; 2.5 s and 0.7 s for the 160M shape)
GRAPH_MIN_SPECS = 8


def evaluate_specs(
    model_dir: str | os.PathLike,
    specs: Sequence[str | QuantSpec],
    task_dict: Mapping[str, Any],
    out_paths: Mapping[tuple[str, str], str | os.PathLike],
    model_meta: Mapping[str, Any],
    dtype: str = "auto",
    device: str = "auto",
    batch_size: int = 8,
    limit: Limit = None,
    trust_remote_code: bool = False,
    quant_kwargs: Mapping[str, Any] | None = None,
    softmax_dtype: str = "auto",
    lm_options: Mapping[str, Any] | None = None,
) -> dict[tuple[str, str], Path]:
    """Many quantization configs of one model: load once, quantize in place, reuse requests.

    ``out_paths`` maps (quant id, task) to the Parquet file to write. Pairs whose file exists
    are skipped (the run is resumable); a spec with nothing left to do is not even quantized.
    The original weights are restored before each spec, so the order of specs does not matter
    and every file equals what :func:`evaluate_one` writes for that (quant, task).
    ``lm_options`` go to :class:`ReusingHFLM`. ``cuda_graphs`` defaults to on when at least
    :data:`GRAPH_MIN_SPECS` specs are left to evaluate: the batches captured for the first are
    replayed for the others, and every capture is checked against its eager pass (exact
    either way).
    """
    _check_tasks(task_dict)
    parsed = [QuantSpec.parse(s) for s in specs]
    names = list(task_dict["tasks"])
    missing = [(s.id, t) for s in parsed for t in names if (s.id, t) not in out_paths]
    if missing:
        raise ValueError(f"out_paths has no entry for (quant, task) pairs {missing}")
    todo = {s.id: [t for t in names if not Path(out_paths[(s.id, t)]).exists()] for s in parsed}
    written: dict[tuple[str, str], Path] = {}
    if not any(todo.values()):
        log.info("all %d outputs exist; nothing to evaluate", len(parsed) * len(names))
        return written
    model, tok = load_model(model_dir, dtype, device, trust_remote_code)
    from kbit.model_quant import WeightSnapshot

    original = WeightSnapshot(model)  # weights and tying as loaded, restored before each spec
    n_specs = sum(bool(v) for v in todo.values())
    options = {"cuda_graphs": n_specs >= GRAPH_MIN_SPECS, **dict(lm_options or {})}
    lm = make_lm(model, tok, batch_size, softmax_dtype, **options)
    n_mm = matmul_params(model)
    configure_like_cli(task_dict)
    prepared: dict[str, PreparedTask] = {}
    n_jobs = sum(len(v) for v in todo.values())
    progress = Progress(n_jobs, label=str(model_meta.get("model")))
    try:
        for spec in parsed:
            if not todo[spec.id]:
                log.info("%s: all tasks done, skipped", spec.id)
                continue
            original.restore(model)
            summary = _summary_after(model, spec, **dict(quant_kwargs or {}))
            for name in todo[spec.id]:
                if name not in prepared:
                    task = task_dict["tasks"][name]
                    prepared[name] = PreparedTask(name, task, limit_for(limit, name), lm)
                    # the model, tasks, requests and token memos live until the end: keep the
                    # garbage collector from rescanning them (a full pass took 0.3 s per spec)
                    gc.freeze()
                progress.label = f"{model_meta.get('model')}/{spec.id}"
                res = score_prepared(lm, prepared[name], progress)
                df = task_frame(res, run_metadata(model_meta, spec, summary, lm, res, n_mm))
                written[(spec.id, name)] = write_parquet(df, out_paths[(spec.id, name)])
                log.info(
                    "%s %s: %s in %.1f s",
                    spec.id,
                    name,
                    task_metrics(res.docs, res.output_type),
                    res.wall_time_s,
                )
    finally:
        gc.unfreeze()
    return written
