"""The study config: schema validation with clear errors, defaults, sweep expansion, job layout."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import yaml

from kbit.spec import QuantSpec
from kbit.study import ConfigError, build_study, load_study

ROOT = Path(__file__).resolve().parents[1]


def minimal() -> dict:
    return {
        "models": {"m": {"hf_id": "org/m", "revision": "v1", "family": "f", "params": 1e8}},
        "tasks": ["piqa"],
        "quant": {"sweeps": {"p": {"dtype": "float", "bits": [3, 4], "block_size": 64}}},
    }


def test_default_config_is_the_pythia_study():
    study = load_study(ROOT / "config" / "config.yaml")
    assert list(study.models) == [
        "pythia-70m",
        "pythia-160m",
        "pythia-410m",
        "pythia-1b",
        "pythia-1.4b",
    ]
    assert {m["revision"] for m in study.models.values()} == {"step143000"}
    assert study.quant_ids == ["fp16"] + [
        f"float{k}-e{2 if k == 3 else 3}-b64" for k in range(3, 9)
    ]
    assert study.tasks == ["lambada_openai", "piqa", "hellaswag", "winogrande", "wikitext"]


def test_smoke_config_has_two_architectures_and_both_eval_paths():
    study = load_study(ROOT / "config" / "smoke.yaml")
    archs = {m["tiny"]["arch"] for m in study.models.values()}
    assert {"gpt_neox", "opt"} <= archs
    batched = {m for m in study.models if study.batched(m)}
    assert batched and batched != set(study.models)
    assert study.results == "results/smoke"


def test_defaults_are_filled():
    study = build_study(minimal())
    cfg = study.config
    assert cfg["eval"]["dtype"] == "auto"
    assert cfg["analysis"]["accuracy_metrics"]["piqa"] == "acc"
    assert cfg["quantize"]["quantize_lm_head"] is False
    assert cfg["results"] == "results"
    assert study.quant_ids == ["fp16", "float3-e2-b64", "float4-e3-b64"]
    assert study.sweeps == {"p": ["float3-e2-b64", "float4-e3-b64"]}


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda c: c["quant"]["sweeps"]["p"].update(bits=[3, 9]), "quant.sweeps.p.bits"),
        (lambda c: c["quant"]["sweeps"]["p"].update(dtype="posit"), "quant.sweeps.p.dtype"),
        (
            lambda c: (
                c["eval"].update(device="tpu") if "eval" in c else c.update(eval={"device": "tpu"})
            ),
            "eval.device",
        ),
        (lambda c: c.update(tasks=[]), "'tasks'"),
        (lambda c: c["models"]["m"].pop("revision"), "models.m"),
        (lambda c: c.update(typo_key=1), "typo_key"),
        (lambda c: c["quant"].update(specs=["float9-b64"]), "quant.specs.0"),
        (
            lambda c: c["quant"]["sweeps"]["p"].update(dtype="int", exponent_bits=2),
            "quant.sweeps.p",
        ),
    ],
)
def test_bad_config_names_key_and_allowed_values(mutate, expected):
    cfg = copy.deepcopy(minimal())
    mutate(cfg)
    with pytest.raises(ConfigError) as info:
        build_study(cfg)
    assert expected in str(info.value)


def test_error_lists_allowed_values():
    cfg = minimal()
    cfg["eval"] = {"device": "tpu"}
    with pytest.raises(ConfigError, match=r"auto.*cpu.*cuda"):
        build_study(cfg)


def test_model_sources_and_dirs():
    cfg = minimal()
    cfg["models"]["local"] = {"path": "/data/llama", "family": "llama"}
    cfg["models"]["g"] = {"gguf": "/data/m.gguf", "family": "smol"}
    study = build_study(cfg)
    assert study.model_dir("local") == "/data/llama"
    assert study.model_dir("g") == "resources/models/g"
    assert study.model_meta("m") == {
        "model": "m",
        "hf_id": "org/m",
        "revision": "v1",
        "family": "f",
    }


def test_sweep_exponent_rules_and_tensor_blocks():
    cfg = minimal()
    cfg["quant"]["sweeps"] = {
        "e": {"dtype": "float", "bits": 6, "exponent_bits": ["half", 2], "block_size": "tensor"}
    }
    study = build_study(cfg)
    assert study.quant_ids == ["fp16", "float6-e3-bt", "float6-e2-bt"]
    assert QuantSpec.parse("float6-e3-bt").block_size is None


def test_config_readme_documents_every_top_level_key():
    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    readme = (ROOT / "config" / "README.md").read_text()
    for key in schema["properties"]:
        assert f"`{key}`" in readme, key


def test_list_errors_name_the_element_and_sources_are_worded_for_a_person():
    cfg = minimal()
    cfg["quant"]["sweeps"]["p"]["bits"] = [4, 9]
    with pytest.raises(ConfigError) as info:
        build_study(cfg)
    assert "'quant.sweeps.p.bits.1': 9 is greater than the maximum of 8" in str(info.value)
    cfg = minimal()
    cfg["models"]["m"]["path"] = "/x"
    with pytest.raises(ConfigError) as info:
        build_study(cfg)
    msg = str(info.value)
    assert "models.m': it gives both 'hf_id' and 'path'" in msg and "exactly one source" in msg
    assert "valid under" not in msg  # no schema jargon


def test_inputs_are_checked_before_any_job(tmp_path):
    from kbit.study import check_inputs

    tok = tmp_path / "tok.json"
    tok.write_text("{}")
    cfg = {
        "models": {
            "a": {"path": str(tmp_path / "missing"), "family": "f"},
            "b": {"gguf": str(tmp_path / "x.gguf"), "family": "f"},
            "c": {"tiny": {"arch": "opt", "tokenizer": str(tmp_path / "typo.json")}, "family": "f"},
            "d": {"tiny": {"arch": "opt", "tokenizer": str(tok)}, "family": "f"},
        },
        "tasks": ["piqa", "piqaa", "wikitext"],
        "data_dir": str(tmp_path / "data"),
        "quant": {"specs": ["int4-b64-gptq"], "calibration": {"corpus": "task:wikitext"}},
    }
    (tmp_path / "data" / "wikitext-2-raw").mkdir(parents=True)
    (tmp_path / "data" / "wikitext-2-raw" / "wiki.test.raw").write_text("x\n")
    with pytest.raises(ConfigError) as info:
        check_inputs(build_study(cfg))
    msg = str(info.value)
    assert f"models.a.path: {tmp_path / 'missing'} does not exist" in msg
    assert "models.b.gguf" in msg and "does not exist" in msg
    assert "models.c.tiny.tokenizer" in msg and "models.d" not in msg
    assert "'piqaa' is neither a local task" in msg and "did you mean piqa" in msg
    assert "piqa needs piqa/valid.jsonl" in msg
    assert "calibrating on the documents that are scored" in msg


def test_changed_task_sources_are_reported_and_a_null_data_dir_skips_them(tmp_path):
    """The content check of prepared tasks: same bytes pass (any timestamps), changed bytes
    name the task and file; with data_dir null the standard tasks are not local and a record
    left from an earlier preparation is not read."""
    from kbit.evaluation.tasks import prepare_task
    from kbit.study import _source_problems

    data = ROOT / "tests" / "data" / "eval"
    copy_dir = tmp_path / "data"
    shutil.copytree(data, copy_dir)
    cfg = minimal() | {"data_dir": str(copy_dir), "resources": str(tmp_path / "res")}
    study = build_study(cfg)
    prepare_task("piqa", copy_dir, study.task_dir("piqa").parent)
    assert _source_problems(study) == []
    source = Path(study.task_sources("piqa")[0])
    source.write_bytes(source.read_bytes() + b"\n")
    (msg,) = _source_problems(study)
    assert msg.startswith(f"tasks: piqa was prepared from other contents of {source};")
    assert _source_problems(build_study(cfg | {"data_dir": None})) == []
