"""WikiText-2 perplexity as the GPTQ paper reports it: fixed windows of one token stream.

The GPTQ paper's tables (and its reference code, ``datautils.py`` and ``opt.py`` of
IST-DASLab/gptq) evaluate WikiText-2 differently from lm-eval's document-level ``wikitext``:

- text: the Hugging Face ``wikitext-2-raw-v1`` test rows joined with ``"\\n\\n"``. Those rows are
  what the data set's loading script makes of ``wiki.test.raw``: the file opened as UTF-8 text
  (universal newlines) and iterated line by line, each line keeping its ``"\\n"``, a line of only
  whitespace becoming ``""`` (4358 rows, 1467 of them empty; the hub's Parquet files were
  converted from that output). :func:`hf_rows` reads the original file the same way;
- tokens: the model's tokenizer on the whole text at once, with its default special tokens (a
  BOS where the tokenizer adds one, as OPT's does);
- windows: ``numel // W`` non-overlapping windows of ``W`` = 2048 tokens, the rest dropped;
  here ``W`` is capped at the model's position count where that is smaller (recorded);
- loss: each window fed as is, the mean cross-entropy of its tokens 1..W-1 (token 0 is not
  predicted); perplexity = ``exp(sum_i loss_i * W / (n * W))``, the exp of the mean window loss.

Each window is one document of the per-document contract (:mod:`kbit.evaluation.metrics`,
output type ``perplexity_windows``): ``ll`` is the sum of its W-1 predicted tokens'
log-probabilities (float32 log-softmax, summed like lm-eval sums a request, as float64),
``n_tokens`` = W-1. Every window predicts the same number of tokens, so
``exp(-sum ll / sum n_tokens)`` is exactly the exp of the mean window loss, and bootstrapping
over windows as documents works like any other task.

What differs from the reference code: several windows per forward pass (other matrix shapes,
other last bits); the log-softmax in float32 (the reference takes its cross-entropy in the
logits' dtype, float16 there); the tokenizer is the one the model is evaluated with (the
reference loads OPT's and LLaMA's slow tokenizers).

:class:`WindowTask` scores such windows for any model and hands back a
:class:`~kbit.evaluation.runner.TaskResult`, so the runner can write it beside lm-eval tasks
(the :class:`ScoredTask` protocol).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd
import torch

from kbit.evaluation.convert import TASK_FILES, DataFileError
from kbit.evaluation.records import DOC_COLUMNS
from kbit.evaluation.runner import TaskResult

if TYPE_CHECKING:
    from kbit.evaluation.lm import ScoringLM
    from kbit.evaluation.progress import Progress
    from kbit.evaluation.speed.scoring import FastLM

log = logging.getLogger("kbit.evaluation")

#: output type of per-window rows (:func:`kbit.evaluation.metrics.task_metrics` knows it)
OUTPUT_TYPE = "perplexity_windows"
#: the GPTQ paper's window (its ``model.seqlen`` for OPT, BLOOM and LLaMA)
DEFAULT_WINDOW = 2048
#: the task name of WikiText-2 in this convention
DEFAULT_NAME = "wikitext2_gptq"
#: WikiText-2 raw test, relative to the evaluation data directory
WIKITEXT2_TEST = Path(TASK_FILES["wikitext"][0])
#: config attributes that hold a model's position count (HFLM's list)
_POSITION_ATTRS = ("n_positions", "max_position_embeddings", "n_ctx")


class ScoredTask(Protocol):
    """A task that scores itself (no lm-eval requests): what the runner needs of it."""

    name: str
    output_type: str

    def score(self, lm: Any, progress: Progress | None = None) -> TaskResult:
        """Per-document rows of this task for ``lm``'s model, with their cost."""
        ...


