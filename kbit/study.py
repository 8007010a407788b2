"""A study configuration: validated, defaults filled, specs expanded, inputs checked.

The Snakefile builds the study once at start (:func:`build_study`, then :func:`check_inputs`), so
a bad config or a missing input stops the run before any job starts, and changes or deletes
nothing: every error names the key, the bad value and what is allowed, and all problems are
reported together.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kbit.settings import EvalSettings, QuantizeOptions, schema
from kbit.spec import QuantSpec, SpecError, expand_grid

#: parameter count assumed for a model entry without ``params`` (sizes jobs conservatively)
DEFAULT_PARAMS = 1.0e9
#: the keys that say where a model's weights come from; an entry has exactly one
MODEL_SOURCES = ("hf_id", "path", "gguf", "tiny")


class ConfigError(ValueError):
    """A study configuration that does not follow the schema or names an invalid value."""


# ----------------------------------------------------------------------------- schema errors
def _allowed(schema_part: dict) -> str:
    """What a schema node allows, in words."""
    if "enum" in schema_part:
        return f"one of {schema_part['enum']}"
    if "pattern" in schema_part:
        return f"a string matching {schema_part['pattern']}"
    kind = schema_part.get("type")
    bounds = [
        f"{word} {schema_part[k]}"
        for k, word in (("minimum", ">="), ("maximum", "<="), ("exclusiveMinimum", ">"))
        if k in schema_part
    ]
    if kind == "array" and isinstance(schema_part.get("items"), dict):
        return f"a list of {_allowed(schema_part['items'])}"
    text = " or ".join(kind) if isinstance(kind, list) else str(kind or "a value")
    return text + (f" ({', '.join(bounds)})" if bounds else "")


def _format_error(err: Any) -> str:
    """One line per schema error: the key path (list elements by index), the value, the rule.

    For a ``oneOf`` (a value or a list of values) the most specific sub-error is reported, so a
    bad list element is named by its index rather than the whole list being "not valid".
    """
    from jsonschema.exceptions import best_match

    if err.validator in ("oneOf", "anyOf") and err.context:
        deepest = max(len(e.absolute_path) for e in err.context)
        if deepest > len(err.absolute_path):  # an element of a list is what is wrong
            inner = [e for e in err.context if len(e.absolute_path) == deepest]
            return _format_error(best_match(inner))
        options = " | ".join(_allowed(s) for s in err.schema[err.validator])
        key = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        return f"config key '{key}': {err.instance!r} is not allowed; use {options}"
    key = ".".join(str(p) for p in err.absolute_path) or "(top level)"
    allowed = ""
    sch = err.schema
    if err.validator == "additionalProperties":
        props = sorted(sch.get("properties", {}))
        allowed = f"; allowed keys: {props}" if props else ""
    elif ("enum" in sch and err.validator != "enum") or err.validator == "enum":
        allowed = f"; allowed: {sch['enum']}"
    elif "pattern" in sch:
        allowed = f"; must match {sch['pattern']}"
    elif any(k in sch for k in ("minimum", "maximum")):
        low, high = sch.get("minimum", "-inf"), sch.get("maximum", "inf")
        allowed = f"; allowed range [{low}, {high}]"
    return f"config key '{key}': {err.message}{allowed}"


def _model_entry_errors(config: dict) -> list[str]:
    """Model entries with no source or several: worded for a person, not as schema jargon."""
    out = []
    models = config.get("models")
    for name, entry in (models or {}).items() if isinstance(models, dict) else []:
        if not isinstance(entry, dict):
            continue
        given = [k for k in MODEL_SOURCES if k in entry]
        if len(given) > 1:
            out.append(
                f"config key 'models.{name}': it gives both {' and '.join(map(repr, given))}; "
                f"a model comes from exactly one source: {', '.join(MODEL_SOURCES)} "
                "(hf_id with a revision)"
            )
        elif not given:
            out.append(
                f"config key 'models.{name}': no source; give one of {', '.join(MODEL_SOURCES)} "
                "(hf_id with a revision)"
            )
        elif given == ["hf_id"] and "revision" not in entry:
            out.append(
                f"config key 'models.{name}.revision': a hub model needs a pinned revision "
                "(a tag such as step143000, a branch, or a commit hash)"
            )
    return out


def _fill_defaults(instance: Any, sch: dict) -> Any:
    """Fill ``default`` values of the schema's object properties (recursively)."""
    if isinstance(instance, dict) and sch.get("type") == "object":
        for name, sub in sch.get("properties", {}).items():
            if name not in instance and "default" in sub:
                instance[name] = copy.deepcopy(sub["default"])
            if name in instance:
                _fill_defaults(instance[name], sub)
        extra = sch.get("additionalProperties")
        if isinstance(extra, dict):
            for name, value in instance.items():
                if name not in sch.get("properties", {}):
                    _fill_defaults(value, extra)
    return instance


