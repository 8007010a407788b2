"""Convert the original released evaluation files into the records of lm-eval's hub datasets.

Compute nodes often cannot reach the Hugging Face hub, so the project evaluates from local copies
of the files the data sets were originally released as. Each converter turns one release into a
JSONL file whose records have the SAME field names and values as the hub data set that
lm-evaluation-harness loads for the standard task, so lm-eval's own prompt functions apply
unchanged and the local task yields the same documents, prompts and targets as the hub task.

==============  =====================================  =========================================
task            original files (under ``source_dir``)  record (one JSON object per document)
==============  =====================================  =========================================
lambada_openai  lambada_openai/lambada_test.jsonl      ``{"text"}``, as EleutherAI/lambada_openai
piqa            piqa/valid.jsonl, valid-labels.lst     ``{"goal", "sol1", "sol2", "label"}`` (int)
hellaswag       hellaswag/hellaswag_val_full.txt       ``{"query", "choices", "label"}`` (int)
winogrande      winogrande/dev.jsonl, dev-labels.lst   ``{"sentence", "option1", "option2",
                                                       "answer"}`` (answer "1" or "2")
wikitext        wikitext-2-raw/wiki.test.raw           ``{"page"}``, as
                                                       EleutherAI/wikitext_document_level
==============  =====================================  =========================================

HellaSwag is the one approximation: the available copy is llama.cpp's 6-line text format
(``activity_label: context``, the gold index, four endings), which lacks lm-eval's ``ctx_a`` and
``ctx_b`` fields, so lm-eval's ``preprocess(activity_label + ": " + ctx_a + " " +
ctx_b.capitalize())`` cannot be rebuilt and its bracket tags were stripped slightly differently.
The record already holds the processed fields (query = line 1, choices = lines 3-6, label =
int(line 2)); lm-eval scores each choice as ``" " + choice`` through its default target
delimiter. Scores on it differ slightly from the hub ``hellaswag``.

WikiText pages are rebuilt exactly as the ``EleutherAI/wikitext_document_level`` loading script
does: the raw file is split into lines at ``"\\n"``; a line that, after turning ``"= = ="`` into
``"==="`` and ``"= ="`` into ``"=="`` and stripping, starts with ``"= "`` and ends with ``" ="``
(a top-level heading) closes the running page, which is kept when it is not blank; the last page
is always kept. lm-eval's ``wikitext`` then detokenizes each page and counts words on the
original page, so its word and byte perplexities are unchanged.

A user corpus for perplexity (e.g. a Pile CommonCrawl sample) is converted by
:func:`convert_corpus` to ``{"text"}`` records, either from JSONL with a ``"text"`` field or from
raw text cut into documents at blank lines or into fixed-size chunks.

All outputs are written atomically and only when their content changes, so repeated conversions
are idempotent and do not touch timestamps that a workflow tracks.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from kbit.io import write_bytes

#: original files of each task, relative to the evaluation data directory
TASK_FILES: dict[str, list[str]] = {
    "lambada_openai": ["lambada_openai/lambada_test.jsonl"],
    "piqa": ["piqa/valid.jsonl", "piqa/valid-labels.lst"],
    "hellaswag": ["hellaswag/hellaswag_val_full.txt"],
    "winogrande": ["winogrande/dev.jsonl", "winogrande/dev-labels.lst"],
    "wikitext": ["wikitext-2-raw/wiki.test.raw"],
}

#: documents in the full releases (the hub tasks' evaluation splits)
FULL_DOC_COUNTS: dict[str, int] = {
    "lambada_openai": 5153,
    "piqa": 1838,
    "hellaswag": 10042,
    "winogrande": 1267,
    "wikitext": 62,
}

#: ways of cutting a raw-text corpus into documents
CORPUS_SPLITS = ("paragraph", "chunk")

_HELLASWAG_LINES_PER_ITEM = 6


class DataFileError(FileNotFoundError):
    """An original evaluation file (or a corpus) is missing."""


class DataFormatError(ValueError):
    """An original evaluation file does not have the format of its release."""


# ------------------------------------------------------------------------------------ helpers
def write_jsonl_atomic(records: Iterable[dict[str, Any]], path: Path) -> bool:
    """Write ``records`` as JSONL to ``path`` atomically; return False when nothing changed.

    The content is compared with the existing file first so that an unchanged conversion keeps
    the file's timestamp (workflow managers would otherwise rerun everything downstream).
    """
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    return write_bytes(data, path, if_changed=True)


def _require(path: Path, task: str) -> Path:
    if not path.is_file():
        raise DataFileError(
            f"original data file for task {task!r} not found: {path} "
            f"(expected files under the data directory: {', '.join(TASK_FILES[task])})"
        )
    return path


def _read_jsonl(path: Path, task: str) -> list[dict[str, Any]]:
    records = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(
                    f"{path}:{lineno}: not valid JSON for task {task!r}: {err}"
                ) from err
            if not isinstance(rec, dict):
                raise DataFormatError(f"{path}:{lineno}: expected a JSON object for task {task!r}")
            records.append(rec)
    return records


def _read_labels(path: Path, n: int, task: str) -> list[str]:
    labels = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if len(labels) != n:
        raise DataFormatError(
            f"{path}: {len(labels)} labels for {n} records of task {task!r}; "
            "line i of the labels file must be the gold of record i"
        )
    return labels


def _fields(rec: dict[str, Any], keys: tuple[str, ...], where: str) -> dict[str, Any]:
    missing = [k for k in keys if k not in rec]
    if missing:
        raise DataFormatError(f"{where}: record lacks field(s) {missing}; it has {sorted(rec)}")
    return {k: rec[k] for k in keys}


# --------------------------------------------------------------------------------- converters
def lambada_records(source_dir: Path) -> list[dict[str, Any]]:
    """LAMBADA (OpenAI): the release already is the hub's ``{"text"}`` records."""
    path = _require(source_dir / TASK_FILES["lambada_openai"][0], "lambada_openai")
    return [_fields(r, ("text",), str(path)) for r in _read_jsonl(path, "lambada_openai")]


