"""lm-eval task definitions that evaluate offline from the original released data files.

Two sources for the standard tasks (lambada_openai, piqa, hellaswag, winogrande, wikitext):

- ``data_dir is None``: lm-eval's own tasks, which fetch their data sets from the Hugging Face hub;
- ``data_dir`` given: the local definitions in ``workflow/tasks/*.yaml``. They are lm-eval's task
  configs with ``dataset_path: json`` reading JSONL converted from the original files
  (:mod:`kbit.evaluation.convert`); they reuse lm-eval's installed prompt functions and keep the
  standard task names, so result tables do not depend on where the data came from.

The templates carry the placeholder ``__DATA_DIR__`` because the data location is known only at
run time: :func:`prepare_tasks` converts the originals into a work directory and writes the
rendered YAMLs beside them (absolute ``data_files`` paths). That directory works both here and
with the command line ``lm_eval --include_path <work_dir> --tasks piqa ...``.

Name resolution: lm-eval (0.4.13) indexes its built-in tasks first and then each include path,
and a later definition of a name overrides an earlier one, so the local ``piqa`` replaces the
hub ``piqa`` whenever the rendered directory is on the include path. :func:`build_task_dict`
skips indexing the built-in tasks entirely when every requested task is local (faster, and no
possible ambiguity), and checks that each loaded local task really reads the local file.

User corpora for perplexity (e.g. a Pile CommonCrawl sample named ``pile_cc``) become
``loglikelihood_rolling`` tasks with lm-eval's default word/byte counting
(``len(re.split(r"\\s+", text))`` words, UTF-8 bytes), reported as word_perplexity,
byte_perplexity and bits_per_byte, like lm-eval's ``pile_*`` tasks.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from kbit.evaluation.convert import (
    CORPUS_SPLITS,
    FULL_DOC_COUNTS,
    TASK_FILES,
    DataFileError,
    DataFormatError,
    convert_corpus,
    convert_task,
)
from kbit.io import write_bytes, write_json

__all__ = [
    "FULL_DOC_COUNTS",
    "STANDARD_TASKS",
    "TASK_FILES",
    "DataFileError",
    "DataFormatError",
    "build_task_dict",
    "corpus_task_config",
    "load_tasks",
    "prepare_task",
    "prepare_tasks",
    "prepared_files",
    "render_template",
    "task_dir",
    "task_files",
    "template_dir",
]

log = logging.getLogger(__name__)

#: the zero-shot and perplexity tasks of the paper, by their lm-eval names
STANDARD_TASKS: tuple[str, ...] = tuple(TASK_FILES)

_PLACEHOLDER = "__DATA_DIR__"
_PLACEHOLDER_RE = re.compile(re.escape(_PLACEHOLDER) + r"/(\S+)")
_TASK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_CORPUS_KEYS = {"path", "max_docs", "max_tokens", "tokenizer", "split", "chunk_chars"}


def template_dir() -> Path:
    """Directory of the task YAML templates (``$KBIT_TASK_TEMPLATES`` or ``workflow/tasks``)."""
    env = os.environ.get("KBIT_TASK_TEMPLATES")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "workflow" / "tasks"
    if not path.is_dir():
        raise FileNotFoundError(
            f"task templates not found at {path}; set KBIT_TASK_TEMPLATES to the directory "
            "holding lambada_openai.yaml, piqa.yaml, ... (workflow/tasks in the repository)"
        )
    return path


def task_files(task_names: Sequence[str], data_dir: Path) -> list[Path]:
    """Absolute original files the given standard tasks read (inputs for a workflow rule)."""
    unknown = [t for t in task_names if t not in TASK_FILES]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; local tasks are {list(STANDARD_TASKS)}")
    return [Path(data_dir) / rel for t in task_names for rel in TASK_FILES[t]]


def prepared_files(task_names: Sequence[str], work_dir: Path) -> list[Path]:
    """Files :func:`prepare_tasks` writes for ``task_names``: definition, documents and the
    digests of the original files (:data:`SOURCE_DIGESTS`)."""
    return [
        task_dir(work_dir, t) / name
        for t in task_names
        for name in (f"{t}.yaml", f"{t}.jsonl", SOURCE_DIGESTS)
    ]


def render_template(template: str, data_dir: Path) -> str:
    """Replace ``__DATA_DIR__/<file>`` with the absolute path as a quoted YAML scalar.

    The path is written as a JSON string, which is a valid YAML double-quoted scalar, so any
    character in the path (spaces, colons, quotes) survives.
    """
    base = Path(data_dir).resolve()
    rendered, n = _PLACEHOLDER_RE.subn(lambda m: json.dumps(str(base / m.group(1))), template)
    if n == 0:
        raise ValueError(f"template has no {_PLACEHOLDER}/<file> data path to fill in")
    return rendered


def corpus_task_config(name: str, data_file: Path) -> dict[str, Any]:
    """lm-eval config of a perplexity task over a converted ``{"text"}`` corpus."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(Path(data_file).resolve())}},
        "output_type": "loglikelihood_rolling",
        "test_split": "test",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "should_decontaminate": True,
        "doc_to_decontamination_query": "{{text}}",
        "metric_list": [
            {
                "metric": "word_perplexity",
                "aggregation": "weighted_perplexity",
                "higher_is_better": False,
            },
            {
                "metric": "byte_perplexity",
                "aggregation": "weighted_perplexity",
                "higher_is_better": False,
            },
            {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
        ],
        "metadata": {"version": 1.0},
    }


