"""Offline task definitions: conversions of the original files and the lm-eval tasks built on them.

Expected values are derived by hand from the raw files and lm-eval's documented transformations,
never from the converter under test. Tests on the real releases skip when the shared data
directory (``$KBIT_SHARED_DATA``, default ``../shared/data`` beside the repository) is absent;
the small sample files in ``tests/data/eval`` exercise the same code everywhere.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from models import shared_data_dir

from kbit.evaluation import convert
from kbit.evaluation.tasks import (
    STANDARD_TASKS,
    TASK_FILES,
    DataFileError,
    DataFormatError,
    build_task_dict,
    load_tasks,
    prepare_tasks,
    prepared_files,
    render_template,
    task_files,
    template_dir,
)

SHARED = shared_data_dir()
REAL_EVAL = SHARED / "eval"
SAMPLE_EVAL = Path(__file__).resolve().parent / "data" / "eval"
GPT2_TOKENIZER = SHARED / "tokenizers" / "gpt2"

HUB_YAML = {
    "lambada_openai": "lambada/lambada_openai.yaml",
    "piqa": "piqa/piqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "wikitext": "wikitext/wikitext.yaml",
}
#: lm-eval request type sent to the model for each task output type
REQUEST_TYPE = {
    "multiple_choice": "loglikelihood",
    "loglikelihood": "loglikelihood",
    "loglikelihood_rolling": "loglikelihood_rolling",
}
SAMPLE_COUNTS = {"lambada_openai": 4, "piqa": 4, "hellaswag": 4, "winogrande": 4, "wikitext": 3}

needs_real = pytest.mark.skipif(
    not all((REAL_EVAL / rel).is_file() for files in TASK_FILES.values() for rel in files),
    reason=f"real evaluation files not found under {REAL_EVAL} (set KBIT_SHARED_DATA)",
)


def hub_yaml(task: str) -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent / HUB_YAML[task]


def hub_config(task: str) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(hub_yaml(task), resolve_func=False)


def requests_of(task, doc_ids: list[int]) -> list:
    task.build_all_requests(samples=doc_ids, rank=0, world_size=1)
    return sorted(task.instances, key=lambda inst: (inst.doc_id, inst.idx))


@pytest.fixture(scope="module")
def real_work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("real_tasks")


@pytest.fixture(scope="module")
def real_tasks(real_work) -> dict:
    if not REAL_EVAL.is_dir():
        pytest.skip(f"real evaluation files not found under {REAL_EVAL}")
    return build_task_dict(list(STANDARD_TASKS), REAL_EVAL, real_work)["tasks"]


@pytest.fixture(scope="module")
def sample_work(tmp_path_factory) -> Path:
    return prepare_tasks(list(STANDARD_TASKS), SAMPLE_EVAL, tmp_path_factory.mktemp("sample"))


@pytest.fixture(scope="module")
def raw_wikitext() -> str:
    path = REAL_EVAL / "wikitext-2-raw" / "wiki.test.raw"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path.read_text(encoding="utf-8")


# ------------------------------------------------------------------------- real releases
@needs_real
def test_doc_counts_match_hub(real_tasks):
    for name, n in convert.FULL_DOC_COUNTS.items():
        assert len(real_tasks[name].eval_docs) == n, name


@needs_real
def test_local_definitions_and_output_types_match_hub(real_tasks):
    for name, task in real_tasks.items():
        hub = hub_config(name)
        assert task.config.task == name
        assert task.config.dataset_path == "json"
        assert hub["output_type"] == task.OUTPUT_TYPE
        last = len(task.eval_docs) - 1
        types = {inst.request_type for inst in requests_of(task, [0, last])}
        assert types == {REQUEST_TYPE[hub["output_type"]]}
        assert [m["metric"] for m in task.config.metric_list] == [
            m["metric"] for m in hub["metric_list"]
        ]


def test_templates_copy_hub_prompts():
    """Prompt fields of the local templates are lm-eval's own (hellaswag: after process_docs)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    for name in STANDARD_TASKS:
        local = load_yaml(template_dir() / f"{name}.yaml", resolve_func=True)
        hub = load_yaml(hub_yaml(name), resolve_func=True)
        for key in ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice"):
            a, b = local.get(key), hub.get(key)
            if callable(a) or callable(b):
                assert (a.__module__, a.__name__) == (b.__module__, b.__name__), (name, key)
            else:
                assert a == b, (name, key)
        assert local["metric_list"] == hub["metric_list"], name


