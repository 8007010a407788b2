"""Settings objects, one per concern, with their defaults read from the config schema.

The schema (``workflow/schemas/config.schema.yaml``) is the one place where a default lives: the
workflow fills a study's missing keys from it, and a library user who builds ``EvalSettings()``
gets the same values, so the two never differ. :class:`~kbit.study.Study` builds these objects
from a validated config and the workflow's scripts pass them through unchanged.

``science()`` of each object is what changes a result: rule ``params`` hold only that, so
changing a storage or speed setting (``keep_artifacts``, ``fast_scoring``) reruns nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


@functools.cache
def schema() -> dict:
    """The config schema (parsed once per process)."""
    return yaml.safe_load(SCHEMA_PATH.read_text())


def section_defaults(section: str) -> dict[str, Any]:
    """``{key: default}`` of one top-level object section of the schema."""
    props = schema()["properties"][section]["properties"]
    return {k: v["default"] for k, v in props.items() if "default" in v}


def _from_section(cls, section: str, values: Mapping[str, Any] | None):
    names = {f.name for f in fields(cls)}
    merged = {k: v for k, v in section_defaults(section).items() if k in names}
    unknown = set(values or {}) - names - set(section_defaults(section))
    if unknown:
        raise ValueError(f"unknown {section} settings {sorted(unknown)}; allowed: {sorted(names)}")
    merged.update({k: v for k, v in (values or {}).items() if k in names})
    return cls(**merged)


@dataclass(frozen=True)
class QuantizeOptions:
    """Which tensors are quantized (``quantize`` section): the keyword arguments of
    :func:`kbit.model_quant.quantize_model`."""

    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    quantize_embeddings: bool = False
    quantize_lm_head: bool = False

    def __post_init__(self) -> None:
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))

    @classmethod
    def from_config(cls, values: Mapping[str, Any] | None = None) -> QuantizeOptions:
        """From the config's ``quantize`` section (missing keys: the schema's defaults)."""
        return _from_section(cls, "quantize", values)

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``quantize_model`` and friends."""
        d = asdict(self)
        for name in ("include", "exclude"):
            d[name] = list(d[name]) if d[name] is not None else None
        return d

    def science(self) -> dict[str, Any]:
        """All of it changes results."""
        return self.kwargs()


@dataclass(frozen=True)
class EvalSettings:
    """How models are evaluated (``eval`` section; see config/README.md for each key)."""

    dtype: str = "auto"
    device: str = "auto"
    softmax_dtype: str = "float32"
    batch_size: int | str = "auto"
    max_length: int | None = None
    limit: int | None = None
    task_limits: Mapping[str, int | None] = field(default_factory=dict)
    fast_scoring: bool = True
    cuda_graphs: bool | str = "auto"
    batched_max_params: float = 2.0e9

    @classmethod
    def from_config(cls, values: Mapping[str, Any] | None = None) -> EvalSettings:
        """From the config's ``eval`` section (missing keys: the schema's defaults)."""
        return _from_section(cls, "eval", values)

    def replace(self, **changes: Any) -> EvalSettings:
        """A copy with some fields changed (e.g. a model's own ``max_length``)."""
        return type(self)(**{**asdict(self), **changes})

    def limit_for(self, task: str) -> int | None:
        """Documents of ``task`` to evaluate: ``task_limits`` overrides ``limit``."""
        return dict(self.task_limits).get(task, self.limit)

    def limits(self, tasks: list[str]) -> dict[str, int | None]:
        """:meth:`limit_for` of every task."""
        return {t: self.limit_for(t) for t in tasks}

    def science(self, tasks: list[str] | None = None) -> dict[str, Any]:
        """What changes a score: dtype, device, log-softmax dtype, context window and, for the
        given tasks only, their document limits. Batch size is an input file of its own."""
        out = {
            "dtype": self.dtype,
            "device": self.device,
            "softmax_dtype": self.softmax_dtype,
            "max_length": self.max_length,
        }
        if tasks is not None:
            out["limits"] = self.limits(tasks)
        return out
