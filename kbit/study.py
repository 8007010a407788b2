"""A study configuration: validated against the JSON schema, defaults filled, specs expanded.

The Snakefile calls :func:`load_study` once at start, so a bad config fails before any job runs,
with a message that names the key, the bad value and what is allowed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kbit.spec import QuantSpec, SpecError, expand_grid

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"
#: parameter count assumed for a model entry without ``params`` (sizes jobs conservatively)
DEFAULT_PARAMS = 1.0e9


class ConfigError(ValueError):
    """A study configuration that does not follow the schema or names an invalid value."""


def _format_error(err: Any) -> str:
    key = ".".join(str(p) for p in err.absolute_path) or "(top level)"
    schema = err.schema
    allowed = ""
    if "enum" in schema and err.validator != "enum":
        allowed = f"; allowed: {schema['enum']}"
    elif err.validator == "oneOf":
        options = []
        for sub in schema["oneOf"]:
            if "enum" in sub:
                options.append(" | ".join(map(str, sub["enum"])))
            elif "required" in sub:
                options.append("keys " + " + ".join(sub["required"]))
            elif "type" in sub:
                bounds = [f"{k} {sub[k]}" for k in ("minimum", "maximum") if k in sub]
                options.append(str(sub["type"]) + (f" ({', '.join(bounds)})" if bounds else ""))
        allowed = f"; allowed: one of {options}"
    elif "pattern" in schema:
        allowed = f"; must match {schema['pattern']}"
    elif "minimum" in schema or "maximum" in schema:
        low, high = schema.get("minimum", "-inf"), schema.get("maximum", "inf")
        allowed = f"; allowed range [{low}, {high}]"
    if err.validator == "additionalProperties":
        props = sorted(schema.get("properties", {}))
        allowed = f"; allowed keys: {props}" if props else ""
    return f"config key '{key}': {err.message}{allowed}"


def _fill_defaults(instance: Any, schema: dict) -> Any:
    """Fill ``default`` values of the schema's object properties (recursively)."""
    if isinstance(instance, dict) and schema.get("type") == "object":
        for name, sub in schema.get("properties", {}).items():
            if name not in instance and "default" in sub:
                instance[name] = copy.deepcopy(sub["default"])
            if name in instance:
                _fill_defaults(instance[name], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name, value in instance.items():
                if name not in schema.get("properties", {}):
                    _fill_defaults(value, extra)
    return instance


def validate_config(config: dict) -> dict:
    """Validate ``config`` against the schema and return a copy with defaults filled in."""
    import jsonschema

    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(_format_error(e) for e in errors))
    return _fill_defaults(copy.deepcopy(config), schema)


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
    def results(self) -> str:
        return self.config["results"]

    @property
    def resources(self) -> str:
        return self.config["resources"]

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
    for i, text in enumerate(quant.get("specs", [])):
        try:
            spec = QuantSpec.parse(text)
        except SpecError as err:
            raise ConfigError(f"config key 'quant.specs.{i}': {err}") from err
        if spec not in specs:
            specs.append(spec)
    if not specs:
        raise ConfigError("config key 'quant': no specs (set baseline: true, sweeps or specs)")
    for name, entry in cfg["models"].items():
        if entry.get("hf_id") and "revision" not in entry:
            raise ConfigError(f"config key 'models.{name}.revision': a hub model needs a revision")
    return Study(config=cfg, specs=specs, sweeps=sweeps)


def load_study(path: str | Path) -> Study:
    """Read a YAML config file and build the study."""
    return build_study(yaml.safe_load(Path(path).read_text()))