def piqa_records(source_dir: Path) -> list[dict[str, Any]]:
    """PIQA validation with the labels file merged in as an int ``label``."""
    data = _require(source_dir / TASK_FILES["piqa"][0], "piqa")
    labels_path = _require(source_dir / TASK_FILES["piqa"][1], "piqa")
    records = _read_jsonl(data, "piqa")
    labels = _read_labels(labels_path, len(records), "piqa")
    out = []
    for i, (rec, label) in enumerate(zip(records, labels, strict=True)):
        if label not in ("0", "1"):
            raise DataFormatError(f"{labels_path}:{i + 1}: label {label!r} is not 0 or 1")
        out.append(
            {**_fields(rec, ("goal", "sol1", "sol2"), f"{data}:{i + 1}"), "label": int(label)}
        )
    return out


def winogrande_records(source_dir: Path) -> list[dict[str, Any]]:
    """WinoGrande 1.1 dev (= lm-eval's winogrande_xl validation), ``answer`` as "1"/"2".

    The labels file is the authority for the answer; where the JSONL carries one too, the two
    must agree (a disagreement means mismatched files).
    """
    data = _require(source_dir / TASK_FILES["winogrande"][0], "winogrande")
    labels_path = _require(source_dir / TASK_FILES["winogrande"][1], "winogrande")
    records = _read_jsonl(data, "winogrande")
    labels = _read_labels(labels_path, len(records), "winogrande")
    out = []
    for i, (rec, label) in enumerate(zip(records, labels, strict=True)):
        where = f"{data}:{i + 1}"
        if label not in ("1", "2"):
            raise DataFormatError(f"{labels_path}:{i + 1}: answer {label!r} is not 1 or 2")
        if "answer" in rec and str(rec["answer"]) != label:
            raise DataFormatError(f"{where}: answer {rec['answer']!r} != label {label!r}")
        fields = _fields(rec, ("sentence", "option1", "option2"), where)
        if "_" not in fields["sentence"]:
            raise DataFormatError(f"{where}: sentence has no '_' blank: {fields['sentence']!r}")
        out.append({**fields, "answer": label})
    return out