def _corpus_spec(name: str, spec: Any) -> dict[str, Any]:
    """Normalise a corpus entry: a path, or a mapping with ``path`` and convert_corpus options."""
    if not _TASK_NAME_RE.match(name):
        raise ValueError(
            f"corpus task name {name!r} is invalid: use letters, digits, '_', '-' or '.'"
        )
    if name in STANDARD_TASKS:
        raise ValueError(f"corpus task name {name!r} clashes with a standard task {STANDARD_TASKS}")
    if isinstance(spec, (str, os.PathLike)):
        spec = {"path": spec}
    if not isinstance(spec, Mapping) or "path" not in spec:
        raise ValueError(
            f"corpus {name!r} must be a path or a mapping with 'path' (and optionally "
            f"{sorted(_CORPUS_KEYS - {'path'})}), got {spec!r}"
        )
    extra = set(spec) - _CORPUS_KEYS
    if extra:
        raise ValueError(
            f"corpus {name!r}: unknown key(s) {sorted(extra)}; allowed {sorted(_CORPUS_KEYS)}"
        )
    if spec.get("split", "paragraph") not in CORPUS_SPLITS:
        raise ValueError(f"corpus {name!r}: split {spec['split']!r} is not one of {CORPUS_SPLITS}")
    return dict(spec)


def _split_names(
    task_names: Sequence[str], corpora: Mapping[str, Any] | None
) -> tuple[list[str], list[str], list[str]]:
    """Partition requested names into standard-local, corpus and hub-only tasks."""
    if isinstance(task_names, str):
        raise TypeError(f"task_names must be a list of names, got the string {task_names!r}")
    corpora = corpora or {}
    for name, spec in corpora.items():
        _corpus_spec(name, spec)
    standard = [t for t in task_names if t in TASK_FILES]
    corpus = [t for t in task_names if t in corpora]
    other = [t for t in task_names if t not in TASK_FILES and t not in corpora]
    return standard, corpus, other


def task_dir(work_dir: Path, task: str) -> Path:
    """The folder of one prepared task: ``<work_dir>/<task>/`` with ``<task>.yaml`` and
    ``<task>.jsonl``. One folder per task, so that preparing or fixing one task touches nothing
    of the others, and lm-eval's include path can name exactly the tasks a job needs."""
    return Path(work_dir) / task


#: beside a prepared task: the sha256 of each original file it was prepared from
SOURCE_DIGESTS = "sources.sha256.json"


def source_digests(paths: list[str]) -> list[list[str]]:
    """[path, sha256] of each file, in order (a few MB per task: well under a second). The
    order, not the path, pairs them with a later check, so a moved data folder still matches."""
    import hashlib

    out = []
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out.append([str(p), h.hexdigest()])
    return out


def prepare_task(
    task: str,
    data_dir: Path | None,
    work_dir: Path,
    corpus: Mapping[str, Any] | str | os.PathLike | None = None,
) -> Path:
    """Convert one task's originals (a standard task under ``data_dir``, or a ``corpus``) and
    render its definition into :func:`task_dir`; returns that folder."""
    out = task_dir(work_dir, task)
    out.mkdir(parents=True, exist_ok=True)
    if corpus is not None:
        spec = _corpus_spec(task, corpus)
        data_file = out / f"{task}.jsonl"
        corpus_path = Path(spec.pop("path"))
        convert_corpus(corpus_path, data_file, **spec)
        text = yaml.safe_dump(corpus_task_config(task, data_file), sort_keys=False)
        write_bytes(text.encode("utf-8"), out / f"{task}.yaml", if_changed=True)
        write_json(source_digests([str(corpus_path)]), out / SOURCE_DIGESTS)
        return out
    if task not in TASK_FILES:
        raise ValueError(f"no local definition of task {task!r}; local tasks: {STANDARD_TASKS}")
    if data_dir is None:
        raise ValueError(f"task {task!r}: data_dir is needed to prepare it locally")
    missing = [p for p in task_files([task], Path(data_dir)) if not p.is_file()]
    if missing:
        raise DataFileError(
            f"task {task!r}: original data file(s) not found: {', '.join(str(p) for p in missing)}"
        )
    convert_task(task, Path(data_dir), out)
    template = (template_dir() / f"{task}.yaml").read_text(encoding="utf-8")
    rendered = render_template(template, out).encode("utf-8")
    write_bytes(rendered, out / f"{task}.yaml", if_changed=True)
    write_json(source_digests([str(p) for p in task_files([task], Path(data_dir))]),
               out / SOURCE_DIGESTS)  # fmt: skip
    return out