# ---------------------------------------------------------------------- text and windows
def hf_rows(path: str | os.PathLike) -> list[str]:
    """The rows the ``wikitext`` loading script makes of a raw file: every line as Python
    iterates a UTF-8 text file (split after ``"\\n"``, kept), whitespace-only lines as ``""``."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"WikiText-2 test file not found: {path}")
    with path.open(encoding="utf-8") as fh:
        return [row if row.strip() else "" for row in fh]


def wikitext2_text(data_dir: str | os.PathLike) -> str:
    """The GPTQ convention's text: the test rows of ``<data_dir>/wikitext-2-raw/wiki.test.raw``
    joined with ``"\\n\\n"``."""
    return "\n\n".join(hf_rows(Path(data_dir) / WIKITEXT2_TEST))


def wikitext2_hub_text() -> str:
    """The same text from the Hugging Face hub's ``wikitext-2-raw-v1`` test split (the data set
    the GPTQ code loads), for studies without ``data_dir``."""
    from datasets import load_dataset

    rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
    return "\n\n".join(rows)


#: tasks that score themselves on windows of one text (name -> original files under data_dir)
WINDOW_TASKS = {DEFAULT_NAME: TASK_FILES["wikitext"]}


def window_task(
    name: str, data_dir: str | os.PathLike | None, limit: int | None = None
) -> WindowTask:
    """The window task ``name`` from the original file under ``data_dir`` (None: the hub)."""
    if name not in WINDOW_TASKS:
        raise ValueError(f"{name!r} is not a window task; those are {sorted(WINDOW_TASKS)}")
    text = wikitext2_text(data_dir) if data_dir is not None else wikitext2_hub_text()
    return WindowTask(name, text, DEFAULT_WINDOW, limit)


def max_positions(model: torch.nn.Module) -> int | None:
    """The model's position count from its config (None where it has none, e.g. ALiBi)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in _POSITION_ATTRS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _check_window(window: Any) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"window={window!r}: must be an integer >= 2")


def window_length(model: torch.nn.Module, requested: int = DEFAULT_WINDOW) -> int:
    """``requested``, capped at the model's position count when that is smaller."""
    _check_window(requested)
    limit = max_positions(model)
    return requested if limit is None else min(requested, limit)


def token_windows(ids: Any, window: int) -> torch.Tensor:
    """``[numel // window, window]`` non-overlapping windows of ``ids``, the rest dropped."""
    flat = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
    n = flat.numel() // window
    if n == 0:
        raise ValueError(f"{flat.numel()} tokens make no window of {window}")
    return flat[: n * window].view(n, window)


# ---------------------------------------------------------------------- rows and metrics
def window_frame(lls: list[float], window: int) -> pd.DataFrame:
    """Per-window rows of the per-document contract (doc_id = window index), plus ``window``."""
    n = len(lls)
    rows = pd.DataFrame(
        {
            "doc_id": np.arange(n, dtype=np.int64),
            "ll": [[float(x)] for x in lls],
            "finite": [math.isfinite(x) for x in lls],
            "is_greedy": [[] for _ in range(n)],
            "target": np.zeros(n, dtype=np.int64),
            "choice_chars": [[0] for _ in range(n)],
            "n_tokens": np.full(n, window - 1, dtype=np.int64),
            "n_words": np.zeros(n, dtype=np.int64),
            "n_bytes": np.zeros(n, dtype=np.int64),
            "acc": np.full(n, math.nan),
            "acc_norm": np.full(n, math.nan),
        },
        columns=list(DOC_COLUMNS),
    )
    rows["window"] = np.full(n, window, dtype=np.int64)
    rows["output_type"] = OUTPUT_TYPE
    return rows


def gptq_perplexity(lls: list[float], window: int) -> float:
    """The reference code's arithmetic: per window the mean loss over its ``window - 1``
    predicted tokens times ``window``, summed, over ``n * window``, exponentiated."""
    nll = [-ll / (window - 1) * window for ll in lls]
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.exp(np.sum(nll) / (len(lls) * window)))