def hellaswag_records(source_dir: Path) -> list[dict[str, Any]]:
    """HellaSwag from llama.cpp's 6-line format: query, gold index, four endings."""
    path = _require(source_dir / TASK_FILES["hellaswag"][0], "hellaswag")
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % _HELLASWAG_LINES_PER_ITEM:
        raise DataFormatError(
            f"{path}: {len(lines)} lines is not a multiple of {_HELLASWAG_LINES_PER_ITEM} "
            "(context, gold index 0-3, four endings per item)"
        )
    out = []
    for start in range(0, len(lines), _HELLASWAG_LINES_PER_ITEM):
        query, gold, *choices = (ln.rstrip("\r") for ln in lines[start : start + 6])
        if gold.strip() not in ("0", "1", "2", "3"):
            raise DataFormatError(f"{path}:{start + 2}: gold index {gold!r} is not one of 0-3")
        out.append({"query": query, "choices": choices, "label": int(gold)})
    return out


def is_top_level_heading(line: str) -> bool:
    """The wikitext_document_level rule for a line that starts a new page ("= Title =")."""
    rline = line.replace("= = =", "===").replace("= =", "==").strip()
    return rline.startswith("= ") and rline.endswith(" =")


def wikitext_pages(text: str) -> list[str]:
    """Split a raw WikiText file into pages exactly as EleutherAI/wikitext_document_level does."""
    pages: list[str] = []
    ret: list[str] = []
    for line in text.split("\n"):
        if is_top_level_heading(line):
            page = "\n".join(ret)
            if page.strip():
                pages.append(page)
            ret = []
        ret.append(line)
    pages.append("\n".join(ret))
    return pages


def wikitext_records(source_dir: Path) -> list[dict[str, Any]]:
    """WikiText-2 raw test as document-level ``{"page"}`` records."""
    path = _require(source_dir / TASK_FILES["wikitext"][0], "wikitext")
    # text mode with universal newlines, as the loading script's open(..., encoding="utf-8")
    with path.open(encoding="utf-8") as fh:
        text = fh.read()
    return [{"page": p} for p in wikitext_pages(text)]


CONVERTERS: dict[str, Callable[[Path], list[dict[str, Any]]]] = {
    "lambada_openai": lambada_records,
    "piqa": piqa_records,
    "hellaswag": hellaswag_records,
    "winogrande": winogrande_records,
    "wikitext": wikitext_records,
}


def convert_task(task: str, source_dir: Path, out_dir: Path) -> Path:
    """Convert the original files of ``task`` under ``source_dir`` into ``out_dir/<task>.jsonl``.

    Raises DataFileError naming the path and the task when an original file is missing.
    """
    if task not in CONVERTERS:
        raise ValueError(f"no converter for task {task!r}; known tasks: {sorted(CONVERTERS)}")
    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise DataFileError(
            f"evaluation data directory for task {task!r} not found: {source_dir} "
            f"(expected {', '.join(TASK_FILES[task])} under it)"
        )
    out = Path(out_dir) / f"{task}.jsonl"
    write_jsonl_atomic(CONVERTERS[task](source_dir), out)
    return out


# ------------------------------------------------------------------------------------ corpora
def _paragraphs(text: str) -> Iterator[str]:
    r"""Documents separated by blank (whitespace-only) lines, stripped (lm-eval's word count
    ``len(re.split(r"\s+", doc))`` would count edge whitespace as an extra word)."""
    for block in re.split(r"\n[ \t\r\f\v]*\n", text):
        block = block.strip()
        if block:
            yield block