def validate_config(config: dict) -> dict:
    """Validate ``config`` against the schema and return a copy with defaults filled in."""
    import jsonschema

    if not isinstance(config, dict):
        raise ConfigError(
            f"invalid config: expected a mapping of keys, got {type(config).__name__}"
        )
    problems = _model_entry_errors(config)
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    for e in errors:
        path = list(e.absolute_path)
        if len(path) == 2 and path[0] == "models" and e.validator == "oneOf":
            continue  # said better by _model_entry_errors
        problems.append(_format_error(e))
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(dict.fromkeys(problems)))
    return _fill_defaults(copy.deepcopy(config), schema())


# ----------------------------------------------------------------------------- the study
@dataclass
class Study:
    """Everything the workflow needs from a validated config."""

    config: dict
    specs: list[QuantSpec]
    sweeps: dict[str, list[str]] = field(default_factory=dict)

    @property
    def models(self) -> dict[str, dict]:
        return self.config["models"]

    @property
    def quant_ids(self) -> list[str]:
        return [s.id for s in self.specs]

    @property
    def tasks(self) -> list[str]:
        return list(self.config["tasks"]) + list(self.config.get("corpora", {}))

    @property
    def local_tasks(self) -> list[str]:
        """Tasks prepared from local files: the standard ones when ``data_dir`` is set, and the
        corpora (everything else is one of lm-eval's own tasks, read from the hub)."""
        from kbit.evaluation.convert import TASK_FILES

        standard = [t for t in self.config["tasks"] if t in TASK_FILES]
        corpora = list(self.config.get("corpora", {}))
        return (standard if self.config.get("data_dir") is not None else []) + corpora

    def task_dir(self, task: str) -> Path:
        """Where ``prepare_task`` writes a local task (its yaml, data and source digests)."""
        from kbit.evaluation.tasks import task_dir

        return task_dir(Path(self.config["resources"]) / "tasks", task)

    def task_sources(self, task: str) -> list[str]:
        """The original files ``task`` is prepared from (inputs of its preparation job)."""
        from kbit.evaluation.convert import TASK_FILES

        corpora = self.config.get("corpora", {})
        if task in corpora:
            return [corpora[task]["path"]]
        return [str(Path(self.config["data_dir"]) / rel) for rel in TASK_FILES[task]]

    @property
    def results(self) -> str:
        return self.config["results"]

    @property
    def resources(self) -> str:
        return self.config["resources"]

    @property
    def quantize_options(self) -> QuantizeOptions:
        """Which tensors are quantized (the ``quantize`` section without storage settings)."""
        return QuantizeOptions.from_config(
            {k: v for k, v in self.config["quantize"].items() if k != "keep_artifacts"}
        )

    @property
    def gptq_quants(self) -> list[str]:
        """Specs quantized with GPTQ (they need calibration tokens and their own job)."""
        return [s.id for s in self.specs if s.method == "gptq"]

    @property
    def mixed_quants(self) -> list[str]:
        """Mixed-precision specs (each needs a search for its assignment)."""
        return [s.id for s in self.specs if s.is_mixed]

    def token_settings(self, purpose: str) -> dict[str, Any]:
        """Corpus and window settings of a token file: ``gptq`` (quant.calibration), ``mixed``
        (the same corpus, quant.mixed.scoring's budget, another seed) or ``landscape``
        (predict.landscape's budget)."""
        cal = dict(self.config["quant"]["calibration"])
        if purpose == "gptq":
            return cal
        if purpose == "mixed":
            scoring = self.config["quant"].get("mixed", {}).get("scoring", {})
            return {
                "corpus": cal["corpus"],
                "n_samples": scoring.get("n_samples", 64),
                "seq_len": scoring.get("seq_len", 512),
                "seed": cal["seed"] + 1,
            }
        if purpose == "landscape":
            land = self.config["predict"]["landscape"]
            return {
                "corpus": cal["corpus"],
                "n_samples": land["n_samples"],
                "seq_len": land["seq_len"],
                "seed": cal["seed"] + 2,
            }
        raise ValueError(f"token purpose {purpose!r}: allowed are 'gptq', 'mixed', 'landscape'")

    @property
    def extra_targets(self) -> list[str]:
        """Outputs of the optional systems the study asks for (predictor, mixed analysis)."""
        out = []
        if self.config["predict"]["enabled"]:
            out.append(f"{self.results}/predict/summary.md")
        if self.mixed_quants:
            out.append(f"{self.results}/mixed/claims.md")
        return out

    @property
    def model_table(self) -> dict[str, list]:
        """Per model: family, parameters (as configured) and training tokens (NaN if unknown),
        columns for the predictors' table."""
        keys = list(self.models)
        return {
            "model": keys,
            "family": [self.models[k]["family"] for k in keys],
            "train_tokens": [float(self.models[k].get("train_tokens", "nan")) for k in keys],
        }

    def eval_settings(self, model: str | None = None) -> EvalSettings:
        """The ``eval`` section, with ``model``'s own ``max_length`` where its entry sets one."""
        settings = EvalSettings.from_config(self.config["eval"])
        entry = self.models.get(model, {}) if model else {}
        if entry.get("max_length") is not None:
            settings = settings.replace(max_length=entry["max_length"])
        return settings

    def params(self, model: str) -> float:
        """Approximate parameter count of ``model`` (config ``params``, else a conservative 1e9)."""
        entry = self.models[model]
        if "params" in entry:
            return float(entry["params"])
        return 1.0e7 if "tiny" in entry else DEFAULT_PARAMS

    def batched(self, model: str) -> bool:
        """Whether all quant specs of ``model`` are evaluated in one job (small models)."""
        return self.params(model) <= float(self.config["eval"]["batched_max_params"])

    def model_dir(self, model: str) -> str:
        """Where the model's safetensors directory is: a local ``path`` as is, else resources/."""
        entry = self.models[model]
        if "path" in entry:
            return entry["path"]
        return f"{self.resources}/models/{model}"

    @property
    def locked(self) -> dict[str, dict[str, Any]]:
        """Model key -> {hf_id, revision, commit} of the lock file, if the study names one."""
        path = self.config.get("lock")
        if not path:
            return {}
        data = yaml.safe_load(Path(path).read_text()) or {}
        return dict(data.get("models", {}))

    def download_entry(self, model: str) -> dict[str, Any]:
        """The model's entry as the download job uses it: a locked hub model at its commit."""
        entry = dict(self.models[model])
        lock = self.locked.get(model)
        if lock and "hf_id" in entry and lock.get("commit"):
            entry["revision"] = lock["commit"]
        return entry

    def model_meta(self, model: str) -> dict[str, Any]:
        """Columns that identify the model in every table."""
        entry = self.models[model]
        source = (
            entry.get("hf_id")
            or entry.get("path")
            or entry.get("gguf")
            or f"tiny:{entry.get('tiny', {}).get('arch')}"
        )
        return {
            "model": model,
            "hf_id": source,
            "revision": entry.get("revision", ""),
            "family": entry["family"],
        }


