"""Model-level simulated quantization: selection per architecture, proxy columns, tied weights."""

from __future__ import annotations

import math

import pytest
import torch
from models import ARCHS, tiny_model

import kbit
from kbit.accounting import predict_tensor_bits, summarize
from kbit.blockwise import quantize
from kbit.model_quant import find_blocks, n_outlier_columns, quantize_model, select_parameters
from kbit.spec import SpecError

PER_BLOCK = {
    "gpt_neox": (
        "attention.query_key_value",
        "attention.dense",
        "mlp.dense_h_to_4h",
        "mlp.dense_4h_to_h",
    ),
    "opt": (
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.q_proj",
        "self_attn.out_proj",
        "fc1",
        "fc2",
    ),
    "gpt2": ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    "bloom": (
        "self_attention.query_key_value",
        "self_attention.dense",
        "mlp.dense_h_to_4h",
        "mlp.dense_4h_to_h",
    ),
    "llama": (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ),
}
BLOCKS = {
    "gpt_neox": "gpt_neox.layers",
    "opt": "model.decoder.layers",
    "gpt2": "transformer.h",
    "bloom": "transformer.h",
    "llama": "model.layers",
}
#: successor -> predecessor (the proxy pairs) per architecture
PAIRS = {
    "gpt_neox": {
        "attention.dense": "attention.query_key_value",
        "mlp.dense_4h_to_h": "mlp.dense_h_to_4h",
    },
    "opt": {"self_attn.out_proj": "self_attn.v_proj", "fc2": "fc1"},
    "gpt2": {"attn.c_proj": "attn.c_attn", "mlp.c_proj": "mlp.c_fc"},
    "bloom": {
        "self_attention.dense": "self_attention.query_key_value",
        "mlp.dense_4h_to_h": "mlp.dense_h_to_4h",
    },
    "llama": {"self_attn.o_proj": "self_attn.v_proj", "mlp.down_proj": "mlp.up_proj"},
}
CONV1D = {"gpt2"}


def expected_weights(arch: str) -> list[str]:
    return [f"{BLOCKS[arch]}.{i}.{m}.weight" for i in range(2) for m in PER_BLOCK[arch]]


def out_in(arch: str, w: torch.Tensor) -> torch.Tensor:
    return w.t() if arch in CONV1D else w


def originals(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}


@pytest.mark.parametrize("arch", ARCHS)
def test_default_selection_is_exactly_the_block_linears(arch):
    model = tiny_model(arch)
    assert find_blocks(model)[0] == BLOCKS[arch]
    assert select_parameters(model) == expected_weights(arch)
    before = originals(model)
    rows = quantize_model(model, "int4-b64")
    quantized = [r["name"] for r in rows if r["quantized"]]
    assert quantized == expected_weights(arch)
    assert [r["name"] for r in rows] == list(before)
    after = dict(model.named_parameters(remove_duplicate=False))
    for name, w in before.items():
        changed = not torch.equal(after[name], w)
        assert changed == (name in quantized), name


@pytest.mark.parametrize("arch", ARCHS)
def test_weights_equal_tensor_level_quantization_in_linear_layout(arch):
    """Every weight is quantized in the [out, in] layout (Conv1D transposed) in float32."""
    spec = kbit.QuantSpec.parse("float4-e3-b64")
    model = tiny_model(arch)
    before = originals(model)
    quantize_model(model, spec)
    for name in expected_weights(arch):
        w = out_in(arch, before[name])
        expect = out_in(arch, kbit.fake_quantize(w.float().contiguous(), spec))
        assert torch.equal(model.get_parameter(name), expect), name


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", ["float4-e3-b64", "int3-b64-o0.05", "quantile4-b128-c", "nf4-bt"])
def test_row_bits_follow_the_formula(arch, spec):
    spec = kbit.QuantSpec.parse(spec)
    model = tiny_model(arch)
    rows = quantize_model(model, spec)
    total = 0
    for r in rows:
        if r["tied_to"]:
            continue
        if r["quantized"]:
            out_features = out_in(arch, torch.empty(r["shape"])).shape[0]
            expect = predict_tensor_bits(spec, r["n_params"], r["outlier_columns"], out_features)
            k, b = spec.bits, spec.block_size
            n_q = r["n_params"] - r["outlier_columns"] * out_features
            blocks = 1 if b is None else math.ceil(n_q / b)
            extra = 16 * 2**k * (spec.dtype == "quantile") + 16 * spec.center
            assert (
                expect == k * n_q + 16 * blocks + extra + 16 * r["outlier_columns"] * out_features
            )
        else:
            expect = 16 * r["n_params"]
        assert r["bits"] == expect, r["name"]
        total += expect
    s = summarize(rows)
    assert s["total_bits"] == total
    assert s["n_params"] == model.num_parameters()
    assert s["baseline_bits"] == 16 * model.num_parameters()