# ---------------------------------------------------------------------- the task
class WindowTask:
    """Perplexity over non-overlapping windows of one text (see the module doc).

    ``window`` is the requested length (capped per model, see :func:`window_length`);
    ``limit`` scores the first windows only. ``tokenizer`` and ``batch_size`` serve a bare model
    passed to :meth:`score`; an LM brings its own. The text is tokenized once per tokenizer.
    """

    output_type = OUTPUT_TYPE

    def __init__(
        self,
        name: str,
        text: str,
        window: int = DEFAULT_WINDOW,
        limit: int | None = None,
        tokenizer: Any = None,
        batch_size: int = 1,
    ) -> None:
        if not text:
            raise ValueError(f"task {name!r}: empty text")
        if limit is not None and (isinstance(limit, bool) or limit < 1):
            raise ValueError(f"limit={limit!r}: must be a positive number of windows or None")
        _check_window(window)
        self.name = name
        self.text = text
        self.window = window
        self.limit = limit
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self._ids: tuple[Any, list[int]] | None = None
        self._fast: tuple[Any, FastLM] | None = None

    @classmethod
    def wikitext2(
        cls,
        data_dir: str | os.PathLike,
        window: int = DEFAULT_WINDOW,
        limit: int | None = None,
        name: str = DEFAULT_NAME,
        **kwargs: Any,
    ) -> WindowTask:
        """WikiText-2 raw test from ``<data_dir>/wikitext-2-raw/wiki.test.raw``."""
        return cls(name, wikitext2_text(data_dir), window, limit, **kwargs)

    def token_ids(self, tokenizer: Any) -> list[int]:
        """The whole text tokenized at once, default special tokens (kept for this tokenizer)."""
        if self._ids is None or self._ids[0] is not tokenizer:
            ids = tokenizer(self.text, verbose=False)["input_ids"]
            self._ids = (tokenizer, list(ids))
        return self._ids[1]

    def windows(self, tokenizer: Any, model: torch.nn.Module) -> torch.Tensor:
        """The windows to score for ``model``: ``[min(limit, numel // W), W]``."""
        width = window_length(model, self.window)
        if width < self.window:
            log.info("%s: window %d capped at the model's %d positions", self.name,
                     self.window, width)  # fmt: skip
        out = token_windows(self.token_ids(tokenizer), width)
        return out if self.limit is None else out[: self.limit]

    def score(
        self, lm: ScoringLM | torch.nn.Module, progress: Progress | None = None
    ) -> TaskResult:
        """Score every window with ``lm``'s model (an LM of either path, or a bare model).

        Scoring always runs the fast loop (:meth:`FastLM.score_windows`): there is no lm-eval
        computation to reproduce here, only the reference formula.
        """
        fast, windows = self._prepare(lm)
        width = int(windows.shape[1])
        fast.progress = progress
        if progress is not None:
            progress.start_task(self.name)
        fast.reset_counters()
        t0 = time.perf_counter()
        try:
            lls = fast.score_windows(windows)
            if fast.device.type == "cuda":
                torch.cuda.synchronize(fast.device)
        finally:
            fast.progress = None
        wall = time.perf_counter() - t0
        if progress is not None:
            progress.end_task()
        return TaskResult(
            self.name,
            OUTPUT_TYPE,
            window_frame(lls, width),
            wall,
            fast.forward_tokens,
            fast.forward_time_s,
            {"perplexity": gptq_perplexity(lls, width)} if lls else {},
        )

    def _prepare(self, lm: Any) -> tuple[FastLM, torch.Tensor]:
        """The fast-path LM that scores for ``lm`` (itself when it is one) and the windows."""
        from kbit.evaluation.lm import ScoringLM, make_lm
        from kbit.evaluation.speed.scoring import FastLM

        if isinstance(lm, FastLM):
            return lm, self.windows(lm.tokenizer, lm.model)
        if isinstance(lm, ScoringLM):
            model, tok, batch_size = lm.model, lm.tokenizer, int(lm.batch_size)
        elif isinstance(lm, torch.nn.Module):
            if self.tokenizer is None:
                raise ValueError(f"task {self.name!r}: a bare model needs the task's tokenizer")
            model, tok, batch_size = lm, self.tokenizer, int(self.batch_size)
        else:
            raise TypeError(f"cannot score {self.name!r} with a {type(lm).__name__}")
        windows = self.windows(tok, model)
        if self._fast is None or self._fast[0] is not lm:
            fast = make_lm(model, tok, batch_size, "float32", max_length=int(windows.shape[1]))
            self._fast = (lm, fast)
        return self._fast[1], windows