def build_study(config: dict) -> Study:
    """Validate ``config`` and expand its quantization sweeps into an ordered list of specs."""
    cfg = validate_config(config)
    quant = cfg["quant"]
    specs: list[QuantSpec] = [QuantSpec.parse("fp16")] if quant.get("baseline", True) else []
    sweeps: dict[str, list[str]] = {}
    for name, grid in quant.get("sweeps", {}).items():
        try:
            grid_specs = expand_grid(grid)
        except SpecError as err:
            raise ConfigError(f"config key 'quant.sweeps.{name}': {err}") from err
        sweeps[name] = [s.id for s in grid_specs]
        specs += [s for s in grid_specs if s not in specs]
    if "mixed" in quant:
        mixed = _mixed_specs(quant["mixed"])
        sweeps["mixed"] = [sp.id for sp in mixed]
        specs += [sp for sp in mixed if sp not in specs]
    for i, text in enumerate(quant.get("specs", [])):
        try:
            spec = QuantSpec.parse(text)
        except SpecError as err:
            raise ConfigError(f"config key 'quant.specs.{i}': {err}") from err
        if spec not in specs:
            specs.append(spec)
    if not specs:
        raise ConfigError("config key 'quant': no specs (set baseline: true, sweeps or specs)")
    return Study(config=cfg, specs=specs, sweeps=sweeps)


