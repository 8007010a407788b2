"""Compile each of lm-eval's Jinja prompt templates once per process instead of once per use.

lm-eval's ``utils.apply_template(template, doc)`` calls ``env.from_string(template)`` every time,
and Jinja's ``from_string`` does not cache: every ``doc_to_text`` / ``doc_to_target`` /
``doc_to_choice`` of every document parses and compiles its template anew (about 0.4 ms each).
Scoring a spec touches each document several times (``process_results`` and the per-document
rows), so for 1500 documents per task this was seconds of host time per quantization config,
during which the GPU sits idle.

:func:`install` replaces ``lm_eval.utils.apply_template`` with a version that keeps compiled
templates in a bounded cache. A compiled Jinja template renders the same string every time it is
given the same document (it is the same code ``from_string`` would produce), so prompts, targets
and choices, and with them every score, are unchanged; ``tests/test_templates.py`` compares the
two on every template of the prepared tasks.
"""

from __future__ import annotations

import functools
from typing import Any

#: distinct templates kept compiled (a task has a handful; many tasks in one process stay below)
CACHE_SIZE = 4096


@functools.lru_cache(maxsize=CACHE_SIZE)
def compiled(template: str) -> Any:
    """lm-eval's Jinja environment's compiled template for ``template`` (memoised)."""
    from lm_eval import utils

    return utils.env.from_string(template)


def apply_template(template: str, doc: dict) -> str:
    """``lm_eval.utils.apply_template`` with the compilation memoised."""
    return compiled(template).render(**doc)


def install() -> None:
    """Make lm-eval's tasks render through :func:`apply_template` (idempotent)."""
    from lm_eval import utils

    utils.apply_template = apply_template
