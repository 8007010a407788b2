"""Calibration tokens: text a method sees before it is evaluated, never the text it is scored on.

GPTQ fits each layer to the activations of a calibration set, the mixed-precision search scores
its trials on a fixed token budget, and the loss-landscape features measure a loss: all of them
need text, and none of it may be text the study evaluates (calibrating on the scored documents
would flatter exactly the methods being compared).

``quant.calibration.corpus`` names the text:

- ``pydoc`` (the default): the Python standard library's reference documentation as shipped with
  every Python (``pydoc_data.topics``, about 465,000 characters of English technical prose,
  roughly 110,000 tokens). It is available offline everywhere and shares nothing with the
  evaluation tasks (LAMBADA's novels, PIQA, HellaSwag, WinoGrande, WikiText-2's Wikipedia). Its
  domain is narrower than the C4 web text GPTQ's paper used: for a paper-faithful run point the
  corpus at a C4 (or Pile) sample file;
- a path: a text file, or JSONL with a ``text`` field per line;
- ``task:<name>``: the original text of a local task (for example ``task:lambada_openai``); the
  study refuses it when it also evaluates that task.

Windows follow GPTQ's ``get_c4``/``get_wikitext2`` sampling: ``n_samples`` windows of ``seq_len``
consecutive tokens at uniformly random offsets of the tokenized corpus (a seeded generator), so
the same settings and tokenizer always give the same tensor. With the default corpus 128 windows
of 2048 tokens overlap (the corpus holds about 50 such windows): the set is as diverse as the text.
Tokens are stored as safetensors (no pickle) with the settings in the metadata.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from kbit.io import atomic_write

DEFAULT_CORPUS = "pydoc"
TASK_PREFIX = "task:"


class CalibrationError(ValueError):
    """Calibration settings that cannot be met; the message says what to change."""


def pydoc_text() -> str:
    """The Python reference documentation shipped with the interpreter, topics in sorted order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def corpus_text(corpus: str, data_dir: str | Path | None = None) -> str:
    """The text of ``corpus`` (see the module docstring for the three forms)."""
    if corpus == DEFAULT_CORPUS:
        return pydoc_text()
    if corpus.startswith(TASK_PREFIX):
        from kbit.evaluation.convert import CONVERTERS, TASK_FILES

        task = corpus[len(TASK_PREFIX) :]
        if task not in TASK_FILES:
            raise CalibrationError(
                f"calibration corpus {corpus!r}: local tasks are {list(TASK_FILES)}"
            )
        if data_dir is None:
            raise CalibrationError(f"calibration corpus {corpus!r} needs data_dir (the task files)")
        records = CONVERTERS[task](Path(data_dir))
        texts = []
        for r in records:
            texts.append(" ".join(str(v) for k, v in r.items() if isinstance(v, str)))
        return "\n\n".join(texts)
    path = Path(corpus)
    if not path.is_file():
        raise CalibrationError(
            f"calibration corpus {corpus!r} is neither 'pydoc', 'task:<name>' nor an existing file"
        )
    if path.suffix in (".jsonl", ".json"):
        lines = path.read_text(encoding="utf-8").splitlines()
        return "\n\n".join(json.loads(ln)["text"] for ln in lines if ln.strip())
    return path.read_text(encoding="utf-8")


def tokenize(tokenizer: Any, text: str, chunk_chars: int = 200_000) -> torch.Tensor:
    """All token ids of ``text`` (1-D int64), tokenized in paragraph-aligned pieces so that very
    long texts do not hit a tokenizer's length warning; no special tokens are added."""
    ids: list[int] = []
    start = 0
    while start < len(text):
        end = min(len(text), start + chunk_chars)
        if end < len(text):
            cut = text.rfind("\n\n", start, end)
            end = cut + 2 if cut > start else end
        ids += tokenizer(text[start:end], add_special_tokens=False, verbose=False)["input_ids"]
        start = end
    return torch.tensor(ids, dtype=torch.int64)


def sample_windows(ids: torch.Tensor, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n_samples`` windows of ``seq_len`` consecutive tokens at seeded random offsets."""
    if n_samples < 1 or seq_len < 2:
        raise CalibrationError(f"n_samples={n_samples}, seq_len={seq_len}: need >= 1 and >= 2")
    if ids.numel() < seq_len + 1:
        raise CalibrationError(
            f"the calibration corpus has {ids.numel()} tokens, fewer than one window of "
            f"{seq_len}: lower quant.calibration.seq_len or give a longer corpus"
        )
    gen = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, ids.numel() - seq_len, (n_samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def calibration_tokens(
    tokenizer: Any, settings: Mapping[str, Any], data_dir: str | Path | None = None
) -> torch.Tensor:
    """The calibration tensor [n_samples, seq_len] for ``settings`` (the config section
    ``quant.calibration``: corpus, n_samples, seq_len, seed)."""
    text = corpus_text(str(settings.get("corpus", DEFAULT_CORPUS)), data_dir)
    ids = tokenize(tokenizer, text)
    return sample_windows(
        ids, int(settings["n_samples"]), int(settings["seq_len"]), settings["seed"]
    )


def write_tokens(tokens: torch.Tensor, path: str | Path, meta: Mapping[str, Any]) -> Path:
    """Store tokens (safetensors) with ``meta`` (JSON in the file's metadata)."""
    from safetensors.torch import save_file

    data = {"tokens": tokens.to(torch.int64).contiguous()}
    info = {"kbit": json.dumps(dict(meta), default=str)}
    return atomic_write(path, lambda tmp: save_file(data, str(tmp), metadata=info))


def read_tokens(path: str | Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """Tokens and metadata written by :func:`write_tokens`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("kbit", "{}"))
        return f.get_tensor("tokens"), meta