def _mixed_specs(section: dict) -> list[QuantSpec]:
    """The specs of the ``quant.mixed`` sweep: low format x Q_r x granularity."""
    out = []
    for i, low in enumerate(section["low"]):
        try:
            base = QuantSpec.parse(low)
        except SpecError as err:
            raise ConfigError(f"config key 'quant.mixed.low.{i}': {err}") from err
        for ratio in section["ratios"]:
            for gran in section["granularity"]:
                fields = {"mixed_ratio": ratio, "granularity": gran}
                fields["selection"] = section["selection"]
                if section["selection"] == "random":
                    fields.update(n_trials=section["n_trials"], seed=section["seed"])
                try:
                    spec = base.replace(**fields)
                except SpecError as err:
                    raise ConfigError(f"config key 'quant.mixed': {low}: {err}") from err
                if spec not in out:
                    out.append(spec)
    return out


def load_study(path: str | Path) -> Study:
    """Read a YAML config file and build the study."""
    return build_study(yaml.safe_load(Path(path).read_text()))


# ----------------------------------------------------------------------------- input checks
def _model_problems(study: Study) -> list[str]:
    from kbit.sources import ModelSourceError, resolve_gguf

    out = []
    for name, entry in study.models.items():
        if "path" in entry:
            p = Path(entry["path"])
            if not p.is_dir():
                out.append(f"models.{name}.path: {p} does not exist (a local model directory)")
            elif not (p / "config.json").is_file() or not any(p.glob("*.safetensors")):
                out.append(
                    f"models.{name}.path: {p} is not a safetensors model directory "
                    "(needs config.json and *.safetensors; pickle weights are refused)"
                )
        elif "gguf" in entry:
            try:
                resolve_gguf(entry["gguf"])
            except ModelSourceError as err:
                out.append(f"models.{name}.gguf: {err}")
        elif "tiny" in entry and entry["tiny"].get("tokenizer"):
            tok = Path(entry["tiny"]["tokenizer"])
            if not tok.exists():
                out.append(
                    f"models.{name}.tiny.tokenizer: {tok} does not exist (a tokenizer directory "
                    "or tokenizer.json; leave it out to train a small fallback tokenizer)"
                )
    return out


def _lm_eval_task_names() -> set[str]:
    """Every task name lm-eval knows (its index takes ~20 s to build: cached per version)."""
    import lm_eval

    version = getattr(lm_eval, "__version__", "unknown")
    cache_dir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kbit"
    cache = cache_dir / f"lm_eval_tasks-{version}.json"
    if cache.is_file():
        try:
            return set(json.loads(cache.read_text()))
        except ValueError:
            pass
    from lm_eval.tasks import TaskManager

    names = sorted(TaskManager().all_tasks)
    try:
        from kbit.io import write_json

        write_json(names, cache, indent=0)
    except OSError:
        pass
    return set(names)


