"""Tiny random causal language models of every supported architecture, for tests.

The models are small (2 blocks, hidden size 64) but keep the real module layout of each family,
so code that finds blocks, fused QKV projections or tied embeddings is exercised on the same
structure as the full-size checkpoints. The vocabulary matches a real tokenizer from the shared
data folder (GPT-2 for gpt2/opt/bloom/llama, GPT-NeoX-20B for gpt_neox) so that saved model
directories load and tokenize like hub snapshots; when that folder is absent a small BPE tokenizer
is trained on the fly so the helpers still work on a fresh clone.

API: ``tiny_model(arch, seed=0)`` and ``tiny_model_dir(arch, tmp_path)``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

ARCHS = ("gpt_neox", "opt", "gpt2", "bloom", "llama")
HIDDEN = 64
LAYERS = 2
HEADS = 4
EOS = "<|endoftext|>"

_TOKENIZER_FOLDER = {
    "gpt_neox": "gpt-neox-20b",
    "opt": "gpt2",
    "gpt2": "gpt2",
    "bloom": "gpt2",
    "llama": "gpt2",
}


def shared_data_dir() -> Path:
    """The shared evaluation data folder (``KBIT_SHARED_DATA`` overrides the default)."""
    env = os.environ.get("KBIT_SHARED_DATA")
    if env:
        # absolute, so that subprocesses started in other folders (snakemake, lm-eval) find it
        return Path(env).resolve()
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny model architecture {arch!r}; allowed are {ARCHS}")


def _fallback_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few sentences: only used when the real files are absent."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "The quick brown fox jumps over the lazy dog.",
        "A k-bit data type maps each weight to one of two to the k values.",
        "Quantization trades model bits for accuracy; four bits are often optimal.",
    ] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS)


@functools.cache
def _load_tokenizer(folder: str) -> PreTrainedTokenizerFast:
    root = shared_data_dir() / "tokenizers" / folder
    if folder == "gpt2" and (root / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(root))
    if folder == "gpt-neox-20b" and (root / "20B_tokenizer.json").is_file():
        return PreTrainedTokenizerFast(
            tokenizer_file=str(root / "20B_tokenizer.json"), eos_token=EOS, bos_token=EOS
        )
    return _fallback_tokenizer()


def tiny_tokenizer(arch: str) -> PreTrainedTokenizerFast:
    """The tokenizer that goes with ``tiny_model(arch)`` (real one when available)."""
    _check_arch(arch)
    return _load_tokenizer(_TOKENIZER_FOLDER[arch])


def _config(arch: str, vocab: int, eos_id: int, hidden: int = HIDDEN, heads: int = HEADS):
    common = {"vocab_size": vocab, "bos_token_id": eos_id, "eos_token_id": eos_id}
    if arch == "gpt_neox":
        return GPTNeoXConfig(
            hidden_size=hidden,
            num_hidden_layers=LAYERS,
            num_attention_heads=heads,
            intermediate_size=4 * hidden,
            max_position_embeddings=2048,
            rotary_pct=0.25,
            tie_word_embeddings=False,  # Pythia keeps a separate output matrix
            **common,
        )
    if arch == "opt":
        return OPTConfig(
            hidden_size=hidden,
            num_hidden_layers=LAYERS,
            num_attention_heads=heads,
            ffn_dim=4 * hidden,
            word_embed_proj_dim=hidden,
            max_position_embeddings=2048,
            pad_token_id=eos_id,
            **common,
        )
    if arch == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=LAYERS, n_head=heads, n_positions=1024, **common)
    if arch == "bloom":
        return BloomConfig(hidden_size=hidden, n_layer=LAYERS, n_head=heads, **common)
    # llama: grouped-query attention (2 KV heads for 4 query heads), tied like SmolLM2
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden + 32,
        num_hidden_layers=LAYERS,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        **common,
    )


_MODEL_CLASS = {
    "gpt_neox": GPTNeoXForCausalLM,
    "opt": OPTForCausalLM,
    "gpt2": GPT2LMHeadModel,
    "bloom": BloomForCausalLM,
    "llama": LlamaForCausalLM,
}


def tiny_model(
    arch: str, seed: int = 0, hidden: int = HIDDEN, heads: int = HEADS
) -> PreTrainedModel:
    """A randomly initialised 2-block model of ``arch`` in float32, in eval mode.

    The same (arch, seed) always gives the same weights; the global RNG is left untouched.
    ``hidden`` and ``heads`` widen it (GPU tests use real head sizes, which pick other kernels).
    """
    _check_arch(arch)
    tok = tiny_tokenizer(arch)
    config = _config(arch, len(tok), tok.convert_tokens_to_ids(EOS), hidden, heads)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _MODEL_CLASS[arch](config)
    return model.eval()


def tiny_model_dir(arch: str, tmp_path: Path, seed: int = 0) -> Path:
    """Save ``tiny_model(arch, seed)`` with safetensors and its tokenizer under ``tmp_path``.

    Returns the directory, which loads with ``AutoModelForCausalLM.from_pretrained`` and
    ``AutoTokenizer.from_pretrained`` like a hub snapshot.
    """
    out = Path(tmp_path) / f"tiny-{arch}-{seed}"
    model = tiny_model(arch, seed)
    model.save_pretrained(out, safe_serialization=True)
    tiny_tokenizer(arch).save_pretrained(out)
    return out