@needs_real
def test_lambada_first_and_last(real_tasks):
    task = real_tasks["lambada_openai"]
    first, last = task.eval_docs[0], task.eval_docs[len(task.eval_docs) - 1]
    # by hand: the prompt is the text without its last space-separated word
    assert first["text"].endswith("I don't care about signs")
    assert task.doc_to_text(first) == first["text"][: -len(" signs")]
    assert task.doc_to_target(first) == " signs"
    assert last["text"].endswith("I would never forget the rules, Grandmother")
    assert task.doc_to_target(last) == " Grandmother"
    ctx, cont = requests_of(task, [len(task.eval_docs) - 1])[0].args
    assert ctx + cont == last["text"]


@needs_real
def test_piqa_first_and_last(real_tasks):
    task = real_tasks["piqa"]
    first, last = task.eval_docs[0], task.eval_docs[len(task.eval_docs) - 1]
    assert task.doc_to_text(first) == (
        "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    )
    assert task.doc_to_target(first) == 0  # valid-labels.lst line 1
    assert task.doc_to_text(last) == "Question: Where can I buy a tennis ball\nAnswer:"
    assert task.doc_to_choice(last) == [
        "You can purchase a tennis ball at any sports store",
        "You can purchase a tennis racket at any sports store",
    ]
    assert task.doc_to_target(last) == 0  # valid-labels.lst last line
    conts = [inst.args[1] for inst in requests_of(task, [len(task.eval_docs) - 1])]
    assert conts == [" " + c for c in task.doc_to_choice(last)]


@needs_real
def test_hellaswag_first_and_last(real_tasks):
    task = real_tasks["hellaswag"]
    first, last = task.eval_docs[0], task.eval_docs[len(task.eval_docs) - 1]
    assert task.doc_to_text(first) == "Roof shingle removal: A man is sitting on a roof. he"
    assert task.doc_to_target(first) == 3
    assert task.doc_to_choice(first) == [
        "is using wrap to wrap a pair of skis.",
        "is ripping level tiles off.",
        "is holding a rubik's cube.",
        "starts pulling up roofing on a roof.",
    ]
    assert task.doc_to_text(last).startswith("Family Life: How to tell if your teen is being")
    assert task.doc_to_target(last) == 2
    args = [inst.args for inst in requests_of(task, [0])]
    assert args[0] == (
        "Roof shingle removal: A man is sitting on a roof. he",
        " is using wrap to wrap a pair of skis.",
    )
    assert len(args) == 4


@needs_real
def test_winogrande_partial_scoring(real_tasks):
    task = real_tasks["winogrande"]
    n = len(task.eval_docs)
    insts = requests_of(task, [0, n - 1])
    # by hand: each option fills the blank to form a context; the text after "_" continues it
    assert [i.args for i in insts[:2]] == [
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
    ]
    assert task.doc_to_text(task.eval_docs[0]) == 1  # answer "2" -> index 1
    last = task.eval_docs[n - 1]
    assert insts[-1].args == (
        "She chose the black car over the green car, because the green car",
        " has more brighter color.",
    )
    assert task.doc_to_text(last) == 1


@needs_real
def test_winogrande_answers_match_labels_file(real_work, real_tasks):
    labels = (REAL_EVAL / "winogrande" / "dev-labels.lst").read_text().split()
    docs = [
        json.loads(ln)
        for ln in (real_work / "winogrande" / "winogrande.jsonl").read_text().splitlines()
    ]
    assert [d["answer"] for d in docs] == labels
    assert set(docs[0]) == {"sentence", "option1", "option2", "answer"}


@needs_real
def test_wikitext_pages_cover_raw_file(raw_wikitext):
    pages = convert.wikitext_pages(raw_wikitext)
    assert len(pages) == 62
    # the only text not in a page is the blank first line before the first heading
    assert raw_wikitext == "\n".join([" ", *pages])
    assert all(convert.is_top_level_heading(p.split("\n", 1)[0]) for p in pages)
    # subsection headings and "= Qualified for the next round" lines do not start pages
    assert not convert.is_top_level_heading(" = = Career = = ")
    assert not convert.is_top_level_heading(" = Qualified for the next round ")


@needs_real
def test_wikitext_first_and_last_page(real_tasks, raw_wikitext):
    task = real_tasks["wikitext"]
    # by hand: page 1 runs from the first heading to the line before " = Du Fu = "
    start = raw_wikitext.index(" = Robert Boulter = \n")
    end = raw_wikitext.index("\n = Du Fu = \n")
    page0 = raw_wikitext[start:end]
    assert task.eval_docs[0]["page"] == page0
    assert len(re.split(r"\s+", page0)) == 1093
    words = task.process_results(task.eval_docs[0], [-1.0])["word_perplexity"][1]
    assert words == 1093
    assert task.process_results(task.eval_docs[0], [-1.0])["bits_per_byte"][1] == len(
        page0.encode("utf-8")
    )
    last = task.eval_docs[61]["page"]
    assert last == raw_wikitext[raw_wikitext.index("\n = The Hustler ( film ) = \n") + 1 :]
    (arg,) = requests_of(task, [0])[0].args
    assert arg.startswith(" = Robert Boulter =\n\nRobert Boulter is an English film")


# ------------------------------------------------------------------------- sample files
def test_sample_files_load_through_lm_eval(tmp_path):
    tasks = build_task_dict(list(STANDARD_TASKS), SAMPLE_EVAL, tmp_path)["tasks"]
    assert sorted(tasks) == sorted(STANDARD_TASKS)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert files == sorted(prepared_files(STANDARD_TASKS, tmp_path))
    for name, task in tasks.items():
        assert len(task.eval_docs) == SAMPLE_COUNTS[name], name
        assert hub_config(name)["output_type"] == task.OUTPUT_TYPE
        insts = requests_of(task, [0])
        assert {i.request_type for i in insts} == {REQUEST_TYPE[task.OUTPUT_TYPE]}
    wiki = tasks["wikitext"].eval_docs
    assert [d["page"].split("\n", 1)[0] for d in wiki] == [
        " = Harbor Light = ",
        " = Copper River Bridge = ",
        " = Northern Larch = ",
    ]
    assert tasks["hellaswag"].doc_to_target(tasks["hellaswag"].eval_docs[3]) == 1
    assert tasks["piqa"].doc_to_target(tasks["piqa"].eval_docs[1]) == 1


def test_local_task_overrides_builtin_with_defaults_indexed(sample_work):
    """lm-eval indexes include paths after its own tasks: the local definition must win."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(sample_work), include_defaults=True)
    assert manager.task_index["piqa"].yaml_path == (sample_work / "piqa" / "piqa.yaml").resolve()
    task = manager.load(["piqa"])["tasks"]["piqa"]
    assert task.config.dataset_path == "json"
    assert len(task.eval_docs) == SAMPLE_COUNTS["piqa"]


def test_load_tasks_from_prepared_dir(sample_work):
    loaded = load_tasks(["winogrande", "wikitext"], sample_work)
    assert sorted(loaded["tasks"]) == ["wikitext", "winogrande"]
    assert len(loaded["tasks"]["winogrande"].eval_docs) == SAMPLE_COUNTS["winogrande"]
    with pytest.raises(FileNotFoundError, match="prepare_tasks"):
        load_tasks(["piqa"], sample_work / "missing")


def test_leftover_local_folder_does_not_shadow_hub_task(tmp_path, monkeypatch):
    """Only the folders of the tasks asked for locally go on lm-eval's include path."""
    import lm_eval.tasks

    prepare_tasks(["piqa"], SAMPLE_EVAL, tmp_path)
    corpus = tmp_path / "cc.txt"
    corpus.write_text("some text\n")
    seen = {}

    class Recorder(lm_eval.tasks.TaskManager):
        def __init__(self, include_path=None, include_defaults=True, **kw):
            seen.update(paths=include_path, defaults=include_defaults)
            super().__init__(include_path=include_path, include_defaults=False, **kw)

        def load(self, names):
            return super().load([n for n in names if n != "piqa"])

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Recorder)
    with pytest.raises(ValueError, match=r"\['piqa'\] are neither prepared"):
        build_task_dict(["cc", "piqa"], None, tmp_path, corpora={"cc": corpus})
    assert seen == {"paths": [str((tmp_path / "cc").resolve())], "defaults": True}


