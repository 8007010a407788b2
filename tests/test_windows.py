"""WikiText-2 perplexity in the GPTQ paper's convention (:mod:`kbit.evaluation.windows`).

Checked against a plain implementation written here (a loop over windows, cross-entropy on the
full logits of each), on tiny models with the real tokenizers and the real ``wiki.test.raw``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from models import shared_data_dir, tiny_model, tiny_tokenizer

from kbit.evaluation.lm import make_lm
from kbit.evaluation.metrics import METRICS_BY_OUTPUT_TYPE, task_metrics
from kbit.evaluation.records import DOC_COLUMNS, write_parquet
from kbit.evaluation.runner import task_frame
from kbit.evaluation.windows import (
    DEFAULT_WINDOW,
    OUTPUT_TYPE,
    WIKITEXT2_TEST,
    WindowTask,
    gptq_perplexity,
    hf_rows,
    token_windows,
    wikitext2_text,
    window_frame,
    window_length,
)


@pytest.fixture(scope="module")
def data_dir() -> Path:
    data = shared_data_dir() / "eval"
    if not (data / WIKITEXT2_TEST).is_file():
        pytest.skip(f"WikiText-2 test file not found under {data} (set KBIT_SHARED_DATA)")
    return data


@pytest.fixture(scope="module")
def wikitext(data_dir: Path) -> WindowTask:
    """The full test text, tokenized once per tokenizer for every test of this module."""
    return WindowTask.wikitext2(data_dir)


def _script_rows(path: Path) -> list[str]:
    """The ``wikitext`` loading script's ``_generate_examples``, verbatim in substance."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for row in f:
            rows.append(row if row.strip() else "")
    return rows


def test_rows_are_the_hf_rows_and_round_trip_the_file(data_dir: Path) -> None:
    path = data_dir / WIKITEXT2_TEST
    rows = hf_rows(path)
    assert rows == _script_rows(path)
    raw = path.read_bytes().decode("utf-8")
    lines = raw.split("\n")[:-1]  # the file ends with a newline
    assert len(rows) == len(lines) == 4358 and sum(r == "" for r in rows) == 1467
    # each row is its line with the newline kept, or "" for a whitespace-only line
    assert all(r == (ln + "\n" if ln.strip() else "") for r, ln in zip(rows, lines, strict=True))
    assert "".join(r or ln + "\n" for r, ln in zip(rows, lines, strict=True)) == raw
    assert wikitext2_text(data_dir) == "\n\n".join(rows)


def test_rows_follow_file_iteration_not_splitlines(tmp_path: Path) -> None:
    """CRLF turns into "\\n", a vertical tab or U+2028 splits nothing, a tab-only line is
    blank, a last line without newline is kept: what iterating the text file gives."""
    path = tmp_path / "wiki.test.raw"
    path.write_bytes(" = A = \r\n \r\n a\x0bb\u2028c \n\t\n last".encode())
    want = [" = A = \n", "", " a\x0bb\u2028c \n", "", " last"]
    assert hf_rows(path) == _script_rows(path) == want