def prepare_tasks(
    task_names: Sequence[str],
    data_dir: Path | None,
    work_dir: Path,
    corpora: Mapping[str, Any] | None = None,
) -> Path:
    """Prepare every local task of ``task_names`` into its folder under ``work_dir``.

    ``data_dir`` holds the original files laid out as in :data:`TASK_FILES` (None: the standard
    tasks come from the hub and are not prepared); ``corpora`` maps a perplexity task name to a
    corpus path or to ``{"path", "max_docs", "max_tokens", "tokenizer", "split",
    "chunk_chars"}`` (see :func:`kbit.evaluation.convert.convert_corpus`). Names that are
    neither are left to lm-eval's built-in definitions, which :func:`load_tasks` falls back to.
    Returns ``work_dir``, ready for :func:`load_tasks` or ``lm_eval --include_path work_dir``
    (lm-eval searches the task folders below it).
    """
    standard, corpus, other = _split_names(task_names, corpora)
    hub = other + (standard if data_dir is None else [])
    if hub:
        log.info("not prepared locally (lm-eval's built-in definitions apply): %s", hub)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    if data_dir is not None:
        for task in standard:
            prepare_task(task, Path(data_dir), work_dir)
    for name in corpus:
        prepare_task(name, None, work_dir, (corpora or {})[name])
    return work_dir


def _check_local(tasks: Mapping[str, Any], names: Sequence[str], work_dir: Path) -> None:
    """Fail loudly if a name resolved to anything but the definition rendered in work_dir."""
    for name in names:
        task = tasks.get(name)
        if task is None:
            raise RuntimeError(f"lm-eval did not load the local task {name!r} from {work_dir}")
        files = (task.config.dataset_kwargs or {}).get("data_files", {})
        paths = [Path(p) for p in files.values()]
        expected = (task_dir(work_dir, name) / f"{name}.jsonl").resolve()
        if task.config.dataset_path != "json" or paths != [expected]:
            raise RuntimeError(
                f"task {name!r} resolved to {task.config.dataset_path!r} {files!r}, not the "
                f"local data {expected}"
            )


def load_tasks(task_names: Sequence[str], include_dir: Path | None) -> dict:
    """Load tasks prepared under ``include_dir`` (None: all of lm-eval's own, hub tasks).

    For a workflow that prepares the tasks once and evaluates many models: no conversion here.
    Names with a prepared folder are checked to resolve to it; any other name falls back to
    lm-eval's built-in definition (whose index is only built when needed).
    """
    from lm_eval.tasks import TaskManager

    if isinstance(task_names, str):
        raise TypeError(f"task_names must be a list of names, got the string {task_names!r}")
    if include_dir is None:
        return TaskManager().load(list(task_names))
    include_dir = Path(include_dir).resolve()
    if not include_dir.is_dir():
        raise FileNotFoundError(
            f"prepared task directory not found: {include_dir} (run prepare_tasks first)"
        )
    local = [t for t in task_names if (task_dir(include_dir, t) / f"{t}.yaml").is_file()]
    return _load(task_names, include_dir, local)


def _load(task_names: Sequence[str], include_dir: Path, local: Sequence[str]) -> dict:
    """Load with the folders of the ``local`` tasks on the include path (and nothing else of
    ``include_dir``); ``local`` names must resolve to them, the rest to lm-eval's own."""
    from lm_eval.tasks import TaskManager

    include_dir = Path(include_dir).resolve()
    others = [t for t in task_names if t not in local]
    paths = [str(task_dir(include_dir, t)) for t in local]
    manager = TaskManager(include_path=paths or None, include_defaults=bool(others))
    loaded = manager.load(list(task_names))
    absent = [n for n in task_names if n not in loaded["tasks"]]
    if absent:
        raise ValueError(
            f"tasks {absent} are neither prepared under {include_dir} nor lm-eval tasks"
        )
    _check_local(loaded["tasks"], local, include_dir)
    return loaded


def build_task_dict(
    task_names: list[str],
    data_dir: Path | None,
    work_dir: Path,
    corpora: dict | None = None,
) -> dict:
    """lm-eval tasks for ``task_names``, local when ``data_dir`` is given, else from the hub.

    Returns lm-eval's ``TaskManager.load`` result (``{"tasks": {name: Task}, "groups": ...,
    "group_map": ...}``), which ``lm_eval.evaluator.evaluate`` accepts as its task dict; task
    names are the standard ones either way. With ``data_dir``, standard tasks and ``corpora``
    are prepared in ``work_dir`` (see :func:`prepare_tasks`); any other name falls back to
    lm-eval's built-in definition. Corpora need no ``data_dir``.
    """
    standard, corpus, _ = _split_names(task_names, corpora)
    local = corpus if data_dir is None else standard + corpus
    if not local:
        return load_tasks(task_names, None)
    prepare_tasks(task_names, data_dir, work_dir, corpora)
    return _load(task_names, Path(work_dir), local)
