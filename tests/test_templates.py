"""Memoised prompt templates render exactly what lm-eval's per-call compilation renders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from kbit.evaluation.speed import templates
from kbit.evaluation.tasks import STANDARD_TASKS, load_tasks, prepare_tasks

SAMPLE_EVAL = Path(__file__).resolve().parent / "data" / "eval"


def _fresh_compile(template: str, doc: dict) -> str:
    """lm-eval's own definition: compile the template, then render it."""
    from lm_eval import utils

    return utils.env.from_string(template).render(**doc)


def _prompts(tasks: dict) -> dict:
    out = {}
    for name, task in tasks.items():
        for i, doc in enumerate(task.eval_docs):
            out[(name, i)] = (
                task.doc_to_text(doc),
                task.doc_to_target(doc),
                task.doc_to_choice(doc) if task.OUTPUT_TYPE == "multiple_choice" else None,
            )
    return out


@pytest.fixture(scope="module")
def sample_tasks(tmp_path_factory) -> dict:
    work = prepare_tasks(list(STANDARD_TASKS), SAMPLE_EVAL, tmp_path_factory.mktemp("tpl"))
    return load_tasks(list(STANDARD_TASKS), work)["tasks"]


def test_memoised_templates_render_like_fresh_compilation(sample_tasks, monkeypatch):
    from lm_eval import utils

    monkeypatch.setattr(utils, "apply_template", _fresh_compile)
    expected = _prompts(sample_tasks)
    templates.install()
    assert utils.apply_template is templates.apply_template
    templates.compiled.cache_clear()
    assert _prompts(sample_tasks) == expected
    assert _prompts(sample_tasks) == expected
    info = templates.compiled.cache_info()
    # every template string is compiled once; every later use is a cache hit
    assert 0 < info.misses <= 3 * len(sample_tasks)
    assert info.hits >= info.misses


def test_install_is_idempotent(monkeypatch):
    from lm_eval import utils

    monkeypatch.setattr(utils, "apply_template", _fresh_compile)
    templates.install()
    templates.install()
    assert utils.apply_template is templates.apply_template
    assert templates.apply_template("{{ a ~ ' ' ~ b }}", {"a": "x", "b": 2}) == "x 2"
