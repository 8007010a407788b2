"""The workflow's evaluation jobs: settings from the study, results into the cache, a manifest.

These adapters turn a job's inputs (a model folder, prepared tasks, the model's batch-size file,
packed artifacts) and the validated study into one :func:`~kbit.evaluation.runner.evaluate_specs`
call whose files go to the evaluation cache (:mod:`kbit.evaluation.resume`), so the workflow's
scripts stay a few lines each.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kbit.evaluation.batch_size import read_batch_size
from kbit.evaluation.resume import cache_key, cache_path, write_manifest
from kbit.evaluation.runner import MethodInputs, evaluate_specs
from kbit.evaluation.tasks import load_tasks, task_dir
from kbit.evaluation.windows import DEFAULT_WINDOW, WINDOW_TASKS, window_task
from kbit.sources import SOURCE_FILE
from kbit.study import Study

log = logging.getLogger("kbit.evaluation")


def model_provenance(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The resolved commit of a downloaded model (``kbit_source.json``), for the tables."""
    path = Path(model_dir) / SOURCE_FILE
    source = json.loads(path.read_text()) if path.is_file() else {}
    return {"commit": source.get("commit") or ""}


def evaluate_job(
    study: Study,
    model: str,
    quants: Sequence[str],
    tasks: Sequence[str],
    *,
    model_dir: str | os.PathLike,
    batch_size_file: str | os.PathLike,
    tasks_dir: str | os.PathLike,
    cache_root: str | os.PathLike,
    manifest: str | os.PathLike,
    artifacts: Mapping[str, str | os.PathLike] | None = None,
    assignments: Mapping[str, str | os.PathLike] | None = None,
) -> dict[tuple[str, str], Path]:
    """Evaluate ``quants`` x ``tasks`` of ``model`` into the cache and write the job's manifest.

    Each (quant, task) file is keyed by the model's identity, the spec, the eval settings that
    change that task's scores, the batch size, the quantization options and the content of the
    task's prepared files (and of the spec's artifact kbit.json or mixed assignment); cached
    files are reused, so only what is missing is computed.
    """
    artifacts, assignments = dict(artifacts or {}), dict(assignments or {})
    settings = study.eval_settings(model)
    options = study.quantize_options
    batch_size = read_batch_size(batch_size_file)
    meta = {**study.model_meta(model), **model_provenance(model_dir)}
    trust = bool(study.models[model].get("trust_remote_code", False))
    data_dir = study.config.get("data_dir")
    windows = [t for t in tasks if t in WINDOW_TASKS]
    files: dict[tuple[str, str], Path] = {}
    for q in quants:
        for t in tasks:
            prepared = task_dir(tasks_dir, t)
            if t in windows:  # scores itself from the original file: key on that file
                prepared = Path(data_dir) / WINDOW_TASKS[t][0] if data_dir else Path("/hub")
            key = cache_key(
                {
                    "meta": meta,
                    "quant": q,
                    "eval": settings.science([t]),
                    "batch_size": batch_size,
                    "quantize": options.science(),
                    "trust_remote_code": trust,
                    "window": DEFAULT_WINDOW if t in windows else None,
                },
                prepared if prepared.exists() else None,
                Path(artifacts[q]) / "kbit.json" if q in artifacts else None,
                assignments.get(q),
            )
            files[(q, t)] = cache_path(cache_root, q, t, key)
    todo = sum(not p.exists() for p in files.values())
    log.info("%s: %d of %d (quant, task) files cached, %d to evaluate", model,
             len(files) - todo, len(files), todo)  # fmt: skip
    if todo:
        rest = [t for t in tasks if t not in windows]
        evaluate_specs(
            model_dir,
            list(quants),
            load_tasks(rest, Path(tasks_dir)) if rest else {"tasks": {}, "groups": {}},
            files,
            meta,
            batch_size=batch_size,
            settings=settings,
            options=options,
            trust_remote_code=trust,
            artifacts=artifacts,
            inputs=MethodInputs(assignments=assignments),
            scored_tasks={t: window_task(t, data_dir, settings.limit_for(t)) for t in windows},
        )
    write_manifest(manifest, model, files)
    return files