def _task_problems(study: Study) -> list[str]:
    from kbit.evaluation.convert import TASK_FILES
    from kbit.evaluation.windows import WINDOW_TASKS

    cfg = study.config
    out = []
    data_dir = cfg.get("data_dir")
    if data_dir is not None and not Path(data_dir).is_dir():
        out.append(f"data_dir: {data_dir} does not exist (the folder of the original task files)")
        data_dir = None
    unknown = []
    for task in cfg["tasks"]:
        if task in TASK_FILES:
            if data_dir is None:
                continue
            missing = [rel for rel in TASK_FILES[task] if not (Path(data_dir) / rel).is_file()]
            if missing:
                out.append(
                    f"tasks: {task} needs {', '.join(missing)} under data_dir {data_dir}; add the "
                    "file(s), or remove the task"
                )
        elif task in WINDOW_TASKS:
            if data_dir is None:
                continue  # read from the hub's wikitext-2-raw-v1
            missing = [r for r in WINDOW_TASKS[task] if not (Path(data_dir) / r).is_file()]
            if missing:
                out.append(f"tasks: {task} needs {', '.join(missing)} under data_dir {data_dir}")
        elif task not in cfg.get("corpora", {}):
            unknown.append(task)
    if unknown:
        known = _lm_eval_task_names()
        for task in unknown:
            if task not in known:
                import difflib

                close = difflib.get_close_matches(task, sorted(set(TASK_FILES) | known), n=3)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                local = ", ".join([*TASK_FILES, *WINDOW_TASKS])
                out.append(
                    f"tasks: {task!r} is neither a local task ({local}), a corpus, "
                    f"nor an lm-eval task{hint}"
                )
    for name, corpus in cfg.get("corpora", {}).items():
        if not Path(corpus["path"]).is_file():
            out.append(f"corpora.{name}.path: {corpus['path']} does not exist")
    return out


def _source_problems(study: Study) -> list[str]:
    """Prepared local tasks whose original files changed content since preparation.

    The preparation job takes its sources as ``ancient`` inputs: a copied or re-created data
    folder (new timestamps, same bytes) does not redo a study; changed bytes are caught here,
    before any job, instead of being silently ignored."""
    from kbit.evaluation.tasks import SOURCE_DIGESTS, source_digests

    out = []
    for task in study.local_tasks:
        record = study.task_dir(task) / SOURCE_DIGESTS
        if not record.is_file():
            continue
        before = [d for _, d in json.loads(record.read_text())]
        sources = study.task_sources(task)
        if not all(Path(p).is_file() for p in sources):
            continue  # reported by _task_problems
        now = source_digests(sources)
        changed = [p for i, (p, d) in enumerate(now) if i >= len(before) or before[i] != d]
        if changed:
            out.append(
                f"tasks: {task} was prepared from other contents of {', '.join(changed)}; to "
                f"prepare it again (and redo what depends on it) delete {study.task_dir(task)} "
                "or run with --forcerun prepare_task"
            )
    return out


def _calibration_problems(study: Study) -> list[str]:
    from kbit.calibration import DEFAULT_CORPUS, TASK_PREFIX

    if not (study.gptq_quants or study.mixed_quants):
        return []
    corpus = str(study.config["quant"]["calibration"]["corpus"])
    if corpus == DEFAULT_CORPUS:
        return []
    if corpus.startswith(TASK_PREFIX):
        task = corpus[len(TASK_PREFIX) :]
        if task in study.tasks:
            return [
                f"quant.calibration.corpus: {corpus} is a task this study evaluates; calibrating "
                "on the documents that are scored would flatter the calibrated methods: use "
                "another task's text, a file, or pydoc"
            ]
        if study.config.get("data_dir") is None:
            return [f"quant.calibration.corpus: {corpus} needs data_dir (the task files)"]
        return []
    if not Path(corpus).is_file():
        return [f"quant.calibration.corpus: {corpus} does not exist (pydoc, a file or task:<name>)"]
    return []