def test_conversion_is_idempotent_and_atomic(tmp_path):
    first = {t: convert.convert_task(t, SAMPLE_EVAL, tmp_path) for t in STANDARD_TASKS}
    stamps = {t: (p.read_bytes(), p.stat().st_mtime_ns) for t, p in first.items()}
    for t in STANDARD_TASKS:
        assert convert.convert_task(t, SAMPLE_EVAL, tmp_path) == first[t]
        assert (first[t].read_bytes(), first[t].stat().st_mtime_ns) == stamps[t]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{t}.jsonl" for t in STANDARD_TASKS
    )


def test_rendered_yaml_has_absolute_quoted_paths(tmp_path):
    odd = tmp_path / "dir with: colon"
    text = render_template("data_files:\n  test: __DATA_DIR__/piqa.jsonl\n", odd)
    import yaml

    assert yaml.safe_load(text) == {"data_files": {"test": str(odd.resolve() / "piqa.jsonl")}}
    with pytest.raises(ValueError, match="__DATA_DIR__"):
        render_template("task: piqa\n", odd)


def test_missing_original_file_names_path_and_task(tmp_path):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    with pytest.raises(DataFileError, match=r"'piqa'.*valid-labels\.lst"):
        prepare_tasks(["piqa"], tmp_path, tmp_path / "work")
    with pytest.raises(DataFileError, match=r"'winogrande'.*dev\.jsonl"):
        convert.convert_task("winogrande", tmp_path, tmp_path / "work")
    # names without a local definition are left to lm-eval's built-in tasks
    prepare_tasks(["arc_easy", "lambada_openai"], None, tmp_path / "hub")
    assert list((tmp_path / "hub").iterdir()) == []
    assert task_files(["piqa"], tmp_path) == [
        tmp_path / "piqa" / "valid.jsonl",
        tmp_path / "piqa" / "valid-labels.lst",
    ]


