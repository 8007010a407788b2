"""The packed artifact: bitwise round trip, size on disk vs accounting, and `kbit quantize`."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from models import tiny_model_dir
from transformers import AutoModelForCausalLM

from kbit.accounting import summarize
from kbit.artifact import (
    META,
    WEIGHTS,
    ArtifactError,
    load_artifact,
    quantize_to_artifact,
    spec_codebook,
)
from kbit.blockwise import quantize
from kbit.cli import main
from kbit.loading import ModelLoadError
from kbit.model_quant import quantize_model
from kbit.settings import QuantizeOptions
from kbit.spec import QuantSpec


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {arch: tiny_model_dir(arch, root) for arch in ("gpt2", "gpt_neox", "llama")}


def load(path, dtype="auto"):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def params(model):
    return dict(model.named_parameters(remove_duplicate=False))


def header_len(path) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


CASES = [
    ("gpt2", "float4-e3-b64", {}),
    ("gpt2", "int3-b64-o0.02", {"quantize_lm_head": True}),
    ("gpt_neox", "quantile3-b128-c", {"quantize_embeddings": True}),
    ("llama", "nf4-b64-o0.05", {}),
    ("llama", "mxfp4", {"exclude": ["mlp"]}),
    ("gpt_neox", "nvfp4", {}),
]


@pytest.mark.parametrize(("arch", "spec", "options"), CASES)
def test_round_trip_is_bitwise_equal_to_quantize_model(model_dirs, tmp_path, arch, spec, options):
    out = tmp_path / "art"
    meta = quantize_to_artifact(model_dirs[arch], spec, out, options=QuantizeOptions(**options))
    assert sorted(p.name for p in out.iterdir()) == sorted([META, WEIGHTS])
    expected = load(model_dirs[arch])
    rows = quantize_model(expected, spec, **options)
    got = load(model_dirs[arch])
    returned = load_artifact(out, got)
    assert returned == json.loads((out / META).read_text())
    pe, pg = params(expected), params(got)
    assert pe.keys() == pg.keys()
    for name in pe:
        assert torch.equal(pe[name], pg[name]), name
    # same tying structure: untied in both or tied in both
    head, emb = got.get_output_embeddings().weight, got.get_input_embeddings().weight
    assert (head is emb) == (
        expected.get_output_embeddings().weight is expected.get_input_embeddings().weight
    )
    assert meta["summary"]["total_bits"] == summarize(rows)["total_bits"]
    assert meta["quant"] == QuantSpec.parse(spec).id
    assert meta["tensors"] == json.loads(json.dumps(rows))


@pytest.mark.parametrize(("arch", "spec", "options"), CASES)
def test_size_on_disk_matches_the_accounting(model_dirs, tmp_path, arch, spec, options):
    out = tmp_path / "art"
    meta = quantize_to_artifact(model_dirs[arch], spec, out, options=QuantizeOptions(**options))
    path = out / WEIGHTS
    size = path.stat().st_size
    header = 8 + header_len(path)
    accounted = meta["summary"]["total_bits"] / 8
    n_quantized = sum(r["quantized"] and not r["tied_to"] for r in meta["tensors"])
    data = size - header
    # packed codes round up to whole bytes (< 1 byte per tensor); outlier indices are extra
    assert accounted <= data <= accounted + n_quantized + meta["index_bytes"]
    assert abs(size - accounted) <= header + n_quantized + meta["index_bytes"]
    assert meta["files"][WEIGHTS] == size


def test_fp16_model_round_trip(model_dirs, tmp_path):
    out = tmp_path / "art"
    meta = quantize_to_artifact(model_dirs["gpt_neox"], "int4-b64-o0.02", out, dtype="float16")
    assert meta["model_dtype"] == "float16"
    expected, got = (
        load(model_dirs["gpt_neox"], torch.float16),
        load(model_dirs["gpt_neox"], torch.float16),
    )
    quantize_model(expected, "int4-b64-o0.02")
    load_artifact(out, got)
    assert all(
        torch.equal(a, b)
        for a, b in zip(params(expected).values(), params(got).values(), strict=True)
    )
    assert next(got.parameters()).dtype == torch.float16


def test_baseline_writes_accounting_only(model_dirs, tmp_path):
    out = tmp_path / "base"
    meta = quantize_to_artifact(model_dirs["gpt2"], "fp16", out)
    assert [p.name for p in out.iterdir()] == [META]
    model = load(model_dirs["gpt2"])
    assert meta["summary"]["total_bits"] == 16 * model.num_parameters()
    before = {n: p.clone() for n, p in params(model).items()}
    load_artifact(out, model)
    assert all(torch.equal(p, before[n]) for n, p in params(model).items())


def test_metadata_records_the_run(model_dirs, tmp_path):
    out = tmp_path / "art"
    options = QuantizeOptions(include=["mlp"], quantize_lm_head=True)
    meta = quantize_to_artifact(model_dirs["gpt2"], "int4-b64", out, options=options)
    assert meta["settings"]["include"] == ["mlp"] and meta["settings"]["quantize_lm_head"]
    assert meta["untied"] == ["transformer.wte.weight"]
    assert set(meta["versions"]) == {"kbit", "torch", "transformers"}
    assert meta["base_model"] == str(model_dirs["gpt2"].resolve())
    assert meta["spec"]["bits"] == 4 and meta["spec"]["block_size"] == 64
    for key in ("sqnr_db_mean", "sqnr_db_min", "bits_per_param", "fraction_quantized"):
        assert key in meta["summary"]


def test_rewrite_is_atomic_and_replaces_old_content(model_dirs, tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    quantize_to_artifact(model_dirs["gpt2"], "int4-b64", out)
    assert sorted(p.name for p in out.iterdir()) == sorted([META, WEIGHTS])
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no temp dirs left behind


def test_artifact_does_not_fit_another_model(model_dirs, tmp_path):
    out = tmp_path / "art"
    quantize_to_artifact(model_dirs["gpt2"], "int4-b64", out)
    with pytest.raises(ArtifactError, match="base model"):
        load_artifact(out, load(model_dirs["llama"]))
    with pytest.raises(ArtifactError, match="not a kbit artifact"):
        load_artifact(tmp_path, load(model_dirs["llama"]))


@pytest.mark.parametrize("spec", ["int4-b64", "float3-e2-b64", "dynamic4-b64", "nf4-b64", "mxfp6"])
def test_implied_codebooks_equal_the_stored_ones(spec):
    """Fixed codebooks are not written to disk; the one rebuilt from the spec must be identical."""
    q = quantize(torch.randn(64, 64), spec)
    assert torch.equal(spec_codebook(QuantSpec.parse(spec)), q.codebook)


def test_refuses_pickle_only_model_dirs(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(ModelLoadError, match="safetensors"):
        quantize_to_artifact(d, "int4-b64", tmp_path / "out")


def test_cli_quantize_prints_the_accounting(model_dirs, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["quantize", str(model_dirs["gpt_neox"]), "--spec", "int4-b64", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    meta = json.loads((out / META).read_text())
    s = meta["summary"]
    assert f"{s['n_params']:,}" in text
    assert f"{s['total_bits']:,}" in text
    assert f"{s['bits_per_param']:.4f}" in text
    assert f"mean {s['sqnr_db_mean']:.2f} dB, min {s['sqnr_db_min']:.2f} dB" in text
    assert "vs 16-bit" in text and "GB" in text


def test_cli_options_and_errors(model_dirs, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["quantize", str(model_dirs["gpt2"]), "--spec", "int3-b64", "--out", str(out)]
    rc = main([*argv, "--exclude", "mlp", "--quantize-lm-head"])
    assert rc == 0
    meta = json.loads((out / META).read_text())
    quantized = [r["name"] for r in meta["tensors"] if r["quantized"]]
    assert "lm_head.weight" in quantized and not any(".mlp." in n for n in quantized)
    capsys.readouterr()
    assert main(["quantize", str(model_dirs["gpt2"]), "--spec", "int9-b64", "--out", str(out)]) == 2
    assert "bits=9" in capsys.readouterr().err
    assert (
        main(
            [
                "quantize",
                str(tmp_path / "nope" / "x" / "y"),
                "--spec",
                "int4-b64",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "not a model directory" in capsys.readouterr().err