def _chunks(text: str, size: int) -> Iterator[str]:
    """Consecutive pieces of about ``size`` characters, cut at whitespace when possible.

    Cutting at whitespace keeps words whole, so word counts (word perplexity) are not inflated
    by split words; each piece is stripped, since lm-eval counts an edge space as a word.
    """
    start = 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            cut = max(text.rfind(" ", start + 1, end), text.rfind("\n", start + 1, end))
            if cut > start:
                end = cut
        piece = text[start:end].strip()
        if piece:
            yield piece
        start = end


def _load_tokenizer(tokenizer: Any) -> Any:
    """Accept a tokenizer object, a tokenizer directory, or a tokenizer.json file."""
    if tokenizer is None or not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    path = Path(tokenizer)
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if path.is_file():
        return PreTrainedTokenizerFast(tokenizer_file=str(path))
    if path.is_dir():
        return AutoTokenizer.from_pretrained(str(path))
    raise FileNotFoundError(
        f"tokenizer not found: {path} (give a tokenizer directory or a tokenizer.json file)"
    )


def _truncate_to_tokens(text: str, tokenizer: Any, budget: int) -> tuple[str, int]:
    """Cut ``text`` after at most ``budget`` tokens, at a token's character boundary."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    if len(offsets) <= budget:
        return text, len(offsets)
    if budget <= 0:
        return "", 0
    return text[: offsets[budget - 1][1]], budget


def corpus_documents(
    path: Path, split: str = "paragraph", chunk_chars: int = 4000
) -> Iterator[str]:
    """Documents of a user corpus: JSONL ``"text"`` fields, or raw text split by ``split``."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"corpus file not found: {path}")
    if split not in CORPUS_SPLITS:
        raise ValueError(f"corpus split {split!r} is not one of {CORPUS_SPLITS}")
    if path.suffix in (".jsonl", ".json"):
        for i, rec in enumerate(_read_jsonl(path, "corpus")):
            if not isinstance(rec.get("text"), str):
                raise DataFormatError(f"{path}: record {i + 1} has no string field 'text'")
            yield rec["text"]
        return
    text = path.read_text(encoding="utf-8")
    if split == "paragraph":
        yield from _paragraphs(text)
    else:
        if chunk_chars <= 0:
            raise ValueError(
                f"chunk_chars must be a positive number of characters, got {chunk_chars}"
            )
        yield from _chunks(text, chunk_chars)


def convert_corpus(
    path: Path,
    out: Path,
    max_docs: int | None = None,
    max_tokens: int | None = None,
    tokenizer: Any = None,
    split: str = "paragraph",
    chunk_chars: int = 4000,
) -> Path:
    """Convert a perplexity corpus into ``{"text"}`` JSONL records at ``out``.

    ``path`` is JSONL with a ``"text"`` field per line (``.jsonl``/``.json``) or raw text, cut
    into documents at blank lines (``split="paragraph"``) or into chunks of about
    ``chunk_chars`` characters (``split="chunk"``). ``max_docs`` keeps the first documents;
    ``max_tokens`` caps the total token count under ``tokenizer`` (an object, a directory or a
    tokenizer.json), cutting the last document at a token boundary, so that the evaluation cost
    is fixed across models that share a tokenizer. Empty documents are dropped.
    """
    if max_docs is not None and max_docs <= 0:
        raise ValueError(f"max_docs must be a positive integer or None, got {max_docs}")
    if max_tokens is not None:
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive integer or None, got {max_tokens}")
        if tokenizer is None:
            raise ValueError("max_tokens needs a tokenizer to count tokens (got tokenizer=None)")
    tok = _load_tokenizer(tokenizer)
    records: list[dict[str, str]] = []
    used = 0
    for doc in corpus_documents(path, split=split, chunk_chars=chunk_chars):
        if max_docs is not None and len(records) >= max_docs:
            break
        if max_tokens is not None:
            if used >= max_tokens:
                break
            doc, n = _truncate_to_tokens(doc, tok, max_tokens - used)
            used += n
        if doc.strip():
            records.append({"text": doc})
    if not records:
        raise DataFormatError(f"corpus {path} gave no non-empty documents")
    write_jsonl_atomic(records, Path(out))
    return Path(out)