def value_rows(arch: str, weights, config, block: int, successor: str) -> torch.Tensor:
    """Independent computation: rows of the predecessor's [out, in] weight that feed each input
    column of ``successor``, in the successor's input order."""
    prefix = f"{BLOCKS[arch]}.{block}."
    pred = out_in(arch, weights[prefix + PAIRS[arch][successor] + ".weight"])
    hidden, heads = config.hidden_size, config.num_attention_heads
    hd = hidden // heads
    if successor in ("attention.dense", "self_attention.dense"):  # [heads, 3, hd, in]
        return pred.reshape(heads, 3, hd, -1)[:, 2].reshape(hidden, -1)
    if successor == "attn.c_proj":  # [q | k | v]
        return pred[2 * hidden :]
    if successor == "self_attn.o_proj":  # grouped-query: each KV head serves several heads
        kv = config.num_key_value_heads
        return pred.reshape(kv, hd, -1).repeat_interleave(heads // kv, dim=0).reshape(hidden, -1)
    return pred


@pytest.mark.parametrize("arch", ARCHS)
def test_proxy_keeps_exactly_the_top_std_columns(arch):
    p = 0.05
    spec = kbit.QuantSpec.parse(f"int3-b64-o{p}")
    model = tiny_model(arch, seed=3)
    before = originals(model)
    rows = {r["name"]: r for r in quantize_model(model, spec)}
    for block in range(2):
        prefix = f"{BLOCKS[arch]}.{block}."
        for succ, pred in PAIRS[arch].items():
            name = prefix + succ + ".weight"
            feeders = value_rows(arch, before, model.config, block, succ)
            std = feeders.float().std(dim=1)
            n_in = std.numel()
            k = math.ceil(p * n_in)
            top = sorted(sorted(range(n_in), key=lambda j: -std[j].item())[:k])
            w0 = out_in(arch, before[name])
            w = out_in(arch, model.get_parameter(name).detach())
            mask = torch.zeros(n_in, dtype=torch.bool)
            mask[top] = True
            assert torch.equal(w[:, mask], w0[:, mask].half().float()), name
            rest = kbit.fake_quantize(w0[:, ~mask].float().contiguous(), spec)
            assert torch.equal(w[:, ~mask], rest), name
            r = rows[name]
            assert r["outlier_columns"] == k
            assert r["outlier_source"] == prefix + pred
            assert r["bits"] == quantize(rest, spec).bits + 16 * k * w.shape[0]
    successors = {f"{BLOCKS[arch]}.{b}.{s}.weight" for b in range(2) for s in PAIRS[arch]}
    for name, r in rows.items():
        if r["quantized"] and name not in successors:
            assert r["outlier_columns"] == 0 and r["outlier_source"] is None, name


def test_baseline_leaves_the_model_unchanged():
    model = tiny_model("opt")
    before = originals(model)
    rows = quantize_model(model, "fp16")
    assert not any(r["quantized"] for r in rows)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert summarize(rows)["total_bits"] == 16 * model.num_parameters()


@pytest.mark.parametrize("arch", ["gpt2", "opt", "llama"])
def test_lm_head_only_unties_and_survives_tie_weights(arch):
    model = tiny_model(arch)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert emb.weight is head.weight
    before = emb.weight.detach().clone()
    spec = kbit.QuantSpec.parse("int4-b64")
    rows = {r["name"]: r for r in quantize_model(model, spec, quantize_lm_head=True)}
    expect = kbit.fake_quantize(before, spec)
    for _ in range(2):
        assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
        assert torch.equal(model.get_output_embeddings().weight, expect)
        assert torch.equal(model.get_input_embeddings().weight, before)
        model.tie_weights()  # lm-eval's HFLM may call this: it must not undo the untying
    assert model.config.tie_word_embeddings is False
    head_rows = [r for r in rows.values() if r["quantized"] and r["shape"] == list(before.shape)]
    assert len(head_rows) == 1 and head_rows[0]["tied_to"] is None
    assert sum(r["untied"] for r in rows.values()) == 1
    s = summarize(rows.values())
    assert s["n_params"] == model.num_parameters()  # now two separate matrices


def test_embeddings_and_head_tied_are_quantized_and_counted_once():
    model = tiny_model("gpt2")
    n = model.num_parameters()
    before = model.transformer.wte.weight.detach().clone()
    spec = kbit.QuantSpec.parse("int4-b64")
    rows = quantize_model(model, spec, quantize_embeddings=True, quantize_lm_head=True)
    assert model.lm_head.weight is model.transformer.wte.weight
    model.tie_weights()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(model.lm_head.weight, kbit.fake_quantize(before, spec))
    alias = [r for r in rows if r["tied_to"]]
    assert [r["name"] for r in alias] == ["lm_head.weight"]
    assert alias[0]["quantized"]
    s = summarize(rows)
    assert s["n_params"] == n
    assert s["total_bits"] == sum(r["bits"] for r in rows if not r["tied_to"])
    # the position embedding is an embedding table too
    assert next(r for r in rows if r["name"] == "transformer.wpe.weight")["quantized"]


def test_untied_default_keeps_tie_and_counts_once():
    model = tiny_model("bloom")
    rows = quantize_model(model, "int4-b64")
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    assert summarize(rows)["n_params"] == model.num_parameters()


def test_include_and_exclude():
    model = tiny_model("gpt_neox")
    mlp = select_parameters(model, include=["mlp"])
    assert mlp == [n for n in expected_weights("gpt_neox") if ".mlp." in n]  # no biases
    biases = select_parameters(model, include=[r"mlp\..*\.bias$"])
    assert biases and all(n.endswith(".bias") and ".mlp." in n for n in biases)
    no_l1 = select_parameters(model, exclude=[r"layers\.1\."])
    assert no_l1 == [n for n in expected_weights("gpt_neox") if ".layers.0." in n]
    norms = select_parameters(model, include=[r"layernorm\.weight$"])
    assert norms and all("layernorm" in n for n in norms)
    rows = quantize_model(model, "int4-b64", include=["mlp"], exclude=["4h_to_h"])
    assert [r["name"] for r in rows if r["quantized"]] == [
        f"gpt_neox.layers.{i}.mlp.dense_h_to_4h.weight" for i in range(2)
    ]


def test_bad_input_names_the_problem():
    model = tiny_model("opt")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        quantize_model(model, "int4-b64", include=["("])
    with pytest.raises(SpecError, match="gptq"):
        quantize_model(model, "int4-b64-gptq")
    with pytest.raises(SpecError):
        quantize_model(model, "int9-b64")


def test_sqnr_and_dtype_are_respected():
    model = tiny_model("gpt_neox").half()
    name = "gpt_neox.layers.0.mlp.dense_h_to_4h.weight"
    w = model.get_parameter(name).detach().clone()
    rows = {r["name"]: r for r in quantize_model(model, "int4-b64")}
    w_hat = model.get_parameter(name).detach()
    assert w_hat.dtype == torch.float16
    assert torch.equal(w_hat, kbit.fake_quantize(w.float(), "int4-b64").half())
    err = (w.double() - w_hat.double()).pow(2).sum()
    assert rows[name]["sqnr_db"] == pytest.approx(10 * math.log10(w.double().pow(2).sum() / err))
    assert rows["gpt_neox.embed_in.weight"]["sqnr_db"] is None
    assert rows[name]["n_params"] == w.numel() and rows[name]["shape"] == list(w.shape)


def test_outlier_count_is_robust_to_float_noise():
    assert n_outlier_columns(0.02, 150) == 3  # 0.02 * 150 = 3.0000000000000004 in floats
    assert n_outlier_columns(0.02, 64) == 2
    assert n_outlier_columns(0.0, 64) == 0


def test_models_without_decoder_blocks_are_refused():
    with pytest.raises(ValueError, match="decoder blocks"):
        find_blocks(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_public_api_exports_quantize_model():
    assert kbit.quantize_model is quantize_model