def _lock_problems(study: Study) -> list[str]:
    path = study.config.get("lock")
    if not path:
        return []
    if not Path(path).is_file():
        return [f"lock: {path} does not exist (copy a run's results/models.lock.yaml there)"]
    out = []
    for key, lock in study.locked.items():
        entry = study.models.get(key)
        if entry is None or "hf_id" not in entry:
            continue
        if lock.get("hf_id") != entry["hf_id"] or lock.get("revision") != entry["revision"]:
            out.append(
                f"lock: {key} is locked as {lock.get('hf_id')}@{lock.get('revision')}, the config "
                f"says {entry['hf_id']}@{entry['revision']}: update the lock or the config"
            )
        model_dir = Path(study.model_dir(key)) / "kbit_source.json"
        if model_dir.is_file():
            have = json.loads(model_dir.read_text()).get("commit")
            if have and lock.get("commit") and have != lock["commit"]:
                out.append(
                    f"lock: {key} is locked at commit {lock['commit']} but "
                    f"{model_dir.parent} holds commit {have}: delete that folder to download "
                    "the locked commit (a study never mixes two commits of one model)"
                )
    return out


#: offline routes, named by every message about an unreachable hub
OFFLINE_HELP = (
    "offline options: download on a machine with internet first (`snakemake --until download`, "
    "then HF_HUB_OFFLINE=1), point model entries at local files (`path:` a safetensors folder, "
    "`gguf:` a GGUF file) and the tasks at the original files (`data_dir:`); README, 'Offline'"
)


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes")


def _hub_reachable(timeout_s: float = 5.0) -> bool:
    import socket

    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def _in_hub_cache(hf_id: str, revision: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(hf_id, "config.json", revision=revision), str)
    except Exception:
        return False


def _network_problems(study: Study) -> list[str]:
    """What needs the hub but cannot reach it: undownloaded hub models, hub task data."""
    missing = [
        m
        for m, e in study.models.items()
        if "hf_id" in e and not (Path(study.model_dir(m)) / "config.json").is_file()
    ]
    hub_tasks = study.config.get("data_dir") is None and not _flag("HF_DATASETS_OFFLINE")
    if not missing and not hub_tasks:
        return []
    if _flag("HF_HUB_OFFLINE"):
        absent = [
            m
            for m in missing
            if not _in_hub_cache(study.models[m]["hf_id"], study.models[m]["revision"])
        ]
        if absent:
            return [
                f"HF_HUB_OFFLINE is set and {', '.join(absent)} are neither downloaded nor in "
                f"the hub cache; {OFFLINE_HELP}"
            ]
        return []
    if _hub_reachable():
        return []
    needs = []
    if missing:
        needs.append(f"{len(missing)} models to download ({', '.join(missing[:3])}...)")
    if hub_tasks:
        needs.append("the task data (data_dir is null)")
    return [f"the Hugging Face hub is unreachable, and the study needs {' and '.join(needs)}; "
            f"{OFFLINE_HELP}"]  # fmt: skip


def check_inputs(study: Study, network: bool = False) -> None:
    """Everything checkable before the first job: task names (local, corpus or lm-eval's
    registry), the data file of every task, every model ``path`` / ``gguf`` / tokenizer, the
    calibration corpus, the lock file and, with ``network``, whether what needs the hub can
    reach it. Raises one :class:`ConfigError` listing every problem."""
    problems = (
        _model_problems(study)
        + _task_problems(study)
        + _source_problems(study)
        + _calibration_problems(study)
        + _lock_problems(study)
    )
    if network and not problems:
        problems = _network_problems(study)
    if problems:
        raise ConfigError("the study cannot run:\n  " + "\n  ".join(problems))