def test_malformed_inputs_are_rejected(tmp_path):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    (tmp_path / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(DataFormatError, match="2 labels for 1 records"):
        convert.convert_task("piqa", tmp_path, tmp_path / "out")
    (tmp_path / "hellaswag").mkdir()
    (tmp_path / "hellaswag" / "hellaswag_val_full.txt").write_text("ctx\n1\na\nb\nc\n")
    with pytest.raises(DataFormatError, match="not a multiple of 6"):
        convert.convert_task("hellaswag", tmp_path, tmp_path / "out")


# ------------------------------------------------------------------------------ corpora
def test_corpus_paragraphs_and_chunks(tmp_path):
    raw = tmp_path / "corpus.txt"
    raw.write_text("First doc line one.\nline two.\n\n  \n\nSecond doc.\n\n\nThird doc here.\n")
    out = convert.convert_corpus(raw, tmp_path / "c.jsonl")
    docs = [json.loads(ln)["text"] for ln in out.read_text().splitlines()]
    assert docs == ["First doc line one.\nline two.", "Second doc.", "Third doc here."]
    out = convert.convert_corpus(raw, tmp_path / "c2.jsonl", max_docs=2)
    assert len(out.read_text().splitlines()) == 2

    words = " ".join(f"word{i}" for i in range(100))
    raw.write_text(words)
    out = convert.convert_corpus(raw, tmp_path / "c3.jsonl", split="chunk", chunk_chars=50)
    chunks = [json.loads(ln)["text"] for ln in out.read_text().splitlines()]
    assert all(len(c) <= 50 for c in chunks)
    assert " ".join(chunks) == words  # cut at spaces only: no word is split

    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text('{"text": "a b c"}\n{"text": "d e"}\n')
    out = convert.convert_corpus(jsonl, tmp_path / "c4.jsonl")
    assert out.read_text() == jsonl.read_text()
    with pytest.raises(ValueError, match="max_tokens needs a tokenizer"):
        convert.convert_corpus(jsonl, tmp_path / "c5.jsonl", max_tokens=3)


@pytest.mark.skipif(not GPT2_TOKENIZER.is_dir(), reason=f"{GPT2_TOKENIZER} not found")
def test_corpus_token_budget(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(GPT2_TOKENIZER))
    jsonl = tmp_path / "corpus.jsonl"
    texts = ["The quick brown fox jumps over the lazy dog."] * 3
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    per_doc = len(tok(texts[0], add_special_tokens=False)["input_ids"])
    out = convert.convert_corpus(jsonl, tmp_path / "c.jsonl", max_tokens=per_doc + 3, tokenizer=tok)
    docs = [json.loads(ln)["text"] for ln in out.read_text().splitlines()]
    assert docs == [texts[0], "The quick brown"]
    assert sum(len(tok(d, add_special_tokens=False)["input_ids"]) for d in docs) == per_doc + 3


def test_corpus_task_is_rolling_perplexity(tmp_path):
    raw = tmp_path / "cc.txt"
    raw.write_text("Alpha beta  gamma.\n\nDelta epsilon.\n")
    tasks = build_task_dict(["pile_cc"], None, tmp_path / "work", corpora={"pile_cc": raw})
    task = tasks["tasks"]["pile_cc"]
    assert task.OUTPUT_TYPE == "loglikelihood_rolling"
    assert [d["text"] for d in task.eval_docs] == ["Alpha beta  gamma.", "Delta epsilon."]
    res = task.process_results(task.eval_docs[0], [-2.0])
    assert res["word_perplexity"] == (-2.0, 3)
    assert res["byte_perplexity"] == (-2.0, len(b"Alpha beta  gamma."))
    with pytest.raises(ValueError, match="clashes with a standard task"):
        build_task_dict(["wikitext"], None, tmp_path / "w2", corpora={"wikitext": raw})


@pytest.mark.skipif(not GPT2_TOKENIZER.is_dir(), reason=f"{GPT2_TOKENIZER} not found")
def test_sample_tasks_evaluate_with_lm_eval(sample_work):
    """The loaded task dict runs through lm-eval's evaluator with standard names and metrics."""
    import torch
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=512))
    tok = AutoTokenizer.from_pretrained(str(GPT2_TOKENIZER))
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu")
    res = evaluate(lm, load_tasks(list(STANDARD_TASKS), sample_work), bootstrap_iters=0)
    results = res["results"]
    assert sorted(results) == sorted(STANDARD_TASKS)
    assert 0.0 <= results["winogrande"]["acc,none"] <= 1.0
    assert results["wikitext"]["word_perplexity,none"] > 1.0
    assert results["lambada_openai"]["perplexity,none"] > 1.0