@pytest.mark.parametrize(("arch", "window"), [("gpt_neox", 2048), ("gpt2", 1024)])
def test_window_count_and_cap(wikitext: WindowTask, arch: str, window: int) -> None:
    """numel // W windows of consecutive tokens, the rest dropped; GPT-2's 1024 positions cap
    the 2048 default. The GPT-2 tokenizer gives the well-known 287,644 tokens (140 windows)."""
    model, tok = tiny_model(arch), tiny_tokenizer(arch)
    assert window_length(model, DEFAULT_WINDOW) == window
    ids = wikitext.token_ids(tok)
    assert tok.decode(ids) == wikitext.text  # the joined text round-trips the tokens
    windows = wikitext.windows(tok, model)
    assert windows.shape == (len(ids) // window, window)
    assert windows.flatten().tolist() == ids[: windows.numel()]
    assert 0 < len(ids) - windows.numel() < window
    if arch == "gpt2":
        assert len(ids) == 287644 and len(token_windows(ids, 2048)) == 140


def _reference(model: torch.nn.Module, windows: torch.Tensor) -> list[float]:
    """Mean cross-entropy of tokens 1..W-1 of each window on its full logits, per window."""
    losses = []
    with torch.no_grad():
        for w in windows:
            logits = model(w[None]).logits[0]
            losses.append(F.cross_entropy(logits[:-1].float(), w[1:]).item())
    return losses


@pytest.mark.parametrize("arch", ["gpt_neox", "opt"])
def test_scores_equal_a_plain_loop(wikitext: WindowTask, arch: str) -> None:
    """Per-window log-likelihoods == -(W-1) x the plain loop's losses to float rounding; one row
    per window; the perplexity == the GPTQ code's formula on the same numbers."""
    model, tok = tiny_model(arch), tiny_tokenizer(arch)
    task = WindowTask("wiki", wikitext.text, window=128, limit=3, tokenizer=tok, batch_size=2)
    task._ids = (tok, wikitext.token_ids(tok))  # tokenized once for the module
    res = task.score(model)
    windows = task.windows(tok, model)
    losses = _reference(model, windows)
    docs = res.docs
    assert res.name == "wiki" and res.output_type == OUTPUT_TYPE == docs["output_type"].iloc[0]
    assert docs["doc_id"].tolist() == list(range(3)) == list(range(len(windows)))
    assert list(docs.columns[: len(DOC_COLUMNS)]) == list(DOC_COLUMNS)
    assert (docs["n_tokens"] == 127).all() and (docs["window"] == 128).all()
    assert docs["finite"].all() and docs["acc"].isna().all() and docs["acc_norm"].isna().all()
    assert all(len(g) == 0 for g in docs["is_greedy"]) and (docs["n_words"] == 0).all()
    got = np.array([x[0] for x in docs["ll"]])
    np.testing.assert_allclose(got, -127 * np.array(losses), rtol=1e-5)
    ppl = task_metrics(docs)["perplexity"]
    gptq = math.exp(sum(loss * 128 for loss in losses) / (len(losses) * 128))
    assert ppl == pytest.approx(gptq, rel=1e-5)
    assert ppl == pytest.approx(gptq_perplexity(got.tolist(), 128), rel=1e-12)
    assert res.reported["perplexity"] == pytest.approx(ppl, rel=1e-12)
    assert res.forward_tokens == 3 * 128 and res.wall_time_s > 0
    # an LM of either scoring path gives the same rows as the bare model
    for fast in (True, False):
        again = task.score(make_lm(model, tok, 2, fast=fast))
        pd.testing.assert_frame_equal(again.docs, docs, check_exact=True)


def test_full_length_windows_equal_a_plain_loop(wikitext: WindowTask) -> None:
    """The paper's 2048-token window (the first), fed as is."""
    model, tok = tiny_model("gpt_neox"), tiny_tokenizer("gpt_neox")
    task = WindowTask("wiki", wikitext.text, limit=1, tokenizer=tok)
    task._ids = (tok, wikitext.token_ids(tok))
    res = task.score(model)
    losses = _reference(model, task.windows(tok, model))
    got = np.array([x[0] for x in res.docs["ll"]])
    np.testing.assert_allclose(got, -2047 * np.array(losses), rtol=1e-5)
    assert (res.docs["window"] == 2048).all()


def test_rows_survive_the_parquet_contract(tmp_path: Path) -> None:
    """Run metadata broadcast, written and read back: the metric is recomputed unchanged."""
    docs = window_frame([-2000.0, -2100.5, -1990.25], 2048)
    df = task_frame(_result(docs), {"model": "m", "quant": "fp16", "output_type": OUTPUT_TYPE})
    back = pd.read_parquet(write_parquet(df, tmp_path / "w.parquet"))
    assert task_metrics(back) == task_metrics(docs)
    assert METRICS_BY_OUTPUT_TYPE[OUTPUT_TYPE] == tuple(task_metrics(back))
    want = math.exp((2000.0 + 2100.5 + 1990.25) / (3 * 2047))
    assert task_metrics(back)["perplexity"] == pytest.approx(want, rel=1e-15)


def _result(docs: pd.DataFrame):
    from kbit.evaluation.runner import TaskResult

    return TaskResult("wiki", OUTPUT_TYPE, docs, 1.0, 10)


def test_window_perplexity_needs_equal_windows_and_keeps_non_finite() -> None:
    docs = window_frame([-10.0, -12.0], 5)
    assert task_metrics(docs)["perplexity"] == pytest.approx(math.exp(22 / 8))
    uneven = docs.copy()
    uneven.loc[1, "n_tokens"] = 3
    with pytest.raises(ValueError, match="same number"):
        task_metrics(uneven)
    assert math.isnan(task_metrics(window_frame([-10.0, math.nan], 5))["perplexity"])
    assert task_metrics(window_frame([-10.0, -math.inf], 5))["perplexity"] == math.inf
    assert not window_frame([-10.0, -math.inf], 5)["finite"].iloc[1]
    with pytest.raises(ValueError, match="no windows"):
        task_metrics(window_frame([], 5), OUTPUT_TYPE)


def test_bad_inputs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="window"):
        WindowTask("w", "some text", window=1)
    with pytest.raises(ValueError, match="no window"):
        token_windows([1, 2, 3], 4)
    with pytest.raises(FileNotFoundError, match=r"wiki\.test\.raw"):
        wikitext2_text(tmp_path)
    task = WindowTask("w", "some text", window=4)
    with pytest.raises(ValueError, match="tokenizer"):
        task.score(tiny_model("gpt2"))
